"""TPU splash attention: JAX's Pallas kernel behind `attention(..., implementation="splash")`.

The kernel is `jax.experimental.pallas.ops.tpu.splash_attention.make_splash_mha` (jax 0.10): an
online-softmax ("flash") attention over [H, L, D] per example that never materialises the
[Lq, Lk] logits, with a fused custom VJP. What this wrapper adds, all exact:

* layout: q/k/v [B, L, H, D] → [B, H, L, D], the kernel vmapped over the batch;
* the logits scale folded into q (the kernel has no scale argument);
* lengths padded with zeros to a multiple of 128 (the kernel's blocks tile the sequence) and head
  dims to a multiple of 128 (the blocks span the head dim, and a TPU vector register has 128
  lanes — SD1.5's head dims are 40/80/160). Zero head-dim columns add nothing to q·k; padded keys
  are masked out; padded queries and columns are cut from the output;
* masking as segment ids: queries get id 1, keys id 1 when attended and 0 when masked (a
  key-padding mask, e.g. T5's or CLIP's) or padding; causal attention as the kernel's CausalMask;
* a query whose every key is masked (by the key mask, or by it and causality) gets the mean of v
  over the real keys — what `jax.nn.dot_product_attention` and our einsum path give (a uniform
  softmax over equal masked logits); the kernel's own average would include padding keys, or only
  the blocks its causal mask visits;
* several devices: a Pallas TPU kernel is a custom call XLA cannot partition, so when tracing under
  a mesh (`jax.set_mesh`) the kernel runs per device in a `shard_map`: batch over the mesh's data
  axes, heads over its tensor axis (each only when it divides), everything else replicated.

Off TPU the kernel runs in Pallas interpret mode: the same kernel body and grid lowered to plain
XLA ops — how the tests check it on CPU; far too slow for real use there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

LANES = 128  # sequence blocks and head dims are padded to multiples of this
MAX_BLOCK = 512  # 512×512 fp32 logits = 1 MiB of VMEM per block
# jaxsd's mesh axes (jaxsd/train/sharding.py; models/ does not import train/): batches are split
# over data×fsdp, attention heads over tensor (the default `heads` rule)
BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXES = ("tensor",)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     key_mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
    """q [B, Lq, H, D], k/v [B, Lk, H, D]; key_mask [B|1, Lk] bool (True = attend) → [B, Lq, H, D].

    q, k and v share one dtype (the compute dtype); logits and softmax statistics are fp32 inside
    the kernel, the probabilities meet v in v's dtype.
    """
    batch = q.shape[0]
    if key_mask is not None:
        key_mask = jnp.broadcast_to(key_mask, (batch, k.shape[1]))
    run = functools.partial(_local_splash, scale=scale, is_causal=is_causal,
                            interpret=jax.default_backend() != "tpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v, key_mask)
    batch_axes = _dividing_axes(mesh, BATCH_MESH_AXES, batch)
    head_axes = _dividing_axes(mesh, HEAD_MESH_AXES, q.shape[2])
    qkv = P(batch_axes, None, head_axes, None)
    if key_mask is None:
        return jax.shard_map(lambda q, k, v: run(q, k, v, None), in_specs=(qkv, qkv, qkv), out_specs=qkv,
                             check_vma=False)(q, k, v)
    return jax.shard_map(run, in_specs=(qkv, qkv, qkv, P(batch_axes, None)), out_specs=qkv,
                         check_vma=False)(q, k, v, key_mask)


def _dividing_axes(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...] | None:
    """The mesh axes among `names` (size > 1) whose product divides `size`, dropping from the end."""
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes or None


def _round_up(n: int) -> int:
    return -(-n // LANES) * LANES


def _block(padded_len: int) -> int:
    """The largest of MAX_BLOCK, MAX_BLOCK/2, ..., LANES dividing the padded length."""
    block = MAX_BLOCK
    while padded_len % block:
        block //= 2
    return block


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, q_len: int, kv_len: int, is_causal: bool, interpret: bool):
    """The splash kernel for padded lengths, built once per shape (building processes the mask).

    Its block tables become concrete arrays even when first asked for inside a trace (a shard_map
    would otherwise make them tracers of that trace, and the cache would leak them)."""
    bq, bkv = _block(q_len), _block(kv_len)
    one = masks.CausalMask((q_len, kv_len)) if is_causal else masks.FullMask((q_len, kv_len))
    sizes = kernels.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    with jax.ensure_compile_time_eval():
        return kernels.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                       q_seq_shards=1, interpret=interpret)


def _local_splash(q, k, v, key_mask, *, scale: float, is_causal: bool, interpret: bool) -> jax.Array:
    """`splash_attention` on one device's arrays (inside the shard_map when there is a mesh)."""
    (batch, lq, heads, dim), lk = q.shape, k.shape[1]
    lq_pad, lk_pad, dim_pad = _round_up(lq), _round_up(lk), _round_up(dim)

    def prepare(x, length):  # [B, L, H, D] → [B, H, L_pad, D_pad], zeros appended
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim_pad - dim)))
        return rearrange(x, "b l h d -> b h l d")

    qp = prepare(q * jnp.asarray(scale, q.dtype), lq_pad)
    kp, vp = prepare(k, lk_pad), prepare(v, lk_pad)
    kernel = _kernel(heads, lq_pad, lk_pad, is_causal, interpret)
    if key_mask is None and lk_pad == lk:
        out = jax.vmap(kernel)(qp, kp, vp)
    else:
        attend = jnp.ones((batch, lk), bool) if key_mask is None else key_mask
        ids = kernels.SegmentIds(q=jnp.ones((batch, lq_pad), jnp.int32),
                                 kv=jnp.pad(attend, ((0, 0), (0, lk_pad - lk))).astype(jnp.int32))
        out = jax.vmap(kernel)(qp, kp, vp, segment_ids=ids)
    out = rearrange(out[:, :, :lq, :dim], "b h l d -> b l h d")
    if key_mask is None:
        return out
    # a query with no key to attend gets the mean of v over the real keys; under causal masking
    # query i sees keys 0..i, so it has one when any of those is attended
    if is_causal:
        seen = jnp.cumsum(key_mask, axis=-1) > 0  # [B, Lk]: any of keys 0..j attended
        anything = seen[:, jnp.minimum(jnp.arange(lq), lk - 1)]  # [B, Lq]
    else:
        anything = jnp.broadcast_to(key_mask.any(axis=-1, keepdims=True), (batch, lq))
    return jnp.where(anything[:, :, None, None], out, jnp.mean(v, axis=1, keepdims=True).astype(out.dtype))
