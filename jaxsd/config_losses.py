"""The `jaxsd train` config's perceptual-loss sections (`loss.lpips`, `loss.style`, `loss.perceptual`) and their check.

Split from jaxsd/config.py, which nests them in `LossConfig` and runs `check_perceptual`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jaxsd.errors import ConfigError, InputError

if TYPE_CHECKING:  # jaxsd.config_schema imports this module
    from jaxsd.config_schema import Config


@dataclass(frozen=True)
class LPIPSLossConfig:
    """LPIPS (VGG16, v0.1) weights: local files only (jaxsd/losses/weights.py, docs/losses.md). Where LPIPS is
    used and how much: loss.perceptual.lpips_weight (UNet runs), loss.vae.lpips_weight (VAE runs)."""

    weights: str | None = None
    """the VGG16 backbone: torchvision's state dict (vgg16-397923af.pth, in ~/.cache/torch/hub/checkpoints/
    after torchvision downloads it) as .pth (needs allow_pickle) or .safetensors, or a file written by
    jaxsd.losses.weights.save_lpips_safetensors (backbone + heads). Also the style loss's backbone."""
    heads: str | None = None
    """the LPIPS v0.1 linear heads (the lpips package's weights/v0.1/vgg.pth); null = from `weights` when it
    holds them, else from the installed lpips package."""
    allow_pickle: bool = False
    """read .pth files with torch.load(weights_only=True); unpickling can run code, so it is opt-in."""


@dataclass(frozen=True)
class StyleLossConfig:
    """Gram-matrix style loss over VGG16 layers (backbone: loss.lpips.weights); G = FᵀF / (C·H·W).
    Its multiplier is loss.perceptual.style_weight."""

    layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])
    """VGG16 taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
    layer_weights: list[float] = field(default_factory=list)
    """one weight per layer; empty = 1 each."""
    references: list[str] = field(default_factory=list)
    """style images for the UNet's style term (loss.perceptual.style_weight): image files and/or folders (their
    .jpg/.jpeg/.png/.webp files). Their Gram matrices, averaged, are the target; computed once at start."""

    def __hash__(self) -> int:  # LossConfig is a static argument of jitted steps: hash the lists as tuples
        return hash((tuple(self.layers), tuple(self.layer_weights), tuple(self.references)))


@dataclass(frozen=True)
class PerceptualLossConfig:
    """Perceptual terms of the UNet objective, on the VAE-decoded x0 prediction (jaxsd/train/perceptual.py).

    For the samples at timesteps <= max_timestep, on steps where step % every == 0: x0 predicted from the UNet's
    output, decoded by the frozen VAE of data.cache.vae, and compared with the decoded clean latents (LPIPS,
    backbone + heads from loss.lpips) and/or with the Gram matrices of loss.style.references (style loss over
    loss.style.layers). Off by default: each term costs VAE decodes and VGG16 passes (docs/losses.md)."""

    lpips_weight: float = 0.0
    """multiplier of LPIPS(decoded x0 prediction, decoded clean latents); 0 = off."""
    style_weight: float = 0.0
    """multiplier of the Gram style loss of the decoded x0 prediction to loss.style.references; 0 = off."""
    every: int = 1
    """apply the terms on steps where step % every == 0 (0-based step count before the update)."""
    max_timestep: int = 500
    """only samples with timestep t <= max_timestep get the terms (x0 predictions from noisier inputs are blurry)."""

    @property
    def active(self) -> bool:
        return self.lpips_weight > 0 or self.style_weight > 0


def style_reference_files(references: list[str]) -> list[Path]:
    """loss.style.references as image files: each file itself, each folder's image files (sorted). A missing
    path, a file that is not an image, or a folder without images is a ConfigError naming it."""
    from jaxsd.data.sources import IMAGE_EXTENSIONS

    files: list[Path] = []
    for ref in references:
        path = Path(ref).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ConfigError(f"loss.style.references: folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ConfigError(f"loss.style.references: {path} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
            files.append(path)
        else:
            raise ConfigError(f"loss.style.references: {path} does not exist (give image files or folders of them)")
    return files


def _check_unet_perceptual(cfg: Config) -> None:
    """loss.perceptual: weights >= 0, every >= 1, the files each active term needs."""
    pc = cfg.loss.perceptual
    if pc.lpips_weight < 0 or pc.style_weight < 0:
        raise ConfigError(f"loss.perceptual.lpips_weight={pc.lpips_weight} / style_weight={pc.style_weight} must be "
                          ">= 0 (0 = off)")
    if pc.every < 1:
        raise ConfigError(f"loss.perceptual.every={pc.every} must be >= 1 (1 = every step; N = steps where step % N "
                          "== 0)")
    if not 0 <= pc.max_timestep < cfg.diffusion.num_train_timesteps:
        raise ConfigError(f"loss.perceptual.max_timestep={pc.max_timestep} must be within 0..."
                          f"{cfg.diffusion.num_train_timesteps - 1} (diffusion.num_train_timesteps - 1)")
    if not pc.active:
        return
    d = cfg.diffusion
    if d.rescale_betas_zero_snr and d.prediction_type == "epsilon" and pc.max_timestep == d.num_train_timesteps - 1:
        raise ConfigError(f"loss.perceptual.max_timestep={pc.max_timestep}: with a zero-terminal-SNR schedule an ε "
                          "prediction at the last timestep says nothing of x0; lower max_timestep (default 500)")
    if not cfg.loss.lpips.weights:
        terms = " and ".join(k for k, w in (("lpips_weight", pc.lpips_weight), ("style_weight", pc.style_weight)) if w)
        raise ConfigError(f"loss.perceptual.{terms} > 0 needs the VGG16 backbone: set loss.lpips.weights (torchvision's "
                          "vgg16-397923af.pth with loss.lpips.allow_pickle=true, or a .safetensors; docs/losses.md)")
    if not cfg.data.cache.vae:
        raise ConfigError("loss.perceptual: the x0 prediction is decoded with the VAE of data.cache.vae (the one that "
                          "made the cached latents), which is not set")
    if pc.style_weight > 0:
        if not cfg.loss.style.references:
            raise ConfigError("loss.perceptual.style_weight > 0 needs style images: set loss.style.references to "
                              "image files or folders")
        style_reference_files(list(cfg.loss.style.references))


def check_perceptual(cfg: Config) -> None:
    """loss.style: valid layers and layer weights; loss.perceptual."""
    from jaxsd.losses.taps import check_taps  # jax-free

    st = cfg.loss.style
    try:
        check_taps(st.layers, "loss.style.layers")
    except InputError as e:
        raise ConfigError(str(e)) from None
    if st.layer_weights and len(st.layer_weights) != len(st.layers):
        raise ConfigError(f"loss.style.layer_weights has {len(st.layer_weights)} values for {len(st.layers)} "
                          f"loss.style.layers {st.layers}: give one per layer, or none (1 each)")
    _check_unet_perceptual(cfg)
