"""Which attention implementation runs: one pure function of the platform and the attention's shape.

`select_implementation` is the only place that knows the kernels' limits; `attention.py` gathers
the platform facts (backend, GPU generation, whether a Pallas kernel can be placed) and calls it
once per attention while tracing. Nothing here touches a device, so every row of the table is
unit-tested on CPU (tests/models/test_attention_select.py).

Why splash above 1024 tokens (the arithmetic, per image and per self-attention layer):
XLA's attention materialises the fp32 logits [B, H, Lq, Lk] (4·H·Lq·Lk bytes) and keeps the
softmax, in fp32 or the compute dtype, for the backward pass; the splash kernel holds one bq×bkv
block of logits at a time in VMEM (512×512×4 B = 1 MiB) and keeps only the fp32 logsumexp
[H, Lq] for the backward pass. For SD1.5 (8 heads; 320 channels at its first level):

    tokens L (latent)     fp32 logits 8·L²·4 B     one fp32 hidden state L·320·4 B
    256   (16×16)          2 MiB                    0.3 MiB
    1024  (32×32)         32 MiB                    1.3 MiB
    4096  (64×64, 512 px) 512 MiB                   5 MiB
    9216  (96×96, 768 px) 2.5 GiB                  11 MiB

At 512 px the five 4096-token self-attentions keep 1.25–2.5 GiB of softmax per image (bf16–fp32)
for the backward pass: a batch of 8 needs 10–20 GiB for that alone, against a v5e chip's 16 GiB of
HBM, where splash keeps 5 × 128 KiB of logsumexp. At 1024 tokens the logits are already 25 hidden
states' worth and grow as L²; at 256 they are a few hidden states, and the kernel's fixed costs
are not worth paying there (lengths padded to a multiple of 128; head dims padded to 128: SD1.5's
40 costs the kernel's matmuls 3.2× the work). So `auto` takes splash when both Lq and Lk are
≥ SPLASH_MIN_LEN = 1024 — self-attention at SD's 32×32-latent levels and above, and the VAE's
mid-block attention from 256-px images. Text cross-attention (Lk = 77: 10 MiB of logits per image
at 512 px, two hidden states' worth) stays on XLA. The crossover is reasoned, not measured: nobody
has timed it on a TPU yet.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from jaxsd.errors import InputError

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
MaskKind = Literal["none", "keys", "full"]
SPLASH_MIN_LEN = 1024
# "einsum"/"xla" attention whose fp32 logits (over the batch) exceed this runs its queries in chunks
# (`query_chunk_size`); the chunk's logits stay within it
CHUNK_LOGITS_BYTES = 128 << 20
MIN_QUERY_CHUNK = 128
# CPU: an attention whose fp32 logits per (example, head) exceed this runs one (example, head) and a
# block of queries at a time (`cpu_query_block`); a block's logits stay within it, so they stay in
# the cache (L3: 32 MiB, shared by the cores of the machine measured) through the softmax's passes
CPU_BLOCK_LOGITS_BYTES = 8 << 20
MIN_CPU_BLOCK = 16
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_limits(dtype, head_dim: int, q_len: int, kv_len: int, masked: bool, max_head_dim: int) -> str | None:
    """Why cuDNN's flash attention (through `jax.nn.dot_product_attention`) cannot run this, or None.

    Its checks (jax/_src/cudnn/fused_attention_stablehlo.py): q/k/v in fp16/bf16; head dim a multiple
    of 8 up to 128 (256 from compute capability 9.0, Hopper); with a bias — a boolean mask becomes
    one — training needs even sequence lengths (we cannot tell training from inference while
    tracing, so we always ask for them)."""
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        return f"cuDNN flash attention needs fp16/bf16 q/k/v, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 up to {max_head_dim}, got {head_dim}"
    if masked and (q_len % 2 or kv_len % 2):
        return f"cuDNN flash attention with a bias or mask needs even lengths, got Lq={q_len}, Lk={kv_len}"
    return None


def splash_limits(platform: str, has_bias: bool, mask: MaskKind, placeable: bool) -> str | None:
    """Why the Pallas TPU splash kernel cannot run this, or None (see jaxsd/models/splash.py)."""
    if platform not in ("tpu", "cpu"):
        return f"splash is a TPU kernel (on CPU it runs in Pallas interpret mode, for tests); this is {platform}"
    if has_bias:
        return "splash has no additive logits bias (T5's relative positions)"
    if mask == "full":
        return "splash takes a key-padding mask ([B, 1, 1, Lk]) or none, not a per-query mask"
    if not placeable:
        return ("splash on several TPU devices must be traced under a mesh (`with jax.set_mesh(mesh):`) so it "
                "can run per device in a shard_map; XLA cannot partition a Pallas kernel")
    return None


def select_implementation(requested: str, *, platform: str, dtype, head_dim: int, q_len: int, kv_len: int,
                          has_bias: bool = False, mask: MaskKind = "none", cudnn_max_head_dim: int = 128,
                          splash_placeable: bool = True) -> str:
    """The implementation one attention call runs: "einsum", "xla", "cudnn" or "splash".

    Args:
      requested: `model.attention_impl` — "auto" or a forced choice.
      platform: "cpu", "gpu" (NVIDIA), "tpu", or anything else (e.g. "rocm": AMD GPUs, no cuDNN).
      dtype: q/k/v dtype (the compute dtype; `upcast_attention` does not change it, see below).
      head_dim, q_len (Lq), kv_len (Lk): from q [B, Lq, H, D] and k [B, Lk, H, D].
      has_bias: an additive logits bias (T5). mask: "none", "keys" (a key-padding mask broadcast over
        heads and queries, [B|1, 1, 1, Lk]) or "full" (anything else, incl. CLIP's causal+padding is
        "keys" plus is_causal, which every implementation takes natively).
      cudnn_max_head_dim: 128, or 256 on compute capability ≥ 9.0.
      splash_placeable: one device, or tracing under a mesh the kernel can be shard_mapped over.

    "auto" resolves as:

        platform  condition                                                  → implementation
        cpu       always                                                     → einsum
        gpu       fp16/bf16, head dim %8 == 0 and ≤ 128 (256 on Hopper+),
                  even Lq and Lk when there is a bias or mask                → cudnn
        gpu       otherwise (fp32, head dim 40/80/160 before Hopper, ...)    → xla
        tpu       Lq and Lk ≥ SPLASH_MIN_LEN (1024), no bias, no per-query
                  mask, kernel placeable                                     → splash
        tpu       otherwise                                                  → xla
        other     always (e.g. AMD GPUs)                                     → xla

    A forced "cudnn" or "splash" is checked against the same limits and refused with an
    `InputError` naming the limit (no quiet switch to another kernel); a forced "splash" ignores the
    length threshold. "einsum" and "xla" run anywhere.

    `upcast_attention` (SD2.1) is not an input: every implementation computes the logits with fp32
    accumulation and the softmax in fp32 — what that flag asks of diffusers' classic processor — and
    diffusers' default processor (`AttnProcessor2_0`, torch SDPA) ignores the flag. So a bf16 SD2.1
    UNet keeps cuDNN flash attention on GPU and splash on TPU.
    """
    if requested not in IMPLEMENTATIONS:
        raise InputError(f"attention implementation {requested!r} unknown; choose one of {IMPLEMENTATIONS}")
    if requested in ("einsum", "xla"):
        return requested
    masked = has_bias or mask != "none"
    shape = f"attention over Lq={q_len}, Lk={kv_len}, head dim {head_dim}"
    if requested == "cudnn":
        why = ("cuDNN runs on NVIDIA GPUs only; this is " + platform if platform != "gpu"
               else cudnn_limits(dtype, head_dim, q_len, kv_len, masked, cudnn_max_head_dim))
        if why:
            raise InputError(f"attention_impl 'cudnn' cannot run this {shape}: {why}; use 'auto'")
        return "cudnn"
    if requested == "splash":
        why = splash_limits(platform, has_bias, mask, splash_placeable)
        if why:
            raise InputError(f"attention_impl 'splash' cannot run this {shape}: {why}; use 'auto'")
        return "splash"
    if platform == "cpu":
        return "einsum"
    if platform == "gpu":
        return "xla" if cudnn_limits(dtype, head_dim, q_len, kv_len, masked, cudnn_max_head_dim) else "cudnn"
    if platform == "tpu" and min(q_len, kv_len) >= SPLASH_MIN_LEN \
            and splash_limits(platform, has_bias, mask, splash_placeable) is None:
        return "splash"
    return "xla"


def query_chunk_size(implementation: str, *, heads: int, q_len: int, kv_len: int, batch: int = 1,
                     has_bias: bool = False, mask: MaskKind = "none", is_causal: bool = False) -> int | None:
    """How many queries at a time an attention computes: None = all at once.

    The kernels that never hold the logits ("cudnn", "splash") take all queries. The XLA-path ones
    ("einsum", "xla") materialise fp32 logits [B, H, Lq, Lk]; when those exceed CHUNK_LOGITS_BYTES
    (128 MiB) for the batch, the queries run in chunks of the largest power of two (≥ MIN_QUERY_CHUNK)
    whose logits fit, one chunk after another, each rematerialised in the backward pass
    (`jaxsd.models.attention`). Same result; the logits, the softmax kept for the backward pass and
    its gradient then exist for one chunk at a time. `batch` is the traced batch (under a mesh the
    global one, so a device's chunk holds less than the budget). At batch 1, per self-attention layer:

        model, level (latent)            heads  tokens  fp32 logits  chunk  chunk's logits
        SD1.5 512 px, 64×64              8      4096    512 MiB      1024   128 MiB
        SDXL 1024 px, 64×64 (level 1)    10     4096    640 MiB       512    80 MiB
        SDXL 1024 px, 32×32 (level 2)    20     1024     80 MiB      —
        VAE mid block, 128×128           1      16384     1 GiB      2048   128 MiB
        (SD1.5 512 px at batch 4: 1024 → 256 queries per chunk)

    Only without bias, mask and causal masking (the UNet's and the VAE's attentions; text encoders
    are short). An explicit `query_chunk_size` given to `attention` wins over this.
    """
    if implementation not in ("einsum", "xla") or has_bias or mask != "none" or is_causal:
        return None
    row_bytes = 4 * batch * heads * kv_len  # fp32 logits of one query, over the batch
    if row_bytes * q_len <= CHUNK_LOGITS_BYTES:
        return None
    chunk = max(MIN_QUERY_CHUNK, 1 << max(0, (CHUNK_LOGITS_BYTES // row_bytes).bit_length() - 1))
    return chunk if chunk < q_len else None


def cpu_query_block(implementation: str, *, platform: str, q_len: int, kv_len: int, has_bias: bool = False,
                    mask: MaskKind = "none", is_causal: bool = False) -> int | None:
    """On CPU, how many queries of one (example, head) an "einsum" attention computes at a time; None = the
    usual layout (all heads together, `query_chunk_size`'s chunks).

    XLA:CPU writes the [B, H, Lq, Lk] fp32 logits to memory and reads them again in the softmax's passes
    (max, exp and sum, normalise) and the second matmul. Where an (example, head)'s logits exceed
    CPU_BLOCK_LOGITS_BYTES (8 MiB) those passes run from RAM; a block of the largest power of two of
    queries (≥ MIN_CPU_BLOCK) whose logits fit keeps them in the cache. Measured on the 2-core EPYC
    (`small` UNet, 8 heads of 10, batch 2, fp32; docs/benchmarks.md): one 4096-token self-attention
    2.2 → 0.53 CPU-s; at 1024 tokens (4 MiB per head) blocks change nothing, so they are not used.

        tokens Lq = Lk (latent)     logits per (example, head)   block
        1024  (32×32)                4 MiB                        — (all at once)
        4096  (64×64, SD at 512 px)  64 MiB                       512
        9216  (96×96)               324 MiB                       227 → 128 (a power of two)
        16384 (128×128)               1 GiB                       128

    Only "einsum" (`auto` on CPU), without bias, mask or causal masking (the UNet's and the VAE's
    attentions), and only on CPU: GPU/TPU kernels keep their own tiling.
    """
    if platform != "cpu" or implementation != "einsum" or has_bias or mask != "none" or is_causal:
        return None
    row_bytes = 4 * kv_len
    if row_bytes * q_len <= CPU_BLOCK_LOGITS_BYTES:
        return None
    block = max(MIN_CPU_BLOCK, 1 << max(0, (CPU_BLOCK_LOGITS_BYTES // row_bytes).bit_length() - 1))
    return block if block < q_len else None
