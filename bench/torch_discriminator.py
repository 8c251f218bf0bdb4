"""taming-transformers' PatchGAN `NLayerDiscriminator` in PyTorch, rebuilt from its definition, with its
layers named as jaxsd's (jaxsd/models/discriminator.py), so `jaxsd.convert.rules.flax_to_torch` of jaxsd's
params is its state dict. NCHW.

    conv_0 4×4/2 (C) → LeakyReLU(0.2)
    conv_i 4×4/2 (C·min(2^i, 8), no bias) → norm_i BatchNorm2d → LeakyReLU(0.2)     i = 1 … n−1
    conv_n 4×4/1 (C·min(2^n, 8), no bias) → norm_n BatchNorm2d → LeakyReLU(0.2)
    conv_{n+1} 4×4/1 (1)

It runs in training mode, as in LDM's loss (BatchNorm normalises with each batch's statistics; its running
averages are updated and never read). The discriminator test (tests/models/test_discriminator.py) and
`jaxsd bench vae-step`'s torch side use it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

# BatchNorm2d's running statistics: buffers torch keeps, which jaxsd's training-mode BatchNorm has no use for
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


class NLayerDiscriminator(nn.Module):
    """images [B, 3, H, W] in [-1, 1] → patch logits [B, 1, H', W']."""

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        self.layers = layers
        self.conv_0 = nn.Conv2d(3, channels, 4, 2, 1)
        mult = 1
        for i in range(1, layers + 1):
            prev, mult = mult, min(2 ** i, 8)
            setattr(self, f"conv_{i}", nn.Conv2d(channels * prev, channels * mult, 4, 2 if i < layers else 1, 1,
                                                 bias=False))
            setattr(self, f"norm_{i}", nn.BatchNorm2d(channels * mult))
        setattr(self, f"conv_{layers + 1}", nn.Conv2d(channels * mult, 1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda h: nn.functional.leaky_relu(h, 0.2)
        h = act(self.conv_0(x))
        for i in range(1, self.layers + 1):
            h = act(getattr(self, f"norm_{i}")(getattr(self, f"conv_{i}")(h)))
        return getattr(self, f"conv_{self.layers + 1}")(h)


def from_jaxsd(params: Mapping, layers: int, channels: int) -> NLayerDiscriminator:
    """The torch discriminator holding jaxsd's discriminator params (a Flax tree), in training mode."""
    from jaxsd.convert.rules import flax_to_torch

    return load_state(NLayerDiscriminator(layers, channels), flax_to_torch(params))


def load_state(module: NLayerDiscriminator, state: Mapping[str, np.ndarray]) -> NLayerDiscriminator:
    """`state` (name → array, from `flax_to_torch` or a file) into `module`: every parameter, nothing else."""
    result = module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if k.rpartition(".")[2] not in RUNNING_STATS]
    if missing or result.unexpected_keys:
        raise ValueError(f"discriminator state does not fit: missing {missing}, unexpected {result.unexpected_keys}")
    return module.train()
