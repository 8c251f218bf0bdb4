"""The CPU lowerings `conv_select` picks for 2-D convolutions other than plain XLA.

`conv_im2col`: the whole conv as im2col + one matmul (wide, low-resolution convs).
`conv_taps`: XLA's convolution forward and input gradient, the kernel gradient as kh·kw matmuls, one
per kernel tap (the rest).
Both give `lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))` and its
gradients (the same products, summed in another order: within fp32 rounding). Why and when:
conv_select.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal

Padding = tuple[tuple[int, int], tuple[int, int]]


def conv_output_hw(hw: tuple[int, int], kernel_hw: tuple[int, int], stride: int,
                   padding: Padding) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an [H, W] input, as XLA computes it (no dilation)."""
    return tuple((n + lo + hi - k) // stride + 1 for n, k, (lo, hi) in zip(hw, kernel_hw, padding))


def _windows(x: jax.Array, kernel_hw: tuple[int, int], stride: int, padding: Padding) -> list[jax.Array]:
    """x [B, H, W, Cin] → the padded input's kh·kw shifted (strided) windows, each [B, Ho, Wo, Cin],
    in (i, j) order: window (i, j) holds what kernel tap (i, j) multiplies at every output position."""
    kh, kw = kernel_hw
    b, cin = x.shape[0], x.shape[-1]
    ho, wo = conv_output_hw(x.shape[1:3], kernel_hw, stride, padding)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    return [jax.lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin),
                          (1, stride, stride, 1))
            for i in range(kh) for j in range(kw)]


def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """x [B, H, W, Cin] conv kernel [kh, kw, Cin, Cout] → [B, Ho, Wo, Cout].

    The kh·kw windows concatenated on channels in (i, j, c) order — the order of the HWIO kernel
    flattened to [kh·kw·Cin, Cout] — times that matrix. The patch matrix [B·Ho·Wo, kh·kw·Cin] is
    kh·kw times the input (at stride 1).
    """
    kh, kw, cin, cout = kernel.shape
    b = x.shape[0]
    ho, wo = conv_output_hw(x.shape[1:3], (kh, kw), stride, padding)
    patches = jnp.concatenate(_windows(x, (kh, kw), stride, padding), axis=-1).reshape(b * ho * wo, kh * kw * cin)
    # one 2-D matmul: its two gradients are plain matmuls on XLA:CPU (see layers.matmul_last_axis)
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout)).reshape(b, ho, wo, cout)


def conv_xla(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """x [B, H, W, Cin] conv kernel [kh, kw, Cin, Cout] → [B, Ho, Wo, Cout]: XLA's convolution."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_taps(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """x [B, H, W, Cin] conv kernel [kh, kw, Cin, Cout] → [B, Ho, Wo, Cout], XLA's convolution; its
    kernel gradient is kh·kw matmuls (`_taps_bwd`), its input gradient XLA's.

    Not forward-differentiable (a custom_vjp): training needs only reverse mode.
    """
    return _conv_taps(x, kernel, stride, tuple(map(tuple, padding)), jax.ShapeDtypeStruct(x.shape, x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_taps(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
               x_type: jax.ShapeDtypeStruct) -> jax.Array:
    return conv_xla(x, kernel, stride, padding)


def _taps_fwd(x: CustomVJPPrimal, kernel: CustomVJPPrimal, stride: int, padding: Padding,
              x_type: jax.ShapeDtypeStruct):
    # x is kept only for a kernel gradient: a step that trains no kernel here (LoRA) saves what XLA's
    # own convolution would, and its backward is XLA's input gradient alone
    return conv_xla(x.value, kernel.value, stride, padding), (x.value if kernel.perturbed else None, kernel.value)


def _taps_bwd(stride: int, padding: Padding, x_type: jax.ShapeDtypeStruct,
              residuals: tuple[jax.Array | None, jax.Array], dy: jax.Array):
    """dy [B, Ho, Wo, Cout] → (dx [B, H, W, Cin], dkernel [kh, kw, Cin, Cout] or None when not trained).

    dkernel[i, j] = window(i, j)ᵀ · dy over the B·Ho·Wo positions: one [Cin, B·Ho·Wo] @ [B·Ho·Wo, Cout]
    matmul per tap, accumulated in fp32 whatever the input dtype. XLA:CPU runs the same reduction as a
    convolution whose "kernel" is the whole Ho×Wo image, 2–10× slower at ≥ 32² outputs and less exact
    (docs/benchmarks.md, "Convolutions on CPU"); one window alive at a time, not the 9× im2col matrix.
    A narrow conv (stride 1, kh·kw·Cout ≤ Cin) takes it as one matmul instead (`_kernel_grad_shifted_dy`).
    """
    x, kernel = residuals
    dx = jax.linear_transpose(lambda x: conv_xla(x, kernel, stride, padding), x_type)(dy)[0]
    if x is None:
        return dx, None
    kh, kw, cin, cout = kernel.shape
    if stride == 1 and kh * kw * cout <= cin:
        return dx, _kernel_grad_shifted_dy(x, dy, (kh, kw), padding).astype(kernel.dtype)
    dy2 = dy.reshape(-1, cout)
    taps = [jax.lax.dot_general(window.reshape(-1, cin), dy2, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
            for window in _windows(x, (kh, kw), stride, padding)]
    return dx, jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


def _kernel_grad_shifted_dy(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], padding: Padding) -> jax.Array:
    """The stride-1 kernel gradient [kh, kw, Cin, Cout] (fp32) as one matmul when dy is the narrow side.

    dkernel[i, j] = Σ_q xp[q] ⊗ dy[q − (i, j)] over the padded input's positions q, so the kh·kw copies of dy
    shifted by (i, j) (zero outside), concatenated on channels, make one [B·Hp·Wp, kh·kw·Cout] matrix and
    xpᵀ times it is every tap at once: x is read once, not kh·kw times. Used where kh·kw·Cout ≤ Cin (a
    decoder's conv_out, 128 → 3 at 256²: the taps' k² matmuls with 3 output columns each read the whole
    window for little arithmetic).
    """
    kh, kw = kernel_hw
    cin, cout = x.shape[-1], dy.shape[-1]
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    shifted = jnp.concatenate([jnp.pad(dy, ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
                               for i in range(kh) for j in range(kw)], axis=-1)
    dk = jax.lax.dot_general(xp.reshape(-1, cin), shifted.reshape(-1, kh * kw * cout), (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dk.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


_conv_taps.defvjp(_taps_fwd, _taps_bwd, symbolic_zeros=True)


LOWERINGS = {"xla": conv_xla, "im2col": conv_im2col, "taps": conv_taps}
"""`conv_select`'s names → (x, kernel, stride, padding) → the convolution."""
