"""The `jaxsd train` config of VAE training (`model.kind: vae`): the `loss.vae` section and its check.

Split from jaxsd/config.py (as config_losses.py and config_text.py), which nests `VAELossConfig` in
`LossConfig` and runs `check_vae`. The guide is docs/vae-training.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxsd.errors import ConfigError

if TYPE_CHECKING:  # jaxsd.config_schema imports this module
    from jaxsd.config_schema import Config

MODEL_KINDS = ("unet", "vae")


@dataclass(frozen=True)
class VAELossConfig:
    """The autoencoder's loss (LDM's `LPIPSWithDiscriminator`), divided by the pixel values per image so
    the terms read as per-value means (docs/vae-training.md): used when model.kind is vae."""

    reconstruction: str = "l1"
    """l1 | l2: the per-value |x - x̂| or (x - x̂)² between the image and its reconstruction."""
    kl_weight: float = 1e-6
    """multiplier of KL(q(z|x) ‖ N(0, I)), summed over the latent and divided by the image's pixel values
    (LDM's kl_weight: 1e-6 for SD's VAE)."""
    lpips_weight: float = 1.0
    """multiplier of LPIPS(x, x̂) (VGG16 v0.1: the files of loss.lpips.weights / heads); 0 = off."""
    discriminator: bool = True
    """false: no PatchGAN at all — the loss is reconstruction + KL (+ LPIPS), the discriminator has no params,
    optimizer state or passes in the step, and the disc_* keys are unused (a from-scratch autoencoder on simple
    images, as `jaxsd demo` trains, needs none)."""
    disc_start: int = 50001
    """the PatchGAN discriminator's losses count from this optimizer step on (LDM's disc_start); before
    it the discriminator does not update and the generator ignores it."""
    disc_weight: float = 0.5
    """multiplier of the adaptive generator weight ‖∇nll‖ / (‖∇g‖ + 1e-4) (gradients at the decoder's conv_out)."""
    disc_loss: str = "hinge"
    """hinge | vanilla (softplus): the discriminator's loss on real images and reconstructions."""
    disc_layers: int = 3
    """the NLayerDiscriminator's stride-2 layers (3: a 70×70 PatchGAN)."""
    disc_channels: int = 64
    """its first layer's channels (doubled per layer, capped at 8×)."""
    disc_learning_rate: float | None = None
    """the discriminator's learning rate (its schedule is optimizer.schedule's); null = optimizer.learning_rate."""
    train_encoder: bool = True
    """false: decoder-only fine-tune — the encoder and quant_conv stay bitwise as loaded (so latents cached
    with this VAE stay valid; how SD's ft-MSE/ft-EMA VAEs were made). Needs model.pretrained."""


def check_vae(cfg: Config) -> None:
    """model.kind / loss.vae: valid values, and the combinations VAE training cannot have."""
    kind = cfg.model.kind
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind = {kind!r} is not one of {MODEL_KINDS}")
    v = cfg.loss.vae
    if kind != "vae":
        return
    for key, value, allowed in (("reconstruction", v.reconstruction, ("l1", "l2")),
                                ("disc_loss", v.disc_loss, ("hinge", "vanilla"))):
        if value not in allowed:
            raise ConfigError(f"loss.vae.{key} = {value!r} is not one of {allowed}")
    for key in ("kl_weight", "lpips_weight", "disc_weight"):
        if getattr(v, key) < 0:
            raise ConfigError(f"loss.vae.{key} = {getattr(v, key)} must be >= 0")
    if v.disc_start < 0 or v.disc_layers < 1 or v.disc_channels < 1:
        raise ConfigError(f"loss.vae: disc_start = {v.disc_start} must be >= 0, disc_layers = {v.disc_layers} and "
                          f"disc_channels = {v.disc_channels} >= 1")
    if v.disc_learning_rate is not None and v.disc_learning_rate <= 0:
        raise ConfigError(f"loss.vae.disc_learning_rate = {v.disc_learning_rate} must be > 0 (or null)")
    if not v.train_encoder and not cfg.model.pretrained:
        raise ConfigError("loss.vae.train_encoder = false fine-tunes the decoder of a trained VAE (the encoder is "
                          "frozen as loaded): set model.pretrained to its folder, or train_encoder = true to train "
                          "from scratch")
    if not cfg.model.pretrained and not cfg.model.vae:
        raise ConfigError("model.kind = vae: model.vae is empty and model.pretrained is not set; give a diffusers "
                          "AutoencoderKL config (see configs/vae_tiny.yaml) or a VAE / pipeline folder")
    if v.lpips_weight > 0 and not cfg.loss.lpips.weights:
        raise ConfigError("loss.vae.lpips_weight > 0 needs the VGG16 backbone: set loss.lpips.weights (docs/losses.md "
                          "says where the files are usually found), or loss.vae.lpips_weight = 0")
    refused = {
        "lora.rank / lora.conv_rank > 0": cfg.lora.enabled,
        "train.data_source = synthetic (VAE training reads images: set data.roots)":
            cfg.train.data_source != "cache",
        "train.grad_accum_steps > 1": cfg.train.grad_accum_steps > 1,
        "loss.cond_dropout > 0": cfg.loss.cond_dropout > 0,
        "validation.every > 0 (the held-out diffusion loss)": cfg.validation.every > 0,
        "dreambooth.class_prompt": cfg.dreambooth.enabled,
        "data.captions": cfg.data.captions.active,
        "data.subsets with a loss_weight other than 1 or a prior (class) subset":
            any(s.loss_weight != 1 or s.kind != "instance" for s in cfg.data.subsets),
        "data.packed (cached latents)": bool(cfg.data.packed),
        "train.text_encoder other than frozen": cfg.train.text_encoder not in (None, "frozen"),
        "model.segmented_backward (the UNet's)": cfg.model.segmented_backward,
    }
    bad = [k for k, on in refused.items() if on]
    if bad:
        raise ConfigError(f"model.kind = vae does not go with: {'; '.join(bad)}. VAE training reads image folders "
                          "(data.roots) and trains the autoencoder alone; remove these settings")
