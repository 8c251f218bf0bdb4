"""A nearest-neighbour 2× upsampling followed by a 3×3 convolution (stride 1, padding 1), computed at the
input's resolution: four 2×2 convolutions, one per output phase, interleaved.

Output pixel (2i + a, 2j + b) of conv3x3(upsample2x(x)) sees input rows i − 1, i, i for a = 0 (kernel rows
0, 1, 2) and rows i, i, i + 1 for a = 1: two distinct rows, whose kernel rows are summed — (K0, K1 + K2) at
offsets (−1, 0), or (K0 + K1, K2) at offsets (0, +1). The same holds for columns, so phase (a, b) is a 2×2
convolution of x with a folded kernel. That is 16 multiply-adds per input pixel and channel pair instead of
the upsampled conv's 36, the 4×-larger upsampled input is never made (nor saved for the backward), and the
upsampling's gradient — a sum over 2×2 blocks that XLA:CPU runs slowly (9 % of SD's VAE training step) —
becomes part of the four convolutions' input gradients. Same math as the upsampled conv, summed in another
order (within fp32 rounding). Where it runs: `conv_select.upsample_implementation`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ConvFn = Callable[[jax.Array, jax.Array, tuple[tuple[int, int], tuple[int, int]]], jax.Array]
"""(x [B, H, W, Cin], kernel [2, 2, Cin, Cout], padding) -> [B, H, W, Cout], stride 1."""


def _fold(kernel: jax.Array, phase: int, axis: int) -> tuple[jax.Array, tuple[int, int]]:
    """The 3 taps of `kernel` along `axis` folded to the 2 a phase sees, and that phase's padding."""
    k0, k1, k2 = (jax.lax.index_in_dim(kernel, i, axis, keepdims=True) for i in range(3))
    if phase == 0:  # input offsets −1, 0
        return jnp.concatenate([k0, k1 + k2], axis), (1, 0)
    return jnp.concatenate([k0 + k1, k2], axis), (0, 1)  # offsets 0, +1


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array, conv: ConvFn) -> jax.Array:
    """conv3x3(nearest_upsample_2x(x)) with padding 1: x [B, H, W, Cin], kernel [3, 3, Cin, Cout] →
    [B, 2H, 2W, Cout]. `conv` runs each phase's 2×2 convolution (a lowering `conv_select` picks)."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample2x_conv3x3: a 3×3 kernel, got {kernel.shape[:2]}")
    b, h, w, _ = x.shape
    rows = []
    for a in (0, 1):
        k_a, pad_h = _fold(kernel, a, 0)
        cols = []
        for c in (0, 1):
            k_ab, pad_w = _fold(k_a, c, 1)
            cols.append(conv(x, k_ab, (pad_h, pad_w)))
        rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (b), Cout]
    y = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), Cout]
    return y.reshape(b, 2 * h, 2 * w, kernel.shape[-1])
