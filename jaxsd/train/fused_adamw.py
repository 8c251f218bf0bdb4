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

`update(grads, state, params, *, grad_norm=None, apply=None)`: `grad_norm` is the
global gradient norm the caller already has (computed here when clipping needs it and
none is given); `apply` is a bool scalar, False = skip. Without the extra arguments it
is a plain optax AdamW (numerically `optax.adamw`, plus `clip_by_global_norm` in front
when `clip_grad_norm` is set).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsd.train.adamw8bit import QuantizedMoment, decode, quantize_blocks, zero_code


class FusedAdamWState(NamedTuple):
    count: jax.Array  # int32 []: applied (not skipped) updates
    mu: Any  # per param: fp32 array, or QuantizedMoment (8-bit moments, large params)
    nu: Any


def fused_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                weight_decay: float = 1e-4, mask: Any = None, clip_grad_norm: float | None = None,
                quantized_moments: bool = False, block_size: int = 2048,
                min_quantized_size: int = 4096) -> optax.GradientTransformationExtraArgs:
    """AdamW (decoupled weight decay on `mask`ed params) with optional global-norm clipping.

    quantized_moments: store m and v of params with ≥ `min_quantized_size` values as 8-bit
      blockwise dynamic codes (`jaxsd.train.adamw8bit`), blocks of `block_size`.
    mask: None (decay everything, as optax), a tree of bools, or a callable params → tree.
    """
    if quantized_moments and not 256 <= block_size <= 4096:
        raise ValueError(f"8-bit AdamW: block_size {block_size} outside 256..4096")
    lr_of = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def quantized(p) -> bool:
        return quantized_moments and p.size >= min_quantized_size

    def init_fn(params):
        def zeros(p, signed):
            if not quantized(p):
                return jnp.zeros(p.shape, jnp.float32)
            # the code of 0, written directly: quantising a zeros constant inside jit makes XLA
            # constant-fold the encoder over every value (minutes for SD1.5)
            blocks = -(-p.size // block_size)
            return QuantizedMoment(jnp.full((blocks, block_size), zero_code(signed), jnp.uint8),
                                   jnp.zeros((blocks,), jnp.float32))
        return FusedAdamWState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(lambda p: zeros(p, True), params),
                               nu=jax.tree.map(lambda p: zeros(p, False), params))

    def update_fn(grads, state, params=None, *, grad_norm=None, apply=None, **_):
        if params is None:
            raise ValueError("fused_adamw.update needs params (weight decay)")
        ok = jnp.asarray(True if apply is None else apply)
        scale = jnp.ones([], jnp.float32)
        if clip_grad_norm is not None:
            norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
            scale = jnp.where(norm < clip_grad_norm, 1.0, clip_grad_norm / norm)  # as optax.clip_by_global_norm
            scale = jnp.where(ok, scale, 0.0)  # a skipped step's norm may be NaN
        count = state.count + ok.astype(jnp.int32)
        n = jnp.maximum(count, 1)  # a skipped first step must not divide by 1 - b**0 = 0
        c1, c2 = 1 - b1 ** n, 1 - b2 ** n
        k1, k2 = jnp.where(ok, 1 - b1, 0.0), jnp.where(ok, 1 - b2, 0.0)
        keep1, keep2 = jnp.where(ok, b1, 1.0), jnp.where(ok, b2, 1.0)
        step_size = -jnp.where(ok, lr_of(state.count), 0.0)
        decay = _decay_flags(mask, params)

        coeffs = _Coefficients(ok, scale, k1, k2, keep1, keep2, c1, c2, step_size)

        def one(g, m, v, p, wd_on):
            if isinstance(m, QuantizedMoment):  # all in [blocks, block_size] layout, as the codes
                update = functools.partial(_quantized_blocks_update, co=coeffs, eps=eps,
                                           weight_decay=weight_decay if wd_on else 0.0)
                blocks, bs = m.codes.shape
                if p.size == blocks * bs and blocks >= 2 * _LOOP_ROWS:
                    return _row_loop(update, g.reshape(blocks, bs), m, v, p.reshape(blocks, bs), p.shape)
                ub, new_m, new_v = update(_blocks(g, bs), m, v, _blocks(p, bs))
                return _unblocks(ub, p.shape), new_m, new_v
            return _dense_update(g, m, v, p, coeffs, eps=eps, weight_decay=weight_decay if wd_on else 0.0)

        treedef = jax.tree.structure(grads)
        leaves = zip(*(treedef.flatten_up_to(t) for t in (grads, state.mu, state.nu, params, decay)), strict=True)
        out = [one(*leaf) for leaf in leaves]
        column = lambda i: treedef.unflatten([o[i] for o in out])
        return column(0), FusedAdamWState(count=count, mu=column(1), nu=column(2))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Coefficients(NamedTuple):
    """The step's scalars (f32 [] each; ok: bool []) for the 8-bit block update."""
    ok: jax.Array
    scale: jax.Array
    k1: jax.Array
    k2: jax.Array
    keep1: jax.Array
    keep2: jax.Array
    c1: jax.Array
    c2: jax.Array
    step_size: jax.Array


# jitted, as `_quantized_blocks_update`: one trace per param shape instead of ~15 jnp ops per
# param (SD1.5: 686 params; their tracing was ~1 s of the step's lowering)
@functools.partial(jax.jit, static_argnames=("weight_decay", "eps"))
def _dense_update(g: jax.Array, m: jax.Array, v: jax.Array, p: jax.Array, co: _Coefficients, *,
                  weight_decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One param with fp32 moments (any shape): gradient, moments, param → update, new moments."""
    g = jnp.where(co.ok, g.astype(jnp.float32), 0.0) * co.scale
    mf = co.k1 * g + co.keep1 * m
    vf = co.k2 * (g * g) + co.keep2 * v
    u = (mf / co.c1) / (jnp.sqrt(vf / co.c2) + eps)
    if weight_decay:
        u = u + weight_decay * p
    return (co.step_size * u).astype(p.dtype), mf, vf


# jitted so that every call with the same block shapes reuses one trace: SD1.5 has ~400 quantised
# params and ~250 loops over [64, 2048] chunks, whose tracing dominated the step's lowering time
@functools.partial(jax.jit, static_argnames=("weight_decay", "eps"))
def _quantized_blocks_update(gb: jax.Array, m: QuantizedMoment, v: QuantizedMoment, pb: jax.Array,
                             co: _Coefficients, *, weight_decay: float, eps: float,
                             ) -> tuple[jax.Array, QuantizedMoment, QuantizedMoment]:
    """Rows of [blocks, block_size]: gradient, both moments, param → update, new moments."""
    gb = jnp.where(co.ok, gb.astype(jnp.float32), 0.0) * co.scale
    mf = co.k1 * gb + co.keep1 * (decode(m.codes, True) * m.absmax[:, None])
    vf = co.k2 * (gb * gb) + co.keep2 * (decode(v.codes, False) * v.absmax[:, None])
    u = (mf / co.c1) / (jnp.sqrt(vf / co.c2) + eps)
    if weight_decay:
        u = u + weight_decay * pb
    return (co.step_size * u).astype(pb.dtype), _store(mf, m, True, co.ok), _store(vf, v, False, co.ok)


def _store(new_blocks: jax.Array, old: QuantizedMoment, signed: bool, ok: jax.Array) -> QuantizedMoment:
    q = quantize_blocks(new_blocks, signed)
    return QuantizedMoment(jnp.where(ok, q.codes, old.codes), jnp.where(ok, q.absmax, old.absmax))


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-2, mask: Any = None, block_size: int = 2048, min_quantized_size: int = 4096,
               clip_grad_norm: float | None = None) -> optax.GradientTransformationExtraArgs:
    """AdamW with 8-bit blockwise-quantised moments; params smaller than `min_quantized_size` keep
    fp32 moments (their bytes don't matter, and biases/norm scales are the most sensitive)."""
    return fused_adamw(learning_rate, b1, b2, eps, weight_decay, mask, clip_grad_norm, quantized_moments=True,
                       block_size=block_size, min_quantized_size=min_quantized_size)


# Quantised params of at least 2 × this many blocks are updated by a loop over row chunks of
# this many blocks (2048 values each): XLA:CPU otherwise computed every param's fp32 moments
# at once (SD1.5: 10.5 GB of temporaries; optimization barriers do not survive its scheduler).
_LOOP_ROWS = 64


def _row_loop(blocks_update: Callable, gb: jax.Array, m: QuantizedMoment, v: QuantizedMoment, pb: jax.Array,
              shape: tuple[int, ...]) -> tuple[jax.Array, QuantizedMoment, QuantizedMoment]:
    """`blocks_update(g, m, v, p)` over chunks of `_LOOP_ROWS` rows, the results written in place;
    the update goes into the gradient's buffer (each chunk of it is read before it is overwritten)."""
    rows = gb.shape[0]

    def chunk(start, size, carry):
        u, mc, ma, vc, va = carry
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, 0)
        du, dm, dv = blocks_update(take(u), QuantizedMoment(take(mc), take(ma)),
                                   QuantizedMoment(take(vc), take(va)), take(pb))
        put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, start, 0)
        return put(u, du), put(mc, dm.codes), put(ma, dm.absmax), put(vc, dv.codes), put(va, dv.absmax)

    full = rows // _LOOP_ROWS
    carry = jax.lax.fori_loop(0, full, lambda i, c: chunk(i * _LOOP_ROWS, _LOOP_ROWS, c),
                              (gb.astype(pb.dtype), m.codes, m.absmax, v.codes, v.absmax))
    if rows % _LOOP_ROWS:
        carry = chunk(full * _LOOP_ROWS, rows % _LOOP_ROWS, carry)
    u, mc, ma, vc, va = carry
    return u.reshape(shape), QuantizedMoment(mc, ma), QuantizedMoment(vc, va)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = x.reshape(-1)
    return jnp.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)


def _unblocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def _decay_flags(mask: Any, params: Any) -> Any:
    """A tree of Python bools (static) saying which params get weight decay."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    tree = mask(params) if isinstance(mask, Callable) else mask
    return jax.tree.map(bool, tree)
