"""The PatchGAN discriminator of LDM's / taming-transformers' autoencoder training (`NLayerDiscriminator`). NHWC.

    conv4×4/2 (C) → LeakyReLU(0.2)
    n−1 × [conv4×4/2 (C·min(2^i, 8), no bias) → BatchNorm → LeakyReLU(0.2)]
    conv4×4/1 (C·min(2^n, 8), no bias) → BatchNorm → LeakyReLU(0.2)
    conv4×4/1 (1)                                  → logits [B, h, w, 1], one per overlapping patch

all with padding 1 (n = 3, C = 64: a 70×70 receptive field). Weights start as taming's `weights_init`:
kernels N(0, 0.02), norm scales N(1, 0.02), biases 0 (`init_discriminator`).

BatchNorm here is the training-mode BatchNorm the original discriminator always runs in: each call
normalises with its own batch's statistics (per channel over batch, height and width; ε 1e-5). The
running averages of torch's BatchNorm are never read in training, so they are not kept: the model is a
pure function of (params, images) — deterministic, nothing mutable in the train state. Under jit over a
sharded batch the statistics are the global batch's (torch's DDP uses each device's own).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.layers import Conv
from jaxsd.models.params import init_params

_EPS = 1e-5  # torch.nn.BatchNorm2d's default


class BatchNorm(nn.Module):
    """Training-mode BatchNorm over [B, H, W, C] (statistics over B, H, W in fp32), scale and bias per channel."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,))
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=(0, 1, 2))
        var = jnp.square(xf - mean).mean(axis=(0, 1, 2))  # biased, as torch normalises in training
        return ((xf - mean) * jax.lax.rsqrt(var + _EPS) * scale + bias).astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """images [B, H, W, 3] in [-1, 1] → patch logits [B, H', W', 1] (H' ≈ H / 2^layers − 2)."""

    layers: int = 3
    channels: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"kernel_size": 4, "padding": 1, "dtype": self.dtype}
        h = nn.leaky_relu(Conv(self.channels, strides=2, name="conv_0", **kw)(x), 0.2)
        for i in range(1, self.layers + 1):
            stride = 2 if i < self.layers else 1  # the last of these keeps the size
            h = Conv(self.channels * min(2 ** i, 8), strides=stride, use_bias=False, name=f"conv_{i}", **kw)(h)
            h = nn.leaky_relu(BatchNorm(self.dtype, name=f"norm_{i}")(h), 0.2)
        return Conv(1, strides=1, name=f"conv_{self.layers + 1}", **kw)(h).astype(jnp.float32)


def example_image(layers: int) -> jax.Array:
    """The smallest image whose patch logits are not empty (for `jax.eval_shape` of the params)."""
    size = 2 ** (layers + 2)
    return jnp.zeros((1, size, size, 3), jnp.float32)


def init_discriminator(module: NLayerDiscriminator, key: jax.Array) -> dict:
    """taming's weights_init: conv kernels N(0, 0.02), BatchNorm scales N(1, 0.02), every bias 0."""
    params = init_params(module, jax.random.key(0), example_image(module.layers))
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        name = path[-1].key
        noise = 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype)
        out.append(noise if name == "kernel" else 1.0 + noise if name == "scale" else jnp.zeros_like(leaf))
    return jax.tree_util.tree_unflatten(tree, out)
