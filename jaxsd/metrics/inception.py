"""InceptionV3 as FID uses it: pytorch-fid's `pt_inception-2015-12-05` network up to its 2048-d pool features.

The network is torchvision's Inception3 with pytorch-fid's FID blocks (the TensorFlow graph the FID
paper used): the 3×3 average pool of Mixed_5b-d (FIDInceptionA), Mixed_6b-e (FIDInceptionC) and
Mixed_7b (FIDInceptionE_1) leaves the zero padding out of its average (count_include_pad=False), and
Mixed_7c (FIDInceptionE_2) max-pools instead. Input: images [N, H, W, 3] in [0, 1] of any size,
resized to 299 × 299 bilinearly as `F.interpolate(align_corners=False)` does (no antialiasing), then
scaled to [-1, 1]. Output: the final average pool, [N, 2048].

Module and param names mirror the PyTorch state dict (`Mixed_5b.branch1x1.conv.weight` ⇔
`Mixed_5b/branch1x1/conv/kernel`); BatchNorm runs in eval mode with its running statistics stored as
params (`bn/running_mean`, `bn/running_var`), so the generic conversion rules load the file.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_SIZE = 299
BN_EPS = 1e-3  # torchvision's BasicConv2d


class BasicConv2d(nn.Module):
    """Conv (no bias) → eval-mode BatchNorm → ReLU, as torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (ph, pw) = self.padding
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride), padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in eval mode: (x − running_mean) / √(running_var + eps) · scale + bias."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features,)
        scale = self.param("scale", nn.initializers.ones, shape)
        bias = self.param("bias", nn.initializers.zeros, shape)
        mean = self.param("running_mean", nn.initializers.zeros, shape)
        var = self.param("running_var", nn.initializers.ones, shape)
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def _conv(features: int, kernel: int | tuple[int, int], name: str, stride: int = 1,
          padding: int | tuple[int, int] = 0) -> BasicConv2d:
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv2d(features, kernel, stride, padding, name=name)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool, which the FID weights were trained with, ignores the zero padding
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b-d: [N, 35, 35, C] → [N, 35, 35, 224 + pool_features]."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _conv(64, 1, "branch1x1")(x)
        b5 = _conv(64, 5, "branch5x5_2", padding=2)(_conv(48, 1, "branch5x5_1")(x))
        b3 = _conv(64, 1, "branch3x3dbl_1")(x)
        b3 = _conv(96, 3, "branch3x3dbl_3", padding=1)(_conv(96, 3, "branch3x3dbl_2", padding=1)(b3))
        bp = _conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's, unpatched): [N, 35, 35, 288] → [N, 17, 17, 768]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _conv(384, 3, "branch3x3", stride=2)(x)
        bd = _conv(96, 3, "branch3x3dbl_2", padding=1)(_conv(64, 1, "branch3x3dbl_1")(x))
        bd = _conv(96, 3, "branch3x3dbl_3", stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b-e: [N, 17, 17, 768] → [N, 17, 17, 768]."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = _conv(192, 1, "branch1x1")(x)
        b7 = _conv(c7, 1, "branch7x7_1")(x)
        b7 = _conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
        b7 = _conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
        bd = _conv(c7, 1, "branch7x7dbl_1")(x)
        bd = _conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
        bd = _conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
        bd = _conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
        bd = _conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
        bp = _conv(192, 1, "branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's, unpatched): [N, 17, 17, 768] → [N, 8, 8, 1280]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _conv(320, 3, "branch3x3_2", stride=2)(_conv(192, 1, "branch3x3_1")(x))
        b7 = _conv(192, 1, "branch7x7x3_1")(x)
        b7 = _conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
        b7 = _conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
        b7 = _conv(192, 3, "branch7x7x3_4", stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (max_pool=False: average pool without padding) and Mixed_7c (max_pool=True): → [N, 8, 8, 2048]."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _conv(320, 1, "branch1x1")(x)
        b3 = _conv(384, 1, "branch3x3_1")(x)
        b3 = jnp.concatenate([_conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3),
                              _conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3)], axis=-1)
        bd = _conv(384, 3, "branch3x3dbl_2", padding=1)(_conv(448, 1, "branch3x3dbl_1")(x))
        bd = jnp.concatenate([_conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
                              _conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd)], axis=-1)
        if self.max_pool:  # pytorch-fid: the FID graph max-pools here (likely a bug in it, kept for comparability)
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_exclude_pad(x)
        bp = _conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """[N, H, W, 3] in [0, 1] → pool features [N, 2048] (pytorch-fid's InceptionV3 block 3)."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = 2.0 * resize_bilinear(images.astype(jnp.float32), FID_SIZE, FID_SIZE) - 1.0
        x = _conv(32, 3, "Conv2d_1a_3x3", stride=2)(x)
        x = _conv(32, 3, "Conv2d_2a_3x3")(x)
        x = _max_pool_3x3_s2(_conv(64, 3, "Conv2d_2b_3x3", padding=1)(x))
        x = _conv(80, 1, "Conv2d_3b_1x1")(x)
        x = _max_pool_3x3_s2(_conv(192, 3, "Conv2d_4a_3x3")(x))
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D bilinear resampling as PyTorch's `align_corners=False` (half-pixel, no antialias)."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)  # PyTorch clamps negative source coordinates to the first pixel
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


def resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
    """[N, H, W, C] → [N, height, width, C], as `F.interpolate(mode="bilinear", align_corners=False)`."""
    rows = jnp.asarray(bilinear_matrix(images.shape[1], height))
    cols = jnp.asarray(bilinear_matrix(images.shape[2], width))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rows, images, precision=hp)
    return jnp.einsum("pw,nowc->nopc", cols, x, precision=hp)


def example_inputs(batch: int = 1) -> tuple[jax.Array]:
    """A small input for `jax.eval_shape` of the params (any size works: the network resizes to 299 first)."""
    return (jnp.zeros((batch, 8, 8, 3), jnp.float32),)
