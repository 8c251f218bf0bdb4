"""Which attention implementation runs where: `select_implementation`'s table, row by row, on CPU.

The GPU and TPU rows cannot run here, so the pure selection function is checked for each case,
and an SD2.1-style UNet (upcast_attention) is traced to see what every one of its attentions would
get on a GPU in bf16: cuDNN flash attention, not an fp32 fallback.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxsd.errors import InputError
from jaxsd.models import attention as attention_module
from jaxsd.models.attention import mask_kind
from jaxsd.models.attention_select import cpu_query_block, query_chunk_size, select_implementation
from jaxsd.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from tests.models.test_unet import FAMILIES

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (platform, dtype, head_dim, Lq, Lk, extra kwargs) → what "auto" runs
AUTO = [
    ("cpu", BF16, 64, 4096, 4096, {}, "einsum"),
    ("cpu", F32, 40, 77, 77, {"has_bias": True, "mask": "full"}, "einsum"),
    # GPU: cuDNN for fp16/bf16 within its head-dim limits; XLA otherwise
    ("gpu", BF16, 64, 4096, 77, {}, "cudnn"),                     # SD2/SDXL cross-attention
    ("gpu", F16, 40, 4096, 4096, {}, "cudnn"),                    # SD1.5 level 0
    ("gpu", F32, 64, 4096, 4096, {}, "xla"),                      # fp32: cuDNN has no fp32 flash kernel
    ("gpu", BF16, 160, 256, 256, {}, "xla"),                      # SD1.5 level 2 before Hopper
    ("gpu", BF16, 160, 256, 256, {"cudnn_max_head_dim": 256}, "cudnn"),  # ... on Hopper
    ("gpu", BF16, 20, 1024, 1024, {}, "xla"),                     # not a multiple of 8
    ("gpu", BF16, 64, 77, 77, {"mask": "keys"}, "xla"),           # CLIP + padding mask: odd lengths
    ("gpu", BF16, 64, 76, 76, {"mask": "keys"}, "cudnn"),
    ("gpu", BF16, 64, 77, 77, {}, "cudnn"),                       # CLIP causal alone is no bias
    ("gpu", BF16, 64, 512, 512, {"has_bias": True, "mask": "keys"}, "cudnn"),  # T5, even lengths
    # TPU: splash from SPLASH_MIN_LEN tokens on both sides, when the kernel can take the attention
    ("tpu", BF16, 40, 4096, 4096, {}, "splash"),
    ("tpu", BF16, 40, 1024, 1024, {}, "splash"),
    ("tpu", BF16, 40, 1023, 1023, {}, "xla"),
    ("tpu", BF16, 40, 4096, 77, {}, "xla"),                       # text cross-attention
    ("tpu", F32, 512, 4096, 4096, {}, "splash"),                  # the VAE's mid-block attention
    ("tpu", BF16, 64, 4096, 4096, {"mask": "keys"}, "splash"),
    ("tpu", BF16, 64, 4096, 4096, {"mask": "full"}, "xla"),
    ("tpu", BF16, 64, 4096, 4096, {"has_bias": True}, "xla"),
    ("tpu", BF16, 40, 4096, 4096, {"splash_placeable": False}, "xla"),  # several devices, no mesh
    ("rocm", BF16, 64, 4096, 4096, {}, "xla"),                    # AMD GPUs: no cuDNN
]


@pytest.mark.parametrize("platform, dtype, head_dim, lq, lk, kw, expected", AUTO)
def test_auto_choice(platform, dtype, head_dim, lq, lk, kw, expected):
    got = select_implementation("auto", platform=platform, dtype=dtype, head_dim=head_dim, q_len=lq, kv_len=lk, **kw)
    assert got == expected


@pytest.mark.parametrize("requested, platform, dtype, head_dim, kw, message", [
    ("cudnn", "cpu", BF16, 64, {}, "NVIDIA GPUs only"),
    ("cudnn", "rocm", BF16, 64, {}, "NVIDIA GPUs only"),
    ("cudnn", "gpu", F32, 64, {}, "fp16/bf16"),
    ("cudnn", "gpu", BF16, 40 + 4, {}, "multiple of 8"),
    ("cudnn", "gpu", BF16, 64, {"q_len": 77, "kv_len": 77, "mask": "keys"}, "even lengths"),
    ("splash", "gpu", BF16, 64, {}, "TPU kernel"),
    ("splash", "tpu", BF16, 64, {"has_bias": True}, "bias"),
    ("splash", "tpu", BF16, 64, {"mask": "full"}, "key-padding"),
    ("splash", "tpu", BF16, 64, {"splash_placeable": False}, "jax.set_mesh"),
    ("flash", "tpu", BF16, 64, {}, "unknown"),
])
def test_forced_choice_that_cannot_run_is_refused(requested, platform, dtype, head_dim, kw, message):
    args = {"platform": platform, "dtype": dtype, "head_dim": head_dim, "q_len": 1024, "kv_len": 1024} | kw
    with pytest.raises(InputError, match=message):
        select_implementation(requested, **args)


@pytest.mark.parametrize("requested, platform, expected", [
    ("splash", "tpu", "splash"),   # a forced splash ignores the length threshold
    ("splash", "cpu", "splash"),   # Pallas interpret mode (tests)
    ("cudnn", "gpu", "cudnn"),
    ("einsum", "tpu", "einsum"),
    ("xla", "cpu", "xla"),
])
def test_forced_choice_that_can_run(requested, platform, expected):
    got = select_implementation(requested, platform=platform, dtype=BF16, head_dim=64, q_len=76, kv_len=76,
                                mask="keys")
    assert got == expected


# (implementation, heads, Lq, Lk, extra kwargs) → queries per chunk (None: all at once)
CHUNKS = [
    ("einsum", 8, 4096, 4096, {}, 1024),     # SD1.5 at 512 px, level 0: 512 MiB of fp32 logits
    ("einsum", 8, 4096, 4096, {"batch": 4}, 256),  # the budget holds for the batch
    ("einsum", 10, 4096, 4096, {}, 512),     # SDXL at 1024 px, level 1: 640 MiB
    ("xla", 10, 4096, 4096, {}, 512),        # the same on GPU in fp32 / TPU below splash's reach
    ("einsum", 20, 1024, 1024, {}, None),    # SDXL level 2: 80 MiB, within the budget
    ("einsum", 10, 4096, 77, {}, None),      # text cross-attention
    ("einsum", 1, 16384, 16384, {}, 2048),   # the VAE's mid-block attention at 128×128 latents
    ("einsum", 64, 65536, 65536, {}, 128),   # never fewer than MIN_QUERY_CHUNK queries
    ("cudnn", 10, 4096, 4096, {}, None),     # flash kernels never hold the logits
    ("splash", 10, 4096, 4096, {}, None),
    ("einsum", 10, 4096, 4096, {"has_bias": True}, None),   # chunks take no bias, mask or causal mask
    ("einsum", 10, 4096, 4096, {"mask": "keys"}, None),
    ("einsum", 10, 4096, 4096, {"is_causal": True}, None),
]


@pytest.mark.parametrize("impl, heads, lq, lk, kw, expected", CHUNKS)
def test_query_chunk_size(impl, heads, lq, lk, kw, expected):
    assert query_chunk_size(impl, heads=heads, q_len=lq, kv_len=lk, **kw) == expected


CPU_BLOCKS = [  # impl, platform, Lq, Lk, kw → queries per (example, head) block
    ("einsum", "cpu", 4096, 4096, {}, 512),    # SD at 512 px: 64 MiB of logits per head, blocks of 8 MiB
    ("einsum", "cpu", 1024, 1024, {}, None),   # 4 MiB per head: fits the budget, all at once
    ("einsum", "cpu", 16384, 16384, {}, 128),
    ("einsum", "cpu", 1 << 20, 1 << 20, {}, 16),   # never fewer than MIN_CPU_BLOCK queries
    ("einsum", "cpu", 4096, 77, {}, None),     # text cross-attention
    ("xla", "cpu", 4096, 4096, {}, None),      # only our einsum kernel is blocked
    ("einsum", "gpu", 4096, 4096, {}, None),   # only on CPU
    ("einsum", "tpu", 4096, 4096, {}, None),
    ("einsum", "cpu", 4096, 4096, {"has_bias": True}, None),
    ("einsum", "cpu", 4096, 4096, {"mask": "keys"}, None),
    ("einsum", "cpu", 4096, 4096, {"is_causal": True}, None),
]


@pytest.mark.parametrize("impl, platform, lq, lk, kw, expected", CPU_BLOCKS)
def test_cpu_query_block(impl, platform, lq, lk, kw, expected):
    assert cpu_query_block(impl, platform=platform, q_len=lq, kv_len=lk, **kw) == expected


def test_mask_kind():
    assert mask_kind(None) == "none"
    assert mask_kind(jnp.ones((3, 1, 1, 77), bool)) == "keys"   # T5's / CLIP's padding mask
    assert mask_kind(jnp.ones((77,), bool)) == "keys"
    assert mask_kind(jnp.ones((3, 1, 5, 77), bool)) == "full"
    assert mask_kind(jnp.ones((1, 2, 1, 77), bool)) == "full"   # per head


def test_upcast_attention_keeps_flash_attention_in_bf16(monkeypatch):
    """SD2.1 (upcast_attention=True) in bf16: every attention reaches the selection in bf16, and on a
    GPU each would run cuDNN — as diffusers' SDPA processor, which ignores the flag."""
    seen = []
    select = attention_module.select_implementation

    def spy(requested, **kw):
        seen.append((kw["dtype"], select(requested, **(kw | {"platform": "gpu"}))))
        return select(requested, **kw)

    monkeypatch.setattr(attention_module, "select_implementation", spy)
    config = UNetConfig.from_diffusers(FAMILIES["sd2"])
    assert config.upcast_attention
    model = UNet2DConditionModel(config, dtype=jnp.bfloat16)
    jax.eval_shape(model.init, jax.random.key(0), *example_inputs(config, size=8))
    # self + cross attention of 4 transformers: down block 1, mid block 1, up block 2 (layers + 1)
    assert len(seen) == 2 * 4
    assert seen == [(jnp.dtype(jnp.bfloat16), "cudnn")] * len(seen)

