"""The one attention function every jaxsd model calls.

Built on `jax.nn.dot_product_attention`, which computes logits and softmax in
fp32 whatever the input dtype. The implementation is chosen per platform:

* ``"auto"``  — cuDNN flash attention on GPU when the dtype is fp16/bf16 and the
  head dim is a multiple of 8 up to 128 (cuDNN's constraints); XLA otherwise
  (CPU, TPU, fp32). On TPU XLA's fused attention is what pays for SD's short
  sequences; ``"splash"`` is left for long sequences once measured.
* ``"xla"`` / ``"cudnn"`` — forced.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def choose_implementation(implementation: str, dtype, head_dim: int) -> str:
    """Resolve ``"auto"`` for the current default backend; validate explicit choices."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} unknown; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    on_gpu = jax.default_backend() == "gpu"
    cudnn_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if on_gpu and cudnn_ok else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    upcast: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """Multi-head attention.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
      bias: additive logits bias broadcastable to [B, H, Lq, Lk] (T5 relative positions).
      scale: logits scale; default 1/sqrt(D). T5 passes 1.0.
      upcast: compute q/k/v in fp32 (diffusers' `upcast_attention`, SD2.1).
    Returns: [B, Lq, H, D] in q's dtype.
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    impl = choose_implementation(implementation, q.dtype, q.shape[-1])
    if bias is not None:
        bias = bias.astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                       implementation=impl)
    return out.astype(out_dtype)
