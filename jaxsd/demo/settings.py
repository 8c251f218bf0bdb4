"""The demo's embedded default: every size, step count and hyper-parameter in one place.

`DemoSettings()` is the full run (the README's numbers); `DemoSettings.quick()`
the reduced run of the test suite, which exercises every phase and file but
trains far too briefly to follow prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class VAETraining:
    """Phase 1: the autoencoder's `jaxsd train` run (jaxsd/demo/autoencoder.py writes its config)."""

    steps: int = 400
    batch_size: int = 16
    """half the compute of batch 32 for ~1 dB less held-out PSNR (23.8 dB); the classifier still reads
    the reconstructions at 99 % shape (docs/demo.md)."""
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    """cosine decay to learning_rate · this."""
    kl_weight: float = 1.2e-3
    """`loss.vae.kl_weight`: the KL summed over the latent, per pixel value. 1.2e-3 = 1e-4 per latent value
    at 8×8×4 latents of 32×32×3 images: small, so reconstruction comes first and the latents are only
    mildly regularised."""


@dataclass(frozen=True)
class DemoSettings:
    """What `jaxsd demo` builds and how long it trains."""

    seed: int = 0
    resolution: int = 32
    train_images: int = 1536
    """balanced over the 12 prompts (128 each)."""
    heldout_images: int = 96
    """real images the classifier and the VAE PSNR are measured on (never trained on)."""

    # Phase 1: the autoencoder. 32 px → 8x8x4 latents (two downsamplings). 16 channels at full
    # resolution: (32, 64, 64) cost ~4x more per step for ~1 dB PSNR (docs/demo.md).
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64)
    vae_latent_channels: int = 4
    vae: VAETraining = field(default_factory=VAETraining)

    # Phases 2-3: the text-conditioned UNet on 8x8 latents.
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    unet_cross_attention: tuple[bool, ...] = (False, True)
    """per level: a CrossAttn block (self- + cross-attention) or a plain ResNet block. None at 8x8:
    its 64-token attention cost a third of the train step's CPU time for ~4 points of shape accuracy
    (docs/demo.md); the 4x4 level's attention sees the whole image."""
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_steps: int = 2000
    """2000: shape 72.9 % (2026-12-08, two CPU devices), 78 % (96 samples, earlier VAE); 2200: 77.1 %; 2400: 89.6 %
    (48 samples unless said); each 200 steps ≈ 50 s (docs/demo.md)."""
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    unet_warmup_steps: int = 100
    cond_dropout: float = 0.1
    ema_decay: float = 0.999

    # Sampling and evaluation.
    samples_per_prompt: int = 4
    sample_steps: int = 30
    guidance_scale: float = 1.5
    """CFG scale. Stronger guidance bends squares' edges and interiors (fill ratio falls): on the default
    run's export shape accuracy was 52 % at CFG 5, 74 % at 3, 82 % at 2, 88 % at 1.5 (96 fresh samples;
    colour 100 % at all four), see docs/demo.md."""

    @classmethod
    def quick(cls) -> DemoSettings:
        """The test suite's run: every phase, tiny sizes, a few steps each."""
        # Small blocks mostly to shorten XLA compiles, which dominate a run this short.
        return cls(train_images=48, heldout_images=24, vae_block_out_channels=(16, 16),
                   unet_block_out_channels=(16, 32), unet_heads=2,
                   vae=dataclasses.replace(VAETraining(), steps=4, batch_size=8, warmup_steps=1),
                   unet_steps=4, unet_batch_size=8, unet_warmup_steps=1,
                   samples_per_prompt=1, sample_steps=3)
