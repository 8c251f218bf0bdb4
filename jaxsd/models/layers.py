"""Building blocks shared by every model: dense/conv layers carrying logical axis
names for sharding, and normalisations computed in fp32.

Params are stored in `param_dtype` (fp32 master weights by default) and cast to
the compute `dtype` at use. Param names follow the conversion rules
(`kernel`/`bias`/`scale`/`embedding`), so a module named `to_q` holds
`to_q/kernel` ⇔ PyTorch `to_q.weight`.

Logical axis names on params (mapped to mesh axes by the sharding rules):
  "embed"   — a model-width input/output dimension
  "mlp"     — a feed-forward hidden dimension
  "heads"   — the flattened heads×head_dim dimension of attention projections
  "vocab"   — token-embedding rows
  "conv_in", "conv_out" — conv channel dimensions (spatial dims unsharded)
  "norm"    — norm scales and biases

LoRA / LoCon adapters are a second variable collection, "lora", whose paths mirror
"params" (see `jaxsd.models.lora`): when `module.apply({"params": p, "lora": a}, ...)`
gives a Dense or Conv a `down`/`up`/`scale` entry, the layer adds the low-rank term
unmerged. Without the collection the layers compute exactly what they compute
without adapters (no extra op is traced). In training, a third collection,
"lora_dropout", turns on dropout of the adapter input (`_adapter_input`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.models.conv_select import conv_implementation, upsample_implementation
from jaxsd.models.frozen_kernel import frozen_kernel_op, use_frozen_kernel_op
from jaxsd.models.im2col import LOWERINGS, conv_output_hw
from jaxsd.models.lora import dropout_mask
from jaxsd.models.subpixel import upsample2x_conv3x3

Dtype = jnp.dtype
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _param(module: nn.Module, name: str, init, axes: Sequence[str | None], shape, dtype):
    shape = tuple(shape)
    if module.has_variable("params", name):
        # Applying: read the stored param. Flax's `param` would trace `init` through
        # `jax.eval_shape` here only to compare shapes (SD1.5's 686 params: ~0.4 s of every
        # train-step trace); the expected shape is known without it.
        value = nn.meta.unbox(module.get_variable("params", name))
        if tuple(value.shape) != shape:
            raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, tuple(value.shape), shape)
        return value
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


class Dense(nn.Module):
    """y = x @ kernel + bias. kernel: [in, out] with logical `axes`."""

    features: int
    use_bias: bool = True
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", nn.initializers.lecun_normal(), self.axes,
                        (x.shape[-1], self.features), self.param_dtype)
        y = _kernel_op(self, matmul_last_axis, x, kernel)
        if self.use_bias:
            y = y + _param(self, "bias", _zeros, (self.axes[1],), (self.features,), self.param_dtype).astype(self.dtype)
        if self.has_variable("lora", "down"):
            down, up, scale = _adapter(self)
            h = matmul_last_axis(_adapter_input(self, x.astype(self.dtype)), down) * scale
            y = y + matmul_last_axis(h, up)
        return y


def _kernel_op(module: nn.Module, op, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """op(x, kernel) in the module's compute dtype. A frozen bf16 base on CPU (applied with a "lora"
    collection) runs through `frozen_kernel_op`, whose backward makes its own short-lived fp32 copy of
    the kernel instead of keeping the forward's alive through the step (jaxsd/models/frozen_kernel.py)."""
    x = x.astype(module.dtype)
    if use_frozen_kernel_op(platform=jax.default_backend(), kernel_dtype=kernel.dtype,
                            frozen=not module.scope.is_collection_empty("lora")):
        return frozen_kernel_op(op, x, kernel, module.dtype)
    return op(x, kernel.astype(module.dtype))


def _adapter(module: nn.Module) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The module's LoRA (down, up, scale) in its compute dtype.

    Dense: down [in, r], up [r, out]. Conv: down [kh, kw, in, r], up [1, 1, r, out].
    scale [r]: user scale × alpha / rank per rank column, so several adapters concatenate
    along the rank axis and a new scale is new values, not a new program.
    """
    return tuple(module.get_variable("lora", name).astype(module.dtype) for name in ("down", "up", "scale"))


def _adapter_input(module: nn.Module, x: jax.Array) -> jax.Array:
    """What the adapter's `down` sees: x, or in training with LoRA dropout (a "lora_dropout" entry
    {"keys": uint32 [B, 2] per-sample key data, "rate": f32 []}) x with each value zeroed with
    probability `rate` and the others scaled by 1 / (1 - rate) — PEFT's `lora_dropout`, a
    `torch.nn.Dropout` on the adapter input; the base layer sees x unchanged. The masks:
    `jaxsd.models.lora.dropout_mask`, per sample and per layer (this module's path).
    """
    if not module.has_variable("lora_dropout", "keys"):
        return x
    keys, rate = (module.get_variable("lora_dropout", name) for name in ("keys", "rate"))
    if keys.shape[0] != x.shape[0]:
        raise ValueError(f"{'/'.join(module.scope.path)}: LoRA dropout has keys for {keys.shape[0]} samples, "
                         f"the adapter input {x.shape} has a batch of {x.shape[0]}")
    keep = dropout_mask(keys, rate, "/".join(module.scope.path), x.shape[1:])
    return jnp.where(keep, x * (1 / (1 - rate)).astype(x.dtype), jnp.zeros((), x.dtype))


def matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] -> [..., out], computed as one 2-D matmul.

    Same result as `jnp.dot(x, kernel)`, but the leading axes are folded into one first: on
    XLA:CPU the kernel gradient of a dot whose activations keep several leading axes is a
    transpose-copy plus a slow generic dot (measured 3.5x slower for [64, 64, 32] @ [32, 128]),
    while a 2-D dot's gradient is two fast matmuls. On GPU/TPU the reshape is free.
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


class Conv(nn.Module):
    """2-D convolution on NHWC input. kernel: [kh, kw, in, out].

    padding: symmetric int, or explicit ((top, bottom), (left, right)).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # x is first upsampled 2× by nearest neighbour (diffusers' Upsample2D; a 3×3, stride-1, padding-1 conv):
    # on CPU computed at x's resolution as four 2×2 convs (jaxsd/models/subpixel.py)
    upsample2x: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = _param(self, "kernel", nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
        y = _kernel_op(self, self._conv, x, kernel)
        if self.use_bias:
            y = y + _param(self, "bias", _zeros, ("conv_out",), (self.features,), self.param_dtype).astype(self.dtype)
        if self.has_variable("lora", "down"):
            # LoCon: the down conv has the base conv's kernel size, stride and padding; up is 1x1
            down, up, scale = _adapter(self)
            y = y + matmul_last_axis(self._conv(_adapter_input(self, x.astype(self.dtype)), down) * scale, up[0, 0])
        return y

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """x [B, H, W, in] conv kernel [k, k, in, n] with this layer's stride and padding."""
        pad = ((self.padding, self.padding),) * 2 if isinstance(self.padding, int) else self.padding
        if self.upsample2x:
            if (self.strides, pad) != (1, ((1, 1), (1, 1))):
                raise ValueError("Conv(upsample2x=True) is a stride-1, padding-1 conv")
            if upsample_implementation() == "subpixel":
                def phase(x, k, pad):
                    return LOWERINGS[conv_implementation(x, k, x.shape[1:3])](x, k, 1, pad)
                return upsample2x_conv3x3(x, kernel, phase)
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if kernel.shape[:2] == (1, 1) and self.strides == 1 and pad == ((0, 0), (0, 0)):
            # A 1x1 conv is a matmul over channels; as one it trains faster on XLA:CPU (see matmul_last_axis).
            return matmul_last_axis(x, kernel[0, 0])
        out_hw = conv_output_hw(x.shape[1:3], kernel.shape[:2], self.strides, pad)
        # CPU only, where XLA:CPU's kernels are slow: conv_select.py
        return LOWERINGS[conv_implementation(x, kernel, out_hw)](x, kernel, self.strides, pad)


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis, statistics in fp32, as torch.nn.GroupNorm.

    x: [B, ..., C] -> same shape, in `dtype`.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale = _param(self, "scale", _ones, ("norm",), (c,), self.param_dtype)
        bias = _param(self, "bias", _zeros, ("norm",), (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        g = xf.reshape(x.shape[0], -1, self.num_groups, c // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = g.reshape(x.shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in fp32 (torch.nn.LayerNorm). x: [..., C]."""

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            y = y * _param(self, "scale", _ones, ("norm",), (c,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + _param(self, "bias", _zeros, ("norm",), (c,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """T5-style RMS norm (no mean subtraction, no bias), variance in fp32. x: [..., C]."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", _ones, ("norm",), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.epsilon)
        return (y.astype(self.dtype) * scale.astype(self.dtype))


class Embed(nn.Module):
    """Token/position embedding table. embedding: [num_embeddings, features]."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = _param(self, "embedding", nn.initializers.normal(0.02), ("vocab", "embed"),
                       (self.num_embeddings, self.features), self.param_dtype)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


def activation(name: str):
    """Activation by its diffusers/transformers config name; unknown names are an error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise InputError(f"activation {name!r} is not supported; choose one of {sorted(ACTIVATIONS)}") from None
