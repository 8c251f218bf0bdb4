"""A frozen bf16 kernel on CPU: its backward pass widens its own fp32 copy (issue #17).

XLA:CPU computes every dot and convolution with a bf16 operand in fp32, from an fp32 copy of the
operand (JAX's own `kernel.astype(float32)` when the compute dtype is fp32, XLA's when it is bf16).
The input gradient needs the same copy, and XLA's CSE merges the forward pass's copy, the
rematerialised forward's and the backward's into one buffer — so with a bf16 base, an fp32 copy of
every base kernel lives from the forward pass to the end of the backward pass: 3.2 GB of an SD1.5
LoRA step's 4.1 GB of temporaries (fp32 compute, no remat; docs/benchmarks.md, "LoRA").

`frozen_kernel_op(op, x, kernel, dtype)` computes `op(x, kernel.astype(dtype))` with a custom
backward that widens the kernel again from its bf16 bits (shift left 16, bitcast: bit-exact the
same fp32 values, but another HLO than `convert`, so CSE cannot merge it with the forward's), right
before the gradient's dot. Each copy then lives for one layer. The gradients are the same formulas
autodiff writes (input gradient from the widened kernel, kernel gradient x^T·dy, cast to the
kernel's dtype), computed in fp32 as XLA:CPU computes a bf16 dot.

What it does not free: with remat, the forward pass's copy and the rematerialised forward's are the
same HLO, and CSE still makes them one buffer (the SDXL LoRA row of `jaxsd bench memory`).

`use_frozen_kernel_op` is the decision table. Only CPU: a GPU or TPU computes in bf16 and makes no
copy. Only a frozen base — a model applied with a "lora" collection: its kernels are never trained
(`jaxsd.train.adapters`), so this stays out of full fine-tuning's step. Only bfloat16 kernels (the
widening-by-shift is bf16's; a float16 base keeps autodiff's backward).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def use_frozen_kernel_op(*, platform: str, kernel_dtype, frozen: bool) -> bool:
    """Whether a layer's kernel goes through `frozen_kernel_op`.

    Args:
      platform: `jax.default_backend()`.
      kernel_dtype: the stored kernel's dtype.
      frozen: the kernel does not train (the layer is applied with a "lora" collection).
    """
    return platform == "cpu" and frozen and jnp.dtype(kernel_dtype) == jnp.bfloat16


def widen_bf16(kernel: jax.Array) -> jax.Array:
    """bf16 [...] -> the same values in fp32 [...], as bit operations (a bf16 is an fp32's top 16 bits)."""
    bits = jax.lax.bitcast_convert_type(kernel, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def frozen_kernel_op(op: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, kernel: jax.Array,
                     dtype) -> jax.Array:
    """op(x, kernel.astype(dtype)), whose backward widens the bf16 kernel itself (see the module doc).

    op: a linear map of x for a fixed kernel (a matmul over the last axis, a convolution), e.g.
    x [..., in] · kernel [in, out] -> [..., out]. x is already in the compute `dtype`; the result is too.
    """

    @jax.custom_vjp
    def apply(x, kernel):
        return op(x, kernel.astype(dtype))

    def forward(x, kernel):
        # residuals: the layer's input and the bf16 kernel (an argument: no copy). The kernel gradient's
        # use of x is dead code when the kernel is frozen, and XLA drops it with x's extra lifetime.
        return apply(x, kernel), (x, kernel)

    def backward(residuals, dy):
        x, kernel = residuals
        f32 = jnp.float32
        _, vjp = jax.vjp(op, x.astype(f32), widen_bf16(kernel))
        dx, dkernel = vjp(dy.astype(f32))
        return dx.astype(x.dtype), dkernel.astype(kernel.dtype)

    apply.defvjp(forward, backward)
    return apply(x, kernel)


__all__ = ["frozen_kernel_op", "use_frozen_kernel_op", "widen_bf16"]
