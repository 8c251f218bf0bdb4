"""Which lowering a 2-D convolution runs: XLA's convolution, im2col + one matmul, or XLA's convolution
with its kernel gradient as matmuls (the last two CPU only).

XLA:CPU's convolution kernels are slow at the UNet's wide, low-resolution levels, above all their
input gradient — the whole backward of a LoRA step, which needs no base kernel gradient (issue #17;
docs/benchmarks.md, "Convolutions on CPU"). There a k×k conv written as k² shifted slices of the
padded input concatenated on channels, times the kernel as one [k²·Cin, Cout] matrix
(`jaxsd.models.im2col.conv_im2col`), is one large matmul, and autodiff turns its input gradient into
a matmul plus k² slice-adds: kernels XLA:CPU runs well on every core.

Elsewhere XLA:CPU's forward and input gradient are fine, but its kernel (weight) gradient — a
convolution whose window is the whole output image — is 2–10× slower than it need be at ≥ 32² outputs:
most of a full fine-tune's or VAE step's backward (issue #21). There `taps`
(`jaxsd.models.im2col.conv_taps`) keeps XLA's convolution and computes the kernel gradient as k²
matmuls, one per kernel tap. Where the kernel is not trained (LoRA) it compiles to XLA's own program.

A nearest 2× upsampling followed by a 3×3 conv (diffusers' Upsample2D) runs on CPU as four 2×2 convs at
the input's resolution (`jaxsd.models.subpixel`; `select_upsample`), each on the lowering `select_conv` picks.

`select_conv` is the decision table, a pure function unit-tested on any machine;
`conv_implementation` gathers the facts while tracing (platform, the forced choice) and calls it.
GPU and TPU always keep XLA's convolution (cuDNN / the TPU's convolution units).

The forced choice, for benchmarks and parity tests: the `JAXSD_CONV` environment variable
(`auto`, `xla`, `im2col`, `taps`; read while tracing, so set it before a program is compiled; `jaxsd`
checks it before any command runs), or in one process `with forced_conv("im2col"):` around the
tracing (it wins over the variable). Importing this module loads no jax, so the CLI's check is free.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from jaxsd.errors import InputError

if TYPE_CHECKING:
    import jax

IMPLEMENTATIONS = ("auto", "xla", "im2col", "taps")
ENV_VAR = "JAXSD_CONV"
# `auto` on CPU takes im2col for a k×k conv (k > 1, no dilation, no groups) whose input has at least
# IM2COL_MIN_CHANNELS channels and at most IM2COL_MAX_PIXELS output positions per image. Measured
# (docs/benchmarks.md, "Convolutions on CPU"; im2col / XLA time, forward · input grad · kernel grad):
# 8×8 × 1280: 0.38 · 0.20 · 0.57; 16×16 × 640: 0.81 · 0.67 · 0.59; 32×32 × 320: 1.05 · 0.91 · 0.55
# (a wash for a LoRA step, which runs no kernel gradient); the demo's 32–128 channels: 1.7–5× slower
# forwards. The sd15 LoRA step: 0.60× with this table, 0.62× with im2col everywhere.
IM2COL_MIN_CHANNELS = 640
IM2COL_MAX_PIXELS = 16 * 16
# The [B·H·W, k²·Cin] patch matrix is k² times the input; above this many bytes (over the batch) a
# conv stays on XLA, whatever its shape, so no single conv's patches grow a step's memory much.
IM2COL_MAX_PATCH_BYTES = 64 << 20
# `auto` on CPU takes taps for the other k×k convs (no dilation, no groups) with at least
# TAPS_MIN_PIXELS output positions per image and TAPS_MIN_CHANNELS input channels. Measured (kernel
# gradient alone, taps / XLA time; docs/benchmarks.md, "Convolutions on CPU"): SD's VAE at 256², batch
# 1: 256²×128: 0.10, its stride-2 downsampler 0.38, 128²×256: 0.21, 64²×512: 0.26, 32²×512: 0.52,
# conv_out 128→3: 0.37; SD UNet 32²×320: 0.56; but the demo's 8²–32² × 16–64 channels at batch 16/64:
# 1.0–1.7, and 4²×128 at batch 64: 1.7 (forward and input gradient: XLA's either way).
TAPS_MIN_PIXELS = 32 * 32
TAPS_MIN_CHANNELS = 64

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxsd_forced_conv", default=None)


def _checked(name: str, where: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise InputError(f"{where}: convolution implementation {name!r} unknown; choose one of {IMPLEMENTATIONS}")
    return name


def requested_implementation() -> str:
    """The forced choice: `forced_conv`'s, else `$JAXSD_CONV`, else "auto" (an unknown value is an error)."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _checked(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def forced_conv(name: str) -> Iterator[None]:
    """Convs traced inside run `name` ("auto", "xla", "im2col", "taps"); compiled programs keep their choice.

    JAX's tracing caches do not know this choice (nor `$JAXSD_CONV`): a function traced before would be
    reused as it was. So entering and leaving clear them (`jax.clear_caches`), and what runs inside is
    traced anew — a cost only tests and benchmarks, who switch in one process, pay.
    """
    import jax

    token = _forced.set(_checked(name, "forced_conv"))
    jax.clear_caches()
    try:
        yield
    finally:
        _forced.reset(token)
        jax.clear_caches()


def select_conv(requested: str, *, platform: str, batch: int, out_hw: tuple[int, int], in_channels: int,
                kernel_hw: tuple[int, int], itemsize: int, dilation: int = 1, groups: int = 1) -> str:
    """The lowering one convolution runs: "xla", "im2col" or "taps".

    Args:
      requested: "auto", or a forced "xla" / "im2col" / "taps".
      platform: `jax.default_backend()`: "cpu", "gpu", "tpu", ...
      batch, out_hw: the output's batch and spatial size (after stride).
      in_channels: Cin. kernel_hw: (kh, kw). itemsize: bytes per element of the compute dtype.
      dilation, groups: of the convolution (our `Conv` has neither: 1, 1).

    "auto" resolves as:

        platform  condition                                                      → lowering
        cpu       kh·kw > 1, dilation 1, groups 1, Cin ≥ IM2COL_MIN_CHANNELS,
                  Ho·Wo ≤ IM2COL_MAX_PIXELS, patches ≤ IM2COL_MAX_PATCH_BYTES   → im2col
        cpu       kh·kw > 1, dilation 1, groups 1, Cin ≥ TAPS_MIN_CHANNELS,
                  Ho·Wo ≥ TAPS_MIN_PIXELS                                       → taps
        cpu       otherwise (1×1 convs are already a matmul in `Conv`)           → xla
        other     always                                                         → xla

    A forced "im2col" or "taps" runs on any platform (tests compare them with "xla" on CPU); a dilated
    or grouped convolution cannot be forced to them (an `InputError`, not a quiet switch).
    """
    _checked(requested, "select_conv")
    if requested in ("im2col", "taps") and (dilation != 1 or groups != 1):
        raise InputError(f"the {requested} convolution has no dilation or groups (got dilation {dilation}, "
                         f"groups {groups}); use {ENV_VAR}=xla or auto")
    if requested != "auto":
        return requested
    kh, kw = kernel_hw
    if platform != "cpu" or kh * kw == 1 or dilation != 1 or groups != 1:
        return "xla"
    pixels = out_hw[0] * out_hw[1]
    patch_bytes = batch * pixels * kh * kw * in_channels * itemsize
    if in_channels >= IM2COL_MIN_CHANNELS and pixels <= IM2COL_MAX_PIXELS and patch_bytes <= IM2COL_MAX_PATCH_BYTES:
        return "im2col"
    if in_channels >= TAPS_MIN_CHANNELS and pixels >= TAPS_MIN_PIXELS:
        return "taps"
    return "xla"


def conv_implementation(x: jax.Array, kernel: jax.Array, out_hw: tuple[int, int]) -> str:
    """`select_conv` for x [B, H, W, Cin] and kernel [kh, kw, Cin, Cout] on this process's platform."""
    import jax

    return select_conv(requested_implementation(), platform=jax.default_backend(), batch=x.shape[0],
                       out_hw=out_hw, in_channels=x.shape[-1], kernel_hw=kernel.shape[:2],
                       itemsize=x.dtype.itemsize)


def select_upsample(requested: str, *, platform: str) -> str:
    """How a nearest 2× upsampling + 3×3 conv runs: "subpixel" (four 2×2 convs at the input's resolution,
    `jaxsd.models.subpixel`) on CPU unless "xla" is forced, else "repeat" (upsample, then the conv).

    On CPU the subpixel form does 16/36 of the work and makes no upsampled copy; XLA:CPU also runs the
    upsampling's gradient (a sum over 2×2 blocks) slowly. GPU/TPU keep diffusers' order of operations.
    """
    _checked(requested, "select_upsample")
    return "subpixel" if platform == "cpu" and requested != "xla" else "repeat"


def upsample_implementation() -> str:
    """`select_upsample` for this process's platform and forced choice."""
    import jax

    return select_upsample(requested_implementation(), platform=jax.default_backend())
