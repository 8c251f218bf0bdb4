"""AdamW as one fused pass per param, with the train step's gradient clipping and NaN skip folded in.

`optax.chain(clip_by_global_norm, adamw)` followed by "keep the old state if the loss
or gradient was not finite" (a select over params and moments) is the textbook way to
write the trainer's update, and XLA turns it into whole-model temporaries: the clipped
gradients and the not-yet-selected new state are separate buffers. On SD1.5 (860M
params, fp32) that is 7.2 GB of XLA temporaries on top of params + moments; this
formulation needs 3.8 GB, the gradients themselves (`bench/` memory analysis).

How the skip stays exact without selects: on a skipped step the moment decays become 1
and the gradient weights, the learning rate and the count increment 0, so every buffer
is rewritten with its own value (x·1 + 0·0 = x for finite x; non-finite gradients are
zeroed first). With 8-bit moments a re-quantised moment is not bit-identical to the
stored one, so there the uint8 codes are selected (¼ of the bytes).

8-bit moments are packed (`jaxsd.train.block_groups`): the params' blocks share a few flat
buffers, each updated by one loop over uniform chunks — XLA compiles the 8-bit arithmetic once
per group instead of once per param (SD1.5, the update alone: 196 → 60 s of XLA compile; the
same codes and params bit for bit).

`update(grads, state, params, *, grad_norm=None, apply=None)`: `grad_norm` is the
global gradient norm the caller already has (computed here when clipping needs it and
none is given); `apply` is a bool scalar, False = skip. Without the extra arguments it
is a plain optax AdamW (numerically `optax.adamw`, plus `clip_by_global_norm` in front
when `clip_grad_norm` is set).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsd.train.adamw8bit import QuantizedMoment, decode, dequantize, quantize_blocks, zero_code
from jaxsd.train.block_groups import CHUNK_ROWS, Group, find_slot, gather, plan_groups, scatter


class FusedAdamWState(NamedTuple):
    count: jax.Array  # int32 []: applied (not skipped) updates
    mu: Any  # per param: fp32 array
    nu: Any


class PackedAdamWState(NamedTuple):
    """8-bit AdamW's state: fp32 moments of small params, 8-bit moments of the others packed in groups."""
    count: jax.Array  # int32 []: applied (not skipped) updates
    mu: Any  # per param: fp32 array, or None when its moments are 8-bit (then they are in mu_blocks)
    nu: Any
    # one QuantizedMoment per group of params (`jaxsd.train.block_groups`): codes uint8 [rows, block_size],
    # absmax f32 [rows]
    mu_blocks: tuple
    nu_blocks: tuple


def fused_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                weight_decay: float = 1e-4, mask: Any = None, clip_grad_norm: float | None = None,
                quantized_moments: bool = False, block_size: int = 2048,
                min_quantized_size: int = 4096, group_values: int | None = None,
                ) -> optax.GradientTransformationExtraArgs:
    """AdamW (decoupled weight decay on `mask`ed params) with optional global-norm clipping.

    quantized_moments: store m and v of params with ≥ `min_quantized_size` values as 8-bit
      blockwise dynamic codes (`jaxsd.train.adamw8bit`), blocks of `block_size`, packed in
      groups of up to `group_values` values (`jaxsd.train.block_groups`; None = its default).
    mask: None (decay everything, as optax), a tree of bools, or a callable params → tree.
    """
    if quantized_moments and not 256 <= block_size <= 4096:
        raise ValueError(f"8-bit AdamW: block_size {block_size} outside 256..4096")
    lr_of = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def groups_of(leaves) -> list[Group]:
        flags = [quantized_moments and x.size >= min_quantized_size for x in leaves]
        return plan_groups([tuple(x.shape) for x in leaves], flags, block_size, group_values)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        groups = groups_of(leaves)
        packed = {s.leaf for g in groups for s in g.slots}
        zeros = lambda: treedef.unflatten([None if i in packed else jnp.zeros(p.shape, jnp.float32)
                                           for i, p in enumerate(leaves)])
        # the code of 0, written directly: quantising a zeros constant inside jit makes XLA
        # constant-fold the encoder over every value (minutes for SD1.5)
        codes = lambda signed: tuple(QuantizedMoment(jnp.full((g.rows, block_size), zero_code(signed), jnp.uint8),
                                                     jnp.zeros((g.rows,), jnp.float32)) for g in groups)
        if not quantized_moments:
            return FusedAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())
        return PackedAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(),
                                mu_blocks=codes(True), nu_blocks=codes(False))

    def update_fn(grads, state, params=None, *, grad_norm=None, apply=None, **_):
        if params is None:
            raise ValueError("fused_adamw.update needs params (weight decay)")
        ok = jnp.asarray(True if apply is None else apply)
        scale = jnp.ones([], jnp.float32)
        if clip_grad_norm is not None:
            norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
            scale = jnp.where(norm < clip_grad_norm, 1.0, clip_grad_norm / norm)  # as optax.clip_by_global_norm
            scale = jnp.where(ok, scale, 0.0)  # a skipped step's norm may be NaN
        count, co = step_coefficients(state.count, ok, scale, lr_of(state.count), b1, b2)

        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves, mu, nu, decay = (treedef.flatten_up_to(t) for t in (params, state.mu, state.nu,
                                                                      _decay_flags(mask, params)))
        wd = [weight_decay if d else 0.0 for d in decay]
        groups = groups_of(p_leaves)
        updates, new_mu, new_nu = [None] * len(g_leaves), list(mu), list(nu)
        packed = {s.leaf for g in groups for s in g.slots}
        for i, (g, p) in enumerate(zip(g_leaves, p_leaves, strict=True)):
            if i not in packed:
                updates[i], new_mu[i], new_nu[i] = dense_update(g, mu[i], nu[i], p, co, eps=eps, weight_decay=wd[i])
        if not quantized_moments:
            return treedef.unflatten(updates), FusedAdamWState(count, treedef.unflatten(new_mu),
                                                               treedef.unflatten(new_nu))
        mu_blocks, nu_blocks = [], []
        for group, m, v in zip(groups, state.mu_blocks, state.nu_blocks, strict=True):
            directions, m, v = _group_update(gather(group, g_leaves, block_size), m, v, co, eps=eps)
            for i, d in scatter(group, directions).items():
                updates[i] = _apply_step(d, p_leaves[i], co.step_size, weight_decay=wd[i])
            mu_blocks.append(m)
            nu_blocks.append(v)
        return treedef.unflatten(updates), PackedAdamWState(count, treedef.unflatten(new_mu),
                                                            treedef.unflatten(new_nu), tuple(mu_blocks),
                                                            tuple(nu_blocks))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def moments(state: FusedAdamWState | PackedAdamWState, params: Any, block_size: int = 2048, min_quantized_size: int = 4096,
            group_values: int | None = None) -> tuple[Any, Any]:
    """(m, v): fp32 trees like `params`, 8-bit moments dequantised (for tests and inspection; the
    arguments as given to `fused_adamw`)."""
    leaves, treedef = jax.tree.flatten(params)
    packed = isinstance(state, PackedAdamWState)
    flags = [packed and x.size >= min_quantized_size for x in leaves]
    groups = plan_groups([tuple(x.shape) for x in leaves], flags, block_size, group_values)
    out = []
    for tree, blocks, signed in ((state.mu, getattr(state, "mu_blocks", ()), True),
                                 (state.nu, getattr(state, "nu_blocks", ()), False)):
        dense = treedef.flatten_up_to(tree)
        values = []
        for i, x in enumerate(dense):
            if x is None:
                gi, slot = find_slot(groups, i)
                q = blocks[gi]
                rows = slice(slot.row, slot.row + slot.rows)
                x = dequantize(QuantizedMoment(q.codes[rows], q.absmax[rows]), slot.shape, signed)
            values.append(x)
        out.append(treedef.unflatten(values))
    return out[0], out[1]


class Coefficients(NamedTuple):
    """The step's scalars (f32 [] each; ok: bool [])."""
    ok: jax.Array
    scale: jax.Array
    k1: jax.Array
    k2: jax.Array
    keep1: jax.Array
    keep2: jax.Array
    c1: jax.Array
    c2: jax.Array
    step_size: jax.Array


def step_coefficients(count: jax.Array, ok: jax.Array, scale: jax.Array, lr: jax.Array, b1: float, b2: float,
                      ) -> tuple[jax.Array, Coefficients]:
    """(the new count, the step's scalars): count int32 [] applied updates so far, ok bool [] (False = skip),
    scale f32 [] the clipping factor, lr f32 [] the learning rate at `count`."""
    new_count = count + ok.astype(jnp.int32)
    n = jnp.maximum(new_count, 1)  # a skipped first step must not divide by 1 - b**0 = 0
    c1, c2 = 1 - b1 ** n, 1 - b2 ** n
    k1, k2 = jnp.where(ok, 1 - b1, 0.0), jnp.where(ok, 1 - b2, 0.0)
    keep1, keep2 = jnp.where(ok, b1, 1.0), jnp.where(ok, b2, 1.0)
    return new_count, Coefficients(ok, scale, k1, k2, keep1, keep2, c1, c2, -jnp.where(ok, lr, 0.0))


# jitted: one trace per param shape instead of ~15 jnp ops per param (SD1.5: 686 params; their
# tracing was ~1 s of the step's lowering)
@functools.partial(jax.jit, static_argnames=("weight_decay", "eps"))
def dense_update(g: jax.Array, m: jax.Array, v: jax.Array, p: jax.Array, co: Coefficients, *,
                  weight_decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One param with fp32 moments (any shape): gradient, moments, param → update, new moments."""
    g = jnp.where(co.ok, g.astype(jnp.float32), 0.0) * co.scale
    mf = co.k1 * g + co.keep1 * m
    vf = co.k2 * (g * g) + co.keep2 * v
    u = (mf / co.c1) / (jnp.sqrt(vf / co.c2) + eps)
    if weight_decay:
        u = u + weight_decay * p
    return (co.step_size * u).astype(_update_dtype(p)), mf, vf


def _update_dtype(p: jax.Array) -> Any:
    """The update's dtype: fp32 also for bfloat16 params, whose update is rounded stochastically into
    them (jaxsd/train/rounding.py): a bf16 update would already have lost its low bits."""
    return jnp.promote_types(p.dtype, jnp.float32)


@functools.partial(jax.jit, static_argnames=("weight_decay",))
def _apply_step(direction: jax.Array, p: jax.Array, step_size: jax.Array, *, weight_decay: float) -> jax.Array:
    """An 8-bit param's update from its Adam direction m̂/(√v̂ + eps): as `dense_update` ends."""
    if weight_decay:
        direction = direction + weight_decay * p
    return (step_size * direction).astype(_update_dtype(p))


@functools.partial(jax.jit, static_argnames=("eps",))
def _group_update(gb: jax.Array, m: QuantizedMoment, v: QuantizedMoment, co: Coefficients, *, eps: float,
                  ) -> tuple[jax.Array, QuantizedMoment, QuantizedMoment]:
    """A group's gradients gb (f32 [rows, block_size]) and 8-bit moments → Adam directions (written
    into gb's buffer: each chunk is read before it is overwritten), new moments; one loop over chunks
    of CHUNK_ROWS rows (and the remaining rows after it), the results written in place."""

    def chunk(start, size, carry):
        u, mc, ma, vc, va = carry
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, 0)
        du, dm, dv = _blocks_direction(take(u), QuantizedMoment(take(mc), take(ma)),
                                       QuantizedMoment(take(vc), take(va)), co, eps)
        put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, start, 0)
        return put(u, du), put(mc, dm.codes), put(ma, dm.absmax), put(vc, dv.codes), put(va, dv.absmax)

    rows = gb.shape[0]
    carry = (gb, m.codes, m.absmax, v.codes, v.absmax)
    if rows >= CHUNK_ROWS:
        carry = jax.lax.fori_loop(0, rows // CHUNK_ROWS, lambda i, c: chunk(i * CHUNK_ROWS, CHUNK_ROWS, c), carry)
    if rows % CHUNK_ROWS:  # the last rows of the group: a second copy of the body, of their size
        carry = chunk(rows - rows % CHUNK_ROWS, rows % CHUNK_ROWS, carry)
    u, mc, ma, vc, va = carry
    return u, QuantizedMoment(mc, ma), QuantizedMoment(vc, va)


def _blocks_direction(gb: jax.Array, m: QuantizedMoment, v: QuantizedMoment, co: Coefficients, eps: float,
                      ) -> tuple[jax.Array, QuantizedMoment, QuantizedMoment]:
    """Rows of [blocks, block_size]: f32 gradient, both moments → m̂/(√v̂ + eps), new moments."""
    gb = jnp.where(co.ok, gb, 0.0) * co.scale
    mf = co.k1 * gb + co.keep1 * (decode(m.codes, True) * m.absmax[:, None])
    vf = co.k2 * (gb * gb) + co.keep2 * (decode(v.codes, False) * v.absmax[:, None])
    u = (mf / co.c1) / (jnp.sqrt(vf / co.c2) + eps)
    return u, _store(mf, m, True, co.ok), _store(vf, v, False, co.ok)


def _store(new_blocks: jax.Array, old: QuantizedMoment, signed: bool, ok: jax.Array) -> QuantizedMoment:
    q = quantize_blocks(new_blocks, signed)
    return QuantizedMoment(jnp.where(ok, q.codes, old.codes), jnp.where(ok, q.absmax, old.absmax))


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-2, mask: Any = None, block_size: int = 2048, min_quantized_size: int = 4096,
               clip_grad_norm: float | None = None, group_values: int | None = None,
               ) -> optax.GradientTransformationExtraArgs:
    """AdamW with 8-bit blockwise-quantised moments; params smaller than `min_quantized_size` keep
    fp32 moments (their bytes don't matter, and biases/norm scales are the most sensitive)."""
    return fused_adamw(learning_rate, b1, b2, eps, weight_decay, mask, clip_grad_norm, quantized_moments=True,
                       block_size=block_size, min_quantized_size=min_quantized_size, group_values=group_values)


def _decay_flags(mask: Any, params: Any) -> Any:
    """A tree of Python bools (static) saying which params get weight decay."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    tree = mask(params) if isinstance(mask, Callable) else mask
    return jax.tree.map(bool, tree)
