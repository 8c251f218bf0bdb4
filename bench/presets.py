"""UNet configurations the benchmarks use, as diffusers `config.json` dicts.

`micro` is for smoke tests only; `tiny` and `small` are for CPU runs (quick
checks, scaling curves); `sd15` and `sdxl` are the real architectures (runwayml
SD1.5 and SDXL base UNet configs).
The same dict builds diffusers' `UNet2DConditionModel(**cfg)` and jaxsd's
`UNetConfig.from_diffusers(cfg)`, so both frameworks run the same network.
"""

from __future__ import annotations

import copy

import numpy as np

_SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}

_SDXL = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}

# Two resolutions, cross-attention in both, every block type: the smallest UNet that
# still exercises the whole code path.
_TINY = {
    **_SD15,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 8,
}

# One resolution, one block each way: for smoke tests of the code paths only (compiles
# in a few seconds); its timings mean nothing.
_MICRO = {
    **_TINY,
    "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
    "block_out_channels": [32],
}

# SD1.5's structure at a quarter of its width (~54M params; the same `small` as
# bench/unet_step.py): convolutions and attention dominate as on the real model, yet it
# fits CPU sweeps.
_SMALL = {
    **_SD15,
    "sample_size": 32,
    "block_out_channels": [80, 160, 320, 320], "norm_num_groups": 16,
    "cross_attention_dim": 192, "attention_head_dim": 8,
}


# `jaxsd demo`'s from-scratch UNet on 8×8 latents (jaxsd.demo.run.unet_config(DemoSettings()),
# written out so importing the presets needs no jax; tests/bench/test_conv_ab.py checks they agree)
_DEMO = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 32, "norm_num_groups": 16,
}

UNET_PRESETS: dict[str, dict] = {"micro": _MICRO, "tiny": _TINY, "small": _SMALL, "sd15": _SD15, "sdxl": _SDXL,
                                 "demo": _DEMO}

# Latent size (h = w) each preset is benchmarked at unless --latent says otherwise.
# sd15 @ 32×32 is the reference point (PyTorch ≈31 s/step, 14.8 GB on the CPU box).
DEFAULT_LATENT = {"micro": 8, "tiny": 8, "small": 32, "sd15": 32, "sdxl": 128, "demo": 8}

# Text context each preset is trained with: (sequence length, width). SDXL also
# takes pooled text embeddings [B, 1280] and time ids [B, 6]. The demo's captions are 16 tokens
# (jaxsd/demo/tokenizer.py); every other preset's 77.
TEXT_LEN = 77
DEMO_TEXT_LEN = 16
SDXL_POOLED_DIM = 1280

# Optimizer hyper-parameters both frameworks use (values do not change the cost).
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2


def unet_preset(name: str) -> dict:
    """A fresh copy of preset `name`'s diffusers UNet config."""
    try:
        return copy.deepcopy(UNET_PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(UNET_PRESETS)}") from None


def is_sdxl(cfg: dict) -> bool:
    return cfg.get("addition_embed_type") == "text_time"


def input_shapes(cfg: dict, batch: int, latent: int) -> dict:
    """Shapes (NHWC for jaxsd) of one training batch for UNet config `cfg`."""
    text_len = DEMO_TEXT_LEN if cfg == _DEMO else TEXT_LEN
    shapes = {"sample": (batch, latent, latent, cfg["in_channels"]), "timesteps": (batch,),
              "encoder_hidden_states": (batch, text_len, cfg["cross_attention_dim"])}
    if is_sdxl(cfg):
        shapes["text_embeds"] = (batch, SDXL_POOLED_DIM)
        shapes["time_ids"] = (batch, 6)
    return shapes


def numpy_batch(cfg: dict, batch: int, latent: int, seed: int = 0) -> dict:
    """One training batch (NHWC) from a fixed seed; the torch side transposes the same arrays."""
    rng = np.random.default_rng(seed)
    shapes = input_shapes(cfg, batch, latent)
    out = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items() if k != "timesteps"}
    out["timesteps"] = rng.integers(0, 1000, size=shapes["timesteps"]).astype(np.int32)
    out["target"] = rng.standard_normal(shapes["sample"], dtype=np.float32)
    if "time_ids" in out:
        out["time_ids"] = np.tile(np.array([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], np.float32),
                                  (batch, 1))
    return out
