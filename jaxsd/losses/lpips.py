"""LPIPS (Zhang et al. 2018, v0.1, VGG trunk) in Flax, NHWC: the `lpips` package's `LPIPS(net="vgg")`.

    d(x0, x1) = Σ_l mean_{h,w} ( w_l · (f̂_l(x0) − f̂_l(x1))² )

for the five VGG16 taps l (relu1_2 … relu5_3), where f̂ is the feature divided by its L2 norm over
channels (+1e-10), and w_l ≥ 0 the learned linear head (a 1×1 conv to one channel, no bias).
Inputs are images in [-1, 1]; the package's ScalingLayer maps them to ImageNet-normalised inputs
with its fixed shift/scale before the trunk.

Params: {"vgg": VGG16Features params (torchvision names), "lin0".."lin4": {"kernel": [C_l, 1]}} —
`jaxsd.losses.weights` reads both from local files.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.losses.taps import TAPS
from jaxsd.losses.vgg import VGG16Features
from jaxsd.models.layers import Dense

# lpips.ScalingLayer's constants: (x - shift) / scale turns [-1, 1] into ImageNet-normalised input
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor's epsilon, added to the norm (not under the square root)


def scale_input(x: jax.Array) -> jax.Array:
    """[-1, 1] images [..., 3] → the trunk's input, as lpips.ScalingLayer."""
    return (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)


def normalize_channels(f: jax.Array) -> jax.Array:
    """f [..., C] divided by its L2 norm over C (lpips.normalize_tensor)."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)


class LPIPS(nn.Module):
    """LPIPS distance. x0, x1 [B, H, W, 3] in [-1, 1] → [B] (the package returns [B, 1, 1, 1]).

    per_layer=True also returns the five per-tap terms {tap: [B]}.
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array, per_layer: bool = False):
        if x0.shape != x1.shape or x0.shape[-1] != 3:
            raise InputError(f"LPIPS takes two image batches of one shape [B, H, W, 3]; got {x0.shape} and {x1.shape}")
        vgg = VGG16Features(dtype=self.dtype, name="vgg")
        both = vgg(scale_input(jnp.concatenate([x0, x1], axis=0)))  # one trunk pass for both batches
        terms = {}
        for i, tap in enumerate(TAPS):
            f0, f1 = jnp.split(both[tap].astype(jnp.float32), 2, axis=0)
            diff = (normalize_channels(f0) - normalize_channels(f1)) ** 2
            head = Dense(1, use_bias=False, axes=("conv_in", None), name=f"lin{i}")
            terms[tap] = jnp.mean(head(diff)[..., 0], axis=(1, 2))
        total = sum(terms.values())
        return (total, terms) if per_layer else total
