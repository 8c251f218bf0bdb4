"""The one attention function every jaxsd model calls.

Built on `jax.nn.dot_product_attention`, which computes logits and softmax in
fp32 whatever the input dtype. The implementation is chosen per platform:

* ``"auto"``  — cuDNN flash attention on GPU when the dtype is fp16/bf16 and the
  head dim is a multiple of 8 up to 128 (cuDNN's constraints); XLA otherwise
  (CPU, TPU, fp32). On TPU XLA's fused attention is what pays for SD's short
  sequences; ``"splash"`` is left for long sequences once measured.
* ``"xla"`` / ``"cudnn"`` — forced.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def choose_implementation(implementation: str, dtype, head_dim: int) -> str:
    """Resolve ``"auto"`` for the current default backend; validate explicit choices."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} unknown; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    on_gpu = jax.default_backend() == "gpu"
    cudnn_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if on_gpu and cudnn_ok else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    upcast: bool = False,
    implementation: str = "auto",
    query_chunk_size: int | None = None,
) -> jax.Array:
    """Multi-head attention.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
      bias: additive logits bias broadcastable to [B, H, Lq, Lk] (T5 relative positions).
      scale: logits scale; default 1/sqrt(D). T5 passes 1.0.
      upcast: compute q/k/v in fp32 (diffusers' `upcast_attention`, SD2.1).
      query_chunk_size: when Lq is larger, queries run in chunks of this size (one
        after another), so the [Lq, Lk] logits never exist at once — the same result
        with bounded memory (the VAE's single-head attention over 128×128 latents
        would otherwise hold 1 GiB of logits per image). Not with mask/bias/is_causal.
    Returns: [B, Lq, H, D] in q's dtype.
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    impl = choose_implementation(implementation, q.dtype, q.shape[-1])
    if bias is not None:
        bias = bias.astype(q.dtype)
    if query_chunk_size is not None and q.shape[1] > query_chunk_size:
        if mask is not None or bias is not None or is_causal:
            raise ValueError("attention: query_chunk_size works only without mask, bias and is_causal")
        return _query_chunked(q, k, v, scale, impl, query_chunk_size).astype(out_dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                       implementation=impl)
    return out.astype(out_dtype)


def _query_chunked(q, k, v, scale, impl, chunk: int) -> jax.Array:
    """Attention of q [B, Lq, H, D] in Lq-chunks via `lax.map`; the last chunk is zero-padded and cut."""
    b, lq, h, d = q.shape
    n = -(-lq // chunk)
    q = jnp.pad(q, ((0, 0), (0, n * chunk - lq), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)
    out = jax.lax.map(lambda qc: jax.nn.dot_product_attention(qc, k, v, scale=scale, implementation=impl), q)
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, -1)[:, :lq]


class Attention(nn.Module):
    """diffusers' `Attention` block: to_q/to_k/to_v → attention → to_out_0.

    Self-attention when `context` is None, cross-attention otherwise. With
    `norm_num_groups` it is the VAE's spatial attention: a GroupNorm named
    `group_norm` first, a residual connection and `rescale_output_factor`.

    x: [B, L, query_dim] or [B, H, W, query_dim] (spatial; flattened internally);
    context: [B, Lk, cross_dim]. Returns the same shape as x.
    """

    heads: int
    dim_head: int
    out_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = True
    upcast: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    implementation: str = "auto"
    query_chunk_size: int | None = None  # see `attention`
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        from jaxsd.models.layers import Dense, GroupNorm  # layers imports nothing from here

        residual = x
        shape = x.shape
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name="group_norm")(x)
        ctx = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias, axes=("embed", "heads"): Dense(  # noqa: E731
            n, use_bias=bias, axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        b = x.shape[0]
        q = dense(inner, "to_q", self.qkv_bias)(x).reshape(b, -1, self.heads, self.dim_head)
        k = dense(inner, "to_k", self.qkv_bias)(ctx).reshape(b, -1, self.heads, self.dim_head)
        v = dense(inner, "to_v", self.qkv_bias)(ctx).reshape(b, -1, self.heads, self.dim_head)
        o = attention(q, k, v, upcast=self.upcast, implementation=self.implementation,
                      query_chunk_size=self.query_chunk_size).reshape(b, -1, inner)
        o = dense(self.out_dim or shape[-1], "to_out_0", self.out_bias, ("heads", "embed"))(o)
        if x.ndim != len(shape):
            o = o.reshape(shape[:-1] + (o.shape[-1],))
        if self.residual_connection:
            o = o + residual
        return o / self.rescale_output_factor
