"""Token merging for Stable Diffusion (ToMe for SD, arXiv 2303.17604) inside the UNet's transformer blocks.

Before a block's attention (and optionally its cross-attention and MLP), the tokens of a
level are split into a dst set (one token per `sy × sx` cell of the latent grid) and a
src set (the rest); each src token is matched to its most similar dst token (cosine
similarity of the block's input), and the `r` src tokens with the best matches are
averaged into their dst token. The block's sub-layer then runs on N - r tokens and its
output is copied back to all N positions ("unmerge"): merged src tokens take their dst
token's output.

Everything is static-shaped: `r` is a Python int from the ratio and the token count, and
the dst set always has one token per cell, so a merged block compiles once; only which
tokens are merged (and, with `use_rand`, which token of each cell is dst) is traced.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsd.models.token_merging_settings import TokenMerging


def merges_at(latent_hw: tuple[int, int], tokens: int, max_downsample: int) -> bool:
    """Whether a level of `tokens` tokens is downsampled at most `max_downsample` times from the
    UNet's (H, W) input — tomesd's rounding, so odd latent sizes decide as it does."""
    height, width = latent_hw
    return math.ceil(math.sqrt((height * width) // tokens)) <= max_downsample


class MergePlan(NamedTuple):
    """Which tokens merge where, per batch element (all int32 token indices into the N input tokens).

    keep [B, N-Nd-r]: unmerged src tokens.  dst [Nd]: dst tokens.  src [B, r]: merged src tokens.
    into [B, r]: each merged src token's dst slot (0..Nd-1).  restore [B, N]: for each input
    position, its row in concat(kept, dst, src-as-their-dst) — the unmerge gather.
    """

    keep: jax.Array
    dst: jax.Array
    src: jax.Array
    into: jax.Array
    restore: jax.Array


def _dst_mask(grid: tuple[int, int], sx: int, sy: int, key: jax.Array | None) -> jax.Array:
    """bool [h·w]: the dst tokens, one per whole sy × sx cell (partial cells at the edges are all src)."""
    h, w = grid
    hsy, wsx = h // sy, w // sx
    if key is None:
        choice = jnp.zeros((hsy, wsx), jnp.int32)
    else:
        choice = jax.random.randint(key, (hsy, wsx), 0, sy * sx)
    cells = jax.nn.one_hot(choice, sy * sx, dtype=jnp.bool_).reshape(hsy, wsx, sy, sx)
    mask = cells.transpose(0, 2, 1, 3).reshape(hsy * sy, wsx * sx)
    mask = jnp.pad(mask, ((0, h - hsy * sy), (0, w - wsx * sx)))
    return mask.reshape(h * w)


def merge_count(tokens: int, grid: tuple[int, int], tm: TokenMerging) -> int:
    """r: tokens removed at a level (the ratio of all tokens, at most the src count)."""
    num_dst = (grid[0] // tm.sy) * (grid[1] // tm.sx)
    return min(int(tokens * tm.ratio), tokens - num_dst)


def plan_merge(metric: jax.Array, grid: tuple[int, int], tm: TokenMerging, r: int,
               key: jax.Array | None) -> MergePlan:
    """Bipartite soft matching of `metric` [B, N, C] (N = h·w of `grid`): the r best-matched src tokens
    merge into their most similar dst token. key: None = top-left dst of each cell, else random dst."""
    b, n, _ = metric.shape
    num_dst = (grid[0] // tm.sy) * (grid[1] // tm.sx)
    # dst tokens first, then src, each in raster order (a stable sort of "not dst")
    order = jnp.argsort(~_dst_mask(grid, tm.sx, tm.sy, key), stable=True).astype(jnp.int32)
    dst_idx, src_all = order[:num_dst], order[num_dst:]
    unit = metric.astype(jnp.float32)
    unit = unit / jnp.linalg.norm(unit, axis=-1, keepdims=True)
    scores = jnp.einsum("bsc,bdc->bsd", unit[:, src_all], unit[:, dst_idx])  # [B, Ns, Nd]
    best = jnp.max(scores, axis=-1)
    best_dst = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    ranked = jnp.argsort(-best, axis=-1, stable=True).astype(jnp.int32)  # src slots, best match first
    src_slot, keep_slot = ranked[:, :r], ranked[:, r:]
    keep = src_all[keep_slot]
    src = src_all[src_slot]
    into = jnp.take_along_axis(best_dst, src_slot, axis=1)
    # rows of concat(kept [N-Nd-r], dst [Nd], merged src as the row of its dst) for every input position
    positions = jnp.concatenate([keep, jnp.broadcast_to(dst_idx, (b, num_dst)), src], axis=1)
    rows = jnp.concatenate([jnp.broadcast_to(jnp.arange(n - num_dst - r, dtype=jnp.int32), keep.shape),
                            jnp.broadcast_to(n - num_dst - r + jnp.arange(num_dst, dtype=jnp.int32), (b, num_dst)),
                            n - num_dst - r + into], axis=1)
    restore = jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], positions].set(rows)
    return MergePlan(keep, dst_idx, src, into, restore)


def merge(x: jax.Array, plan: MergePlan) -> jax.Array:
    """[B, N, C] → [B, N - r, C]: kept src tokens, then each dst token averaged with the src merged into it."""
    kept = jnp.take_along_axis(x, plan.keep[..., None], axis=1)
    dst = x[:, plan.dst].astype(jnp.float32)
    src = jnp.take_along_axis(x, plan.src[..., None], axis=1).astype(jnp.float32)
    batch = jnp.arange(x.shape[0])[:, None]
    total = dst.at[batch, plan.into].add(src)
    count = jnp.ones(dst.shape[:2], jnp.float32).at[batch, plan.into].add(1.0)
    return jnp.concatenate([kept, (total / count[..., None]).astype(x.dtype)], axis=1)


def unmerge(y: jax.Array, plan: MergePlan) -> jax.Array:
    """[B, N - r, C] → [B, N, C]: every token back in place; merged src tokens copy their dst's row."""
    return jnp.take_along_axis(y, plan.restore[..., None], axis=1)


_TOME_STREAM = 0x546F4D65


def timestep_key(timesteps: jax.Array) -> jax.Array:
    """The key of `use_rand`'s dst choice in one UNet call: drawn from the call's timesteps [B], so it
    changes from step to step (as tomesd's generator advances) while one call — and the same inputs
    in a jitted loop — always sees the same choice. No key argument reaches the UNet for it."""
    bits = jax.lax.bitcast_convert_type(timesteps.astype(jnp.float32), jnp.uint32)
    return jax.random.fold_in(jax.random.key(_TOME_STREAM), jnp.sum(bits, dtype=jnp.uint32))
