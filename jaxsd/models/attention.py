"""The one attention function every jaxsd model calls.

Logits and softmax are computed in fp32 whatever the input dtype, by every implementation.
Which implementation runs is decided per call, while tracing, by
`jaxsd.models.attention_select.select_implementation` (its docstring holds the decision table and
the arithmetic behind it):

* ``"auto"``  — ``"einsum"`` on CPU; on GPU cuDNN flash attention for fp16/bf16 within cuDNN's
  limits, else ``"xla"``; on TPU ``"splash"`` for long sequences (Lq and Lk ≥ 1024), else ``"xla"``.
* ``"einsum"`` — our own two matmuls and softmax with the heads axis moved in front
  ([B, H, L, D]). The same math as `jax.nn.dot_product_attention`'s XLA path, whose
  [B, L, H, D] → [B, H, Lq, Lk] einsums cost XLA:CPU transposes around the softmax
  passes: the `small` preset's train step is 3 % faster with it (wall; 5 % CPU time;
  interleaved A/B in one process, docs/benchmarks.md).
* ``"xla"`` (`jax.nn.dot_product_attention`), ``"cudnn"`` (its cuDNN flash attention) and
  ``"splash"`` (JAX's Pallas TPU kernel, jaxsd/models/splash.py) — forced; refused with an
  `InputError` where the kernel cannot run the attention.

"einsum" and "xla" materialise the [B, H, Lq, Lk] logits; where those are large (SD's 4096-token
self-attention at 512 px and up) the queries run in chunks, each rematerialised in the backward
pass, so only one chunk's logits, softmax and their gradients exist at a time
(`attention_select.query_chunk_size`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from jaxsd.models.attention_select import (
    IMPLEMENTATIONS,
    MaskKind,
    cpu_query_block,
    select_implementation,
)
from jaxsd.models.attention_select import query_chunk_size as auto_query_chunk_size

__all__ = ["IMPLEMENTATIONS", "Attention", "attention", "choose_implementation", "mask_kind"]


def mask_kind(mask: jax.Array | None) -> MaskKind:
    """"none", "keys" (one row of keys per example, broadcast over heads and queries: [B|1, 1, 1, Lk])
    or "full" (anything else broadcastable to [B, H, Lq, Lk])."""
    if mask is None:
        return "none"
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    return "keys" if shape[1] == 1 and shape[2] == 1 else "full"


def choose_implementation(implementation: str, q: jax.Array, k: jax.Array, *, bias: jax.Array | None = None,
                          mask: jax.Array | None = None) -> str:
    """`select_implementation` for q [B, Lq, H, D] and k [B, Lk, H, D] on this process's platform."""
    platform, cudnn_max_head_dim = jax.default_backend(), 128
    if platform == "gpu":
        platform, cudnn_max_head_dim = _gpu_facts()
    return select_implementation(
        implementation, platform=platform, dtype=q.dtype, head_dim=q.shape[-1], q_len=q.shape[1],
        kv_len=k.shape[1], has_bias=bias is not None, mask=mask_kind(mask), cudnn_max_head_dim=cudnn_max_head_dim,
        # several devices and no mesh to shard_map over: XLA would have to partition the Pallas kernel
        splash_placeable=jax.device_count() == 1 or not jax.sharding.get_abstract_mesh().empty)


def _gpu_facts() -> tuple[str, int]:
    """("gpu", cuDNN flash attention's largest head dim) on NVIDIA GPUs — 256 from compute capability
    9.0 (Hopper), 128 before; ("rocm", 0) on AMD GPUs, where there is no cuDNN (JAX tells them apart
    by the client's platform version, as here)."""
    device = jax.devices()[0]
    if "cuda" not in device.client.platform_version.lower():
        return "rocm", 0
    major_minor = tuple(int(x) for x in device.compute_capability.split(".")[:2])
    return "gpu", 256 if major_minor >= (9, 0) else 128


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    implementation: str = "auto",
    query_chunk_size: int | None = None,
) -> jax.Array:
    """Multi-head attention.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
      bias: additive logits bias broadcastable to [B, H, Lq, Lk] (T5 relative positions).
      scale: logits scale; default 1/sqrt(D). T5 passes 1.0.
      query_chunk_size: when Lq is larger, queries run in chunks of this size (one
        after another, each rematerialised in the backward pass), so the [Lq, Lk] logits
        never exist at once — the same result with bounded memory. Not with
        mask/bias/is_causal. None: `attention_select.query_chunk_size` decides (chunks where
        the logits are large, for "einsum" and "xla"). The splash kernel needs no chunks (it
        never holds the logits): ignored there.
    Returns: [B, Lq, H, D] in q's dtype.

    There is no `upcast` (diffusers' `upcast_attention`, SD2.1): the logits are always fp32; see
    `select_implementation`.
    """
    impl = choose_implementation(implementation, q, k, bias=bias, mask=mask)
    if query_chunk_size is None:
        block = cpu_query_block(impl, platform=jax.default_backend(), q_len=q.shape[1], kv_len=k.shape[1],
                                has_bias=bias is not None, mask=mask_kind(mask), is_causal=is_causal)
        if block is not None:
            return _cpu_blocked(q, k, v, scale, block)
        query_chunk_size = auto_query_chunk_size(
            impl, heads=q.shape[2], q_len=q.shape[1], kv_len=k.shape[1], batch=q.shape[0], has_bias=bias is not None,
            mask=mask_kind(mask), is_causal=is_causal)
    if bias is not None:
        bias = bias.astype(q.dtype)
    if query_chunk_size is not None and q.shape[1] > query_chunk_size:
        if mask is not None or bias is not None or is_causal:
            raise ValueError("attention: query_chunk_size works only without mask, bias and is_causal")
        if impl != "splash":
            return _query_chunked(q, k, v, scale, impl, query_chunk_size)
    return _attend(q, k, v, bias, mask, scale, is_causal, impl)


def _attend(q, k, v, bias, mask, scale, is_causal, impl: str) -> jax.Array:
    if impl == "einsum":
        return _heads_first_attention(q, k, v, bias, mask, scale, is_causal)
    if impl == "splash":  # the selection refused bias and per-query masks
        from jaxsd.models.splash import splash_attention  # Pallas imports only where it runs

        key_mask = None if mask is None else jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)[:, 0, 0, :]
        return splash_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
                                key_mask=key_mask, is_causal=is_causal)
    if impl == "cudnn":  # cuDNN takes a bias/mask only with full [.., Lq, Lk] trailing dims
        full = (q.shape[1], k.shape[1])
        bias = None if bias is None else jnp.broadcast_to(bias, (*bias.shape[:-2], *full))
        mask = None if mask is None else jnp.broadcast_to(mask, (*mask.shape[:-2], *full))
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
    """Attention of q [B, Lq, H, D] in Lq-chunks via `lax.map`; the last chunk is zero-padded and cut.

    Each chunk is rematerialised: without it the backward pass of the loop keeps every chunk's
    softmax (all [Lq, Lk] of it again); with it, it keeps the chunk's queries and recomputes its
    logits when its gradient is taken."""
    lq = q.shape[1]
    n = -(-lq // chunk)
    q = jnp.pad(q, ((0, 0), (0, n * chunk - lq), (0, 0), (0, 0)))
    one = jax.checkpoint(lambda qc, k, v: _attend(qc, k, v, None, None, scale, False, impl),
                         policy=jax.checkpoint_policies.nothing_saveable)
    out = jax.lax.map(lambda qc: one(qc, k, v), rearrange(q, "b (n c) h d -> n b c h d", c=chunk))
    return rearrange(out, "n b c h d -> b (n c) h d")[:, :lq]


def _cpu_blocked(q, k, v, scale, block: int) -> jax.Array:
    """Attention of q [B, Lq, H, D] one (example, head) and `block` queries at a time (nested `lax.map`s;
    the last block zero-padded and cut), so a block's [block, Lk] fp32 logits stay in the CPU's cache
    (`attention_select.cpu_query_block`). The softmax is normalised after the second matmul: the
    [block, D] output is divided by the row sums instead of the [block, Lk] probabilities (one pass less
    over the logits; the same math, fp32 rounding apart). Each block is rematerialised in the backward
    pass, as `_query_chunked`'s chunks."""
    b, lq = q.shape[:2]
    n = -(-lq // block)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q = jnp.pad(q, ((0, 0), (0, n * block - lq), (0, 0), (0, 0)))
    qs = rearrange(q, "b (n c) h d -> (b h) n c d", c=block)
    ks, vs = (rearrange(x, "b l h d -> (b h) l d") for x in (k, v))

    def one(qc, kh, vh):  # [c, D], [Lk, D], [Lk, D] -> [c, D]
        logits = jnp.einsum("qd,kd->qk", qc, kh, preferred_element_type=jnp.float32) * jnp.float32(scale)
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        o = jnp.einsum("qk,kd->qd", e.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
        return (o / jnp.sum(e, axis=-1, keepdims=True)).astype(vh.dtype)

    one = jax.checkpoint(one, policy=jax.checkpoint_policies.nothing_saveable)
    out = jax.lax.map(lambda x: jax.lax.map(lambda qc: one(qc, x[1], x[2]), x[0]), (qs, ks, vs))
    return rearrange(out, "(b h) n c d -> b (n c) h d", b=b)[:, :lq]


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
        dense = lambda n, name, bias, axes=("embed", "heads"): Dense(
            n, use_bias=bias, axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q, k, v = (rearrange(dense(inner, name, self.qkv_bias)(src), "b l (h d) -> b l h d", h=self.heads)
                   for name, src in (("to_q", x), ("to_k", ctx), ("to_v", ctx)))
        o = attention(q, k, v, implementation=self.implementation,
                      query_chunk_size=self.query_chunk_size)
        o = dense(self.out_dim or shape[-1], "to_out_0", self.out_bias, ("heads", "embed"))(
            rearrange(o, "b l h d -> b l (h d)"))
        if x.ndim != len(shape):
            o = rearrange(o, "b (height width) c -> b height width c", height=shape[1])
        if self.residual_connection:
            o = o + residual
        return o / self.rescale_output_factor
