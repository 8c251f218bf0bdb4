"""T5 encoder in Flax, equal to transformers' `T5EncoderModel`.

Used by the SD1.5 + T5-XXL hybrid (T5 v1.1: gated-GELU FFN `wi_0`/`wi_1`/`wo`,
untied vocab head irrelevant for the encoder) and works for the original T5
(ReLU FFN `wi`/`wo`).

Param names mirror transformers' state dict
(`encoder/block_0/layer_0/SelfAttention/q/kernel` ⇔
`encoder.block.0.layer.0.SelfAttention.q.weight`); the token table is
`shared/embedding` (`shared.weight`; its tied duplicate
`encoder.embed_tokens.weight` is handled by the converter).

Forward:
  h = shared(ids)
  bias = relative_position_bias(L) from block 0's table, shared by every block
  per block: h += SelfAttention(RMSNorm(h), bias + padding mask) (no 1/sqrt(d) scaling)
             h += FFN(RMSNorm(h))
  last_hidden_state = final_layer_norm(h)

Half precision: in float16 every block clamps its output just below the
largest finite value (transformers' overflow guard — T5 activations grow past
fp16's range in the FFN) and computes `wo` in fp32 (transformers keeps `wo` in
fp32). bfloat16 has fp32's range and needs neither; norms are fp32 either way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.models.attention import attention
from jaxsd.models.layers import Dense, Embed, RMSNorm, activation


@dataclass(frozen=True)
class T5Config:
    """The fields of transformers' `T5Config` that define the encoder's computation.

    `extra` keeps every other key of the source config.json for saving back.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise InputError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not `ACT` or `gated-ACT`")
        activation(self.dense_act_fn)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation (`gelu_new`), as T5 v1.1 was trained.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_transformers(cls, config: Mapping) -> T5Config:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: config[k] for k in names if k in config}
        derived = {"dense_act_fn", "is_gated_act"}  # recomputed from feed_forward_proj
        extra = tuple(sorted((k, v) for k, v in config.items()
                             if k not in names and k not in derived and not isinstance(v, (dict, list))))
        return cls(**known, extra=extra)

    def to_transformers(self) -> dict:
        """A config.json dict that transformers' T5EncoderModel.from_pretrained accepts."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out.update(model_type="t5", architectures=["T5EncoderModel"], is_encoder_decoder=False,
                   dense_act_fn=self.dense_act_fn, is_gated_act=self.is_gated_act)
        return out


@flax.struct.dataclass
class T5EncoderOutput:
    """last_hidden_state [B, L, d_model]; hidden_states: N+1 states (embeddings, then each block)."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> jax.Array:
    """Bidirectional bucket of (key - query) for every pair: [L, L] int32.

    Half the buckets for each direction; within one, the first half are exact
    offsets and the rest grow logarithmically up to `max_distance`.
    """
    pos = jnp.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    bucket = jnp.where(rel > 0, half, 0)
    rel = jnp.abs(rel)
    max_exact = half // 2
    # float32 log like transformers (`.float()`), then truncate toward zero.
    large = max_exact + (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (half - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, half - 1)
    return (bucket + jnp.where(rel < max_exact, rel, large)).astype(jnp.int32)


def _overflow_guard(x: jax.Array) -> jax.Array:
    """fp16 only: clamp to the finite range (1000 below max when an inf already appeared), as transformers."""
    if x.dtype != jnp.float16:
        return x
    fmax = jnp.finfo(jnp.float16).max
    limit = jnp.where(jnp.isinf(x).any(), fmax - 1000, fmax).astype(x.dtype)
    return jnp.clip(x, -limit, limit)


class RelativePositionTable(nn.Module):
    """`relative_attention_bias` table [num_buckets, heads]: tiny, so replicated (no logical axes)."""

    num_buckets: int
    heads: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)),
                          (self.num_buckets, self.heads), self.param_dtype)


class T5Attention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        c = self.config
        b, n, _ = x.shape
        inner = c.num_heads * c.d_kv
        kw = {"use_bias": False, "dtype": self.dtype, "param_dtype": self.param_dtype}
        q, k, v = (Dense(inner, axes=("embed", "heads"), name=name, **kw)(x).reshape(b, n, c.num_heads, c.d_kv)
                   for name in ("q", "k", "v"))
        if self.has_relative_attention_bias:
            table = RelativePositionTable(c.relative_attention_num_buckets, c.num_heads, self.param_dtype,
                                          name="relative_attention_bias")()
            buckets = relative_position_buckets(n, c.relative_attention_num_buckets, c.relative_attention_max_distance)
            bias = jnp.take(table, buckets, axis=0).transpose(2, 0, 1)[None].astype(jnp.float32)  # [1, H, L, L]
        if bias is None:
            raise ValueError("T5Attention without its own relative_attention_bias needs the first block's bias")
        o = attention(q, k, v, mask=mask, bias=bias, scale=1.0, implementation=self.implementation)
        return Dense(c.d_model, axes=("heads", "embed"), name="o", **kw)(o.reshape(b, n, inner)), bias


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, mask):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        h, bias = T5Attention(self.config, self.has_relative_attention_bias, self.implementation,
                              name="SelfAttention", **kw)(h, bias, mask)
        return x + h, bias


class T5DenseActDense(nn.Module):
    """`DenseReluDense`: wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x))."""

    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = {"use_bias": False, "axes": ("embed", "mlp"), "param_dtype": self.param_dtype}
        act = activation(c.dense_act_fn)
        if c.is_gated_act:
            h = act(Dense(c.d_ff, name="wi_0", dtype=self.dtype, **kw)(x)) * Dense(c.d_ff, name="wi_1", dtype=self.dtype, **kw)(x)
        else:
            h = act(Dense(c.d_ff, name="wi", dtype=self.dtype, **kw)(x))
        wo_dtype = jnp.float32 if self.dtype == jnp.float16 else self.dtype
        return Dense(c.d_model, use_bias=False, axes=("mlp", "embed"), dtype=wo_dtype, param_dtype=self.param_dtype,
                     name="wo")(h)


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        h = T5DenseActDense(self.config, name="DenseReluDense", **kw)(h)
        return (x.astype(h.dtype) + h).astype(self.dtype)


class T5Block(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, mask):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x, bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, self.implementation,
                                       name="layer_0", **kw)(x, bias, mask)
        x = _overflow_guard(x)
        x = _overflow_guard(T5LayerFF(self.config, name="layer_1", **kw)(x))
        return x, bias


class T5Stack(nn.Module):
    """transformers' `encoder`: blocks and the final RMS norm (embeddings come from `shared`)."""

    config: T5Config
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, attention_mask: jax.Array | None) -> T5EncoderOutput:
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        states, bias = [h], None
        for i in range(self.config.num_layers):
            h, bias = T5Block(self.config, i == 0, self.implementation, self.dtype, self.param_dtype,
                              name=f"block_{i}")(h, bias, mask)
            states.append(h)
        last = RMSNorm(self.config.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="final_layer_norm")(h)
        return T5EncoderOutput(last_hidden_state=last, hidden_states=tuple(states))


class T5EncoderModel(nn.Module):
    """transformers' T5EncoderModel. input_ids [B, L] int, attention_mask [B, L] (1 = token,
    0 = padding; None = all tokens) -> `T5EncoderOutput`, last_hidden_state [B, L, d_model]."""

    config: T5Config
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> T5EncoderOutput:
        c = self.config
        h = Embed(c.vocab_size, c.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="shared")(input_ids)
        return T5Stack(c, self.implementation, self.dtype, self.param_dtype, name="encoder")(h, attention_mask)


def example_inputs(config: T5Config, batch: int = 1, length: int = 8) -> tuple[jax.Array]:
    """Inputs for `jax.eval_shape` / init (param shapes do not depend on the length)."""
    return (jnp.zeros((batch, length), jnp.int32),)
