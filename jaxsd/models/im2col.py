"""A 2-D convolution as im2col + one matmul: the CPU lowering `conv_select` picks for wide convs.

Same result as `lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))`
(the same products, summed in another order: within fp32 rounding). Why and when: conv_select.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def conv_output_hw(hw: tuple[int, int], kernel_hw: tuple[int, int], stride: int,
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an [H, W] input, as XLA computes it (no dilation)."""
    return tuple((n + lo + hi - k) // stride + 1 for n, k, (lo, hi) in zip(hw, kernel_hw, padding))


def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int,
                padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """x [B, H, W, Cin] conv kernel [kh, kw, Cin, Cout] → [B, Ho, Wo, Cout].

    The padded input's kh·kw shifted (strided) windows, concatenated on channels in (i, j, c)
    order — the order of the HWIO kernel flattened to [kh·kw·Cin, Cout] — times that matrix.
    The patch matrix [B·Ho·Wo, kh·kw·Cin] is kh·kw times the input (at stride 1).
    """
    kh, kw, cin, cout = kernel.shape
    b = x.shape[0]
    ho, wo = conv_output_hw(x.shape[1:3], (kh, kw), stride, padding)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    windows = [jax.lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin),
                             (1, stride, stride, 1))
               for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(windows, axis=-1).reshape(b * ho * wo, kh * kw * cin)
    # one 2-D matmul: its two gradients are plain matmuls on XLA:CPU (see layers.matmul_last_axis)
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout)).reshape(b, ho, wo, cout)
