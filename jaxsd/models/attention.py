"""The one attention function every jaxsd model calls.

Logits and softmax are computed in fp32 whatever the input dtype. The implementation
is chosen per platform:

* ``"auto"``  — cuDNN flash attention on GPU when the dtype is fp16/bf16 and the
  head dim is a multiple of 8 up to 128 (cuDNN's constraints); ``"einsum"`` on CPU;
  ``"xla"`` otherwise (TPU, GPU fp32). On TPU XLA's fused attention is what pays for
  SD's short sequences; ``"splash"`` is left for long sequences once measured.
* ``"einsum"`` — our own two matmuls and softmax with the heads axis moved in front
  ([B, H, L, D]). The same math as `jax.nn.dot_product_attention`'s XLA path, whose
  [B, L, H, D] → [B, H, Lq, Lk] einsums cost XLA:CPU transposes around the softmax
  passes: the `small` preset's train step is 3 % faster with it (wall; 5 % CPU time;
  interleaved A/B in one process, docs/benchmarks.md).
* ``"xla"`` (`jax.nn.dot_product_attention`) / ``"cudnn"`` — forced.
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

Implementation = Literal["auto", "einsum", "xla", "cudnn"]
IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def choose_implementation(implementation: str, dtype, head_dim: int) -> str:
    """Resolve ``"auto"`` for the current default backend; validate explicit choices."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} unknown; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    cudnn_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    if backend == "gpu" and cudnn_ok:
        return "cudnn"
    return "einsum" if backend == "cpu" else "xla"


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
    return _attend(q, k, v, bias, mask, scale, is_causal, impl).astype(out_dtype)


def _attend(q, k, v, bias, mask, scale, is_causal, impl: str) -> jax.Array:
    if impl == "einsum":
        return _heads_first_attention(q, k, v, bias, mask, scale, is_causal)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                        implementation=impl)


# what `jax.nn.dot_product_attention` writes into masked logits (finite, so a fully masked row
# gives a uniform softmax instead of NaN)
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def _heads_first_attention(q, k, v, bias, mask, scale, is_causal) -> jax.Array:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] → [B, Lq, H, D]: fp32 logits [B, H, Lq, Lk] from
    heads-first operands, bias added, masked logits replaced, fp32 softmax, probabilities
    cast to v's dtype for the second matmul (as `jax.nn.dot_product_attention`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh = (rearrange(x, "b l h d -> b h l d") for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return rearrange(jnp.einsum("bhqk,bhkd->bhqd", probs, vh), "b h q d -> b q h d")


def _query_chunked(q, k, v, scale, impl, chunk: int) -> jax.Array:
    """Attention of q [B, Lq, H, D] in Lq-chunks via `lax.map`; the last chunk is zero-padded and cut."""
    lq = q.shape[1]
    n = -(-lq // chunk)
    q = jnp.pad(q, ((0, 0), (0, n * chunk - lq), (0, 0), (0, 0)))
    out = jax.lax.map(lambda qc: _attend(qc, k, v, None, None, scale, False, impl),
                      rearrange(q, "b (n c) h d -> n b c h d", c=chunk))
    return rearrange(out, "n b c h d -> b (n c) h d")[:, :lq]


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
            x = rearrange(x, "b height width c -> b (height width) c")
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name="group_norm")(x)
        ctx = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias, axes=("embed", "heads"): Dense(  # noqa: E731
            n, use_bias=bias, axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q, k, v = (rearrange(dense(inner, name, self.qkv_bias)(src), "b l (h d) -> b l h d", h=self.heads)
                   for name, src in (("to_q", x), ("to_k", ctx), ("to_v", ctx)))
        o = attention(q, k, v, upcast=self.upcast, implementation=self.implementation,
                      query_chunk_size=self.query_chunk_size)
        o = dense(self.out_dim or shape[-1], "to_out_0", self.out_bias, ("heads", "embed"))(
            rearrange(o, "b l h d -> b l (h d)"))
        if x.ndim != len(shape):
            o = rearrange(o, "b (height width) c -> b height width c", height=shape[1])
        if self.residual_connection:
            o = o + residual
        return o / self.rescale_output_factor
