"""The `jaxsd train` config's perceptual-loss sections (`loss.lpips`, `loss.style`) and their check.

Split from jaxsd/config.py, which nests them in `LossConfig` and runs `check_perceptual`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jaxsd.errors import ConfigError, InputError

if TYPE_CHECKING:  # jaxsd.config imports this module
    from jaxsd.config import Config


@dataclass(frozen=True)
class LPIPSLossConfig:
    """LPIPS (VGG16, v0.1) weights: local files only (jaxsd/losses/weights.py, docs/losses.md).
    Not part of the UNet objective: `jaxsd train` refuses weight > 0 until VAE training uses it."""

    weight: float = 0.0
    """multiplier of the LPIPS term; 0 = off."""
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
    """Gram-matrix style loss over VGG16 layers (backbone: loss.lpips.weights); G = FᵀF / (C·H·W)."""

    weight: float = 0.0
    """multiplier of the style term; 0 = off."""
    layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])
    """VGG16 taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
    layer_weights: list[float] = field(default_factory=list)
    """one weight per layer; empty = 1 each."""

    def __hash__(self) -> int:  # LossConfig is a static argument of jitted steps: hash the lists as tuples
        return hash((self.weight, tuple(self.layers), tuple(self.layer_weights)))


def check_perceptual(cfg: Config) -> None:
    """loss.lpips / loss.style: valid layers, and refused when on, since no train step uses them yet."""
    from jaxsd.losses.taps import check_taps  # jax-free

    st = cfg.loss.style
    try:
        check_taps(st.layers, "loss.style.layers")
    except InputError as e:
        raise ConfigError(str(e)) from None
    if st.layer_weights and len(st.layer_weights) != len(st.layers):
        raise ConfigError(f"loss.style.layer_weights has {len(st.layer_weights)} values for {len(st.layers)} "
                          f"loss.style.layers {st.layers}: give one per layer, or none (1 each)")
    on = [k for k, w in (("loss.lpips.weight", cfg.loss.lpips.weight), ("loss.style.weight", st.weight)) if w]
    if on:
        raise ConfigError(f"{' and '.join(on)} set, but `jaxsd train` trains the UNet's denoising objective, which "
                          "uses no perceptual loss: LPIPS and style losses come with VAE training (issue #21). "
                          "Set them to 0.")
