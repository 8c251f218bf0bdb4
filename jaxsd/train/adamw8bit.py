"""The 8-bit moment storage of 8-bit AdamW (`jaxsd.train.fused_adamw.adamw_8bit`): blockwise dynamic
quantisation (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Each moment of a param is flattened, padded and cut into blocks of `block_size`
values; a block stores one fp32 absmax and one uint8 code per value, the code
indexing a 256-entry *dynamic* quantisation map whose values are spread over
seven decades (10⁻⁶…1), so small moments keep relative precision where a linear
8-bit grid would round them to zero. The first moment uses a signed map, the
second (never negative) an unsigned one with twice the resolution. State bytes
per value: 1 + 4/block_size, vs 4 for fp32 — ≈4× smaller.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The dynamic map, in closed form. Magnitudes are spread over seven decades: decade
# e = 0..6 covers (0.1, 1]·10^(e-6) with n0·2^e values at the centres of equal-width bins,
# n0 = 1 (signed: a sign bit is spent) or 2 (unsigned). Magnitude index j counts them upwards
# from the smallest. Codes: signed 0..126 = −magnitude(126−j), 127 = 0, 128..254 =
# +magnitude(j−128), 255 = +1; unsigned 0 = 0, 1..254 = magnitude(j−1), 255 = 1. The table is
# never indexed: XLA's CPU gathers cost ~100 ns per element, seconds per step on SD1.5's
# 860M-value moments, so encoding and decoding are arithmetic that fuses with the Adam update.
_DECADES = 7


def _n0(signed: bool) -> int:
    return 1 if signed else 2


_DECADE_FLOORS = [np.float32(10.0 ** (e - _DECADES)) for e in range(_DECADES)]  # decade e's lower edge


def _value(e: jax.Array, i: jax.Array, n0: int) -> jax.Array:
    """Magnitude i (0 ≤ i < n0·2^e) of decade e (int32 arrays), fp32. Selects and one
    multiply-add — no gathers, no transcendentals — and the one formula encoder and decoder share."""
    n = (n0 * jnp.left_shift(1, e)).astype(jnp.float32)
    return _decade_floor(e) * (1.0 + 9.0 * (i.astype(jnp.float32) + 0.5) / n)


def _decade_floor(e: jax.Array) -> jax.Array:
    lo = jnp.full(e.shape, _DECADE_FLOORS[0])
    for m in range(1, _DECADES):
        lo = jnp.where(e >= m, _DECADE_FLOORS[m], lo)
    return lo


def _magnitude(j: jax.Array, signed: bool) -> jax.Array:
    """fp32 value of magnitude index j (int32, 0 ≤ j < n0·(2^7 − 1))."""
    n0 = _n0(signed)
    k = j // n0 + 1  # ∈ [2^e, 2^(e+1))
    e = sum((k >= 2 ** m).astype(jnp.int32) for m in range(1, _DECADES))
    return _value(e, j - n0 * (jnp.left_shift(1, e) - 1), n0)


def decode(codes: jax.Array, signed: bool) -> jax.Array:
    """fp32 map value of each uint8 code (any shape)."""
    c = codes.astype(jnp.int32)
    if signed:
        j = jnp.where(c >= 128, c - 128, 126 - c)
        v = jnp.where(c >= 128, 1.0, -1.0) * _magnitude(jnp.clip(j, 0, 126), True)
        return jnp.where(c == 127, 0.0, jnp.where(c == 255, 1.0, v))
    v = _magnitude(jnp.clip(c - 1, 0, 253), False)
    return jnp.where(c == 0, 0.0, jnp.where(c == 255, 1.0, v))


def _nearest_code(x: jax.Array, signed: bool) -> jax.Array:
    """uint8 code of the map value nearest each x ∈ [−1, 1] ([0, 1] unsigned), up to float rounding.

    In decade e (floor lo, n equal-width bins) the nearest value is the centre of the bin
    holding x, except just above lo, where the previous decade's top value (at lo·(1 − 0.9/n),
    its bins being half as many and ten times narrower) is nearer below lo·(1 + 1.8/n). The
    next decade's first value is never nearer. ~25 elementwise ops: cheap to run and to compile.
    """
    n0 = _n0(signed)
    y = jnp.abs(x)
    e = sum((y >= f).astype(jnp.int32) for f in _DECADE_FLOORS[1:])
    lo = _decade_floor(e)
    n = n0 * jnp.left_shift(1, e)
    nf = n.astype(jnp.float32)
    i = jnp.clip(jnp.floor((y / lo - 1.0) * nf / 9.0).astype(jnp.int32), 0, n - 1)
    down = (i == 0) & (e > 0) & (y < lo * (1.0 + 1.8 / nf))
    j = n0 * (jnp.left_shift(1, e) - 1) + i - down.astype(jnp.int32)
    is_zero = y < _ZERO_BELOW[signed]
    is_one = x > _ONE_ABOVE[signed]  # +1 only: the signed map has no −1
    if signed:
        code = jnp.where(is_zero, zero_code(True), jnp.where(x < 0, 126 - j, 128 + j))
    else:
        code = jnp.where(is_zero, zero_code(False), j + 1)
    return jnp.where(is_one, 255, code).astype(jnp.uint8)


# midpoints between 0 and the smallest magnitude, and between the largest magnitude and 1
_ZERO_BELOW = {s: np.float32(_DECADE_FLOORS[0] * (1 + 4.5 / _n0(s)) / 2) for s in (True, False)}
_ONE_ABOVE = {s: np.float32((0.1 * (10 - 4.5 / (_n0(s) * 2 ** (_DECADES - 1))) + 1) / 2) for s in (True, False)}


def zero_code(signed: bool) -> int:
    """The code of 0.0."""
    return 127 if signed else 0


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 map values in code order (float32): sorted, in [−1, 1] (signed) or [0, 1] (unsigned)."""
    return np.asarray(decode(jnp.arange(256, dtype=jnp.uint8), signed))


class QuantizedMoment(NamedTuple):
    """One moment of one param: codes uint8 [num_blocks, block_size], absmax float32 [num_blocks]."""

    codes: jax.Array
    absmax: jax.Array


def quantize(x: jax.Array, block_size: int, signed: bool) -> QuantizedMoment:
    """Blockwise dynamic quantisation of any-shaped fp32 x (flattened, zero-padded to whole blocks)."""
    flat = x.reshape(-1).astype(jnp.float32)
    pad = -flat.size % block_size
    return quantize_blocks(jnp.pad(flat, (0, pad)).reshape(-1, block_size), signed)


def quantize_blocks(blocks: jax.Array, signed: bool) -> QuantizedMoment:
    """`quantize` of fp32 values already laid out as [num_blocks, block_size]."""
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    return QuantizedMoment(_nearest_code(normed, signed), absmax)


def dequantize(q: QuantizedMoment, shape: tuple[int, ...], signed: bool) -> jax.Array:
    """Inverse of `quantize`: fp32 array of `shape`."""
    blocks = decode(q.codes, signed) * q.absmax[:, None]
    size = int(np.prod(shape))
    return blocks.reshape(-1)[:size].reshape(shape)


def state_bytes(opt_state: Any) -> int:
    """Total bytes of an optimizer state's arrays (for the ≈4× claim)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype"))
