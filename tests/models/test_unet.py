"""UNet parity with diffusers PyTorch on tiny random configs shaped like each family,
plus bf16, remat, config handling and logical axes.

Each family's diffusers model is built once per module (fixed seed, weights
perturbed so norms are not 1/0 and outputs are O(1)), saved with
`save_pretrained`, loaded by `load_unet` and run on the same random inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models import attention_select
from jaxsd.models.params import abstract_params
from jaxsd.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from tests.helpers import rel_err

_SD1_BLOCKS = dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
# diffusers config kwargs per family (tiny). Comments say which keys each one pins.
FAMILIES: dict[str, dict] = {
    # SD1.x: conv proj_in/proj_out, one head count for all blocks (hybrid below has two layers per block)
    "sd1": dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                attention_head_dim=4, **_SD1_BLOCKS),
    # SD2.x: linear projection, per-block head counts, upcast attention
    "sd2": dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=40,
                attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True, **_SD1_BLOCKS),
    # SDXL: text_time addition embeds, transformer_layers_per_block list, no attention in the first block
    "sdxl": dict(block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=48,
                 attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 2, 2], use_linear_projection=True,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
    # SD1.5-layout UNet fed by a T5 projection (cross_attention_dim 48), with every remaining key
    # away from its default: list forms, only_cross_attention, centring, sin/cos order, freq shift,
    # downsample padding 0, mid-block scale, another activation, other conv kernels
    "hybrid": dict(block_out_channels=[32, 48], layers_per_block=[1, 2], norm_num_groups=16, norm_eps=1e-3,
                   cross_attention_dim=[48, 48], attention_head_dim=[2, 4], transformer_layers_per_block=[2, 1],
                   only_cross_attention=[True, False], center_input_sample=True, flip_sin_to_cos=False,
                   freq_shift=1, downsample_padding=0, mid_block_scale_factor=1.5, act_fn="mish",
                   conv_in_kernel=5, conv_out_kernel=1,
                   down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
}
# latent (H, W) per family; sd2 and hybrid are not multiples of the total downscale (forwarded upsample sizes)
SIZES = {"sd1": (16, 16), "sd2": (15, 13), "sdxl": (16, 16), "hybrid": (11, 16)}
TEXT_EMBED_DIM = 16


def build_diffusers_unet(family: str, seed: int = 0):
    """A diffusers UNet2DConditionModel of `family`, weights perturbed so every tensor matters."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    model = TorchUNet(**FAMILIES[family]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_inputs(family: str, config: UNetConfig, batch: int = 2, seed: int = 0) -> dict:
    """NCHW numpy inputs for torch; `jax_args` converts them."""
    rng = np.random.default_rng(seed)
    h, w = SIZES[family]
    out = {"sample": rng.standard_normal((batch, config.in_channels, h, w)).astype(np.float32),
           "timesteps": np.array([10, 900][:batch], np.int64),
           "context": rng.standard_normal((batch, 7, config.context_dim)).astype(np.float32),
           "added": None}
    if config.addition_embed_type == "text_time":
        out["added"] = {"text_embeds": rng.standard_normal((batch, TEXT_EMBED_DIM)).astype(np.float32),
                        "time_ids": rng.uniform(0, 1024, (batch, 6)).round().astype(np.float32)}
    return out


def jax_args(inputs: dict) -> tuple:
    return (inputs["sample"].transpose(0, 2, 3, 1), inputs["timesteps"].astype(np.float32), inputs["context"],
            inputs["added"])


def torch_forward(model, inputs: dict) -> np.ndarray:
    import torch

    added = None if inputs["added"] is None else {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                    torch.from_numpy(inputs["context"]), added_cond_kwargs=added).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_case(request, tmp_path_factory):
    """(family, config, params, inputs, torch reference NHWC, jaxsd fp32 output) — built once per family."""
    from jaxsd.convert.unet import load_unet

    family = request.param
    model = build_diffusers_unet(family)
    folder = tmp_path_factory.mktemp(f"unet_{family}")
    model.save_pretrained(folder)
    config, params = load_unet(folder)
    inputs = make_inputs(family, config)
    ours = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, *jax_args(inputs))
    return family, config, params, inputs, torch_forward(model, inputs), np.asarray(ours)


@pytest.mark.torch
def test_parity_with_diffusers(family_case):
    family, _config, _params, _inputs, ref, out = family_case
    assert np.abs(ref).max() > 0.5 and ref.std() > 0.1, "reference output is trivially small"
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4, family


@pytest.mark.torch
def test_bf16_compute_close_to_fp32(family_case):
    family, config, params, inputs, _, f32 = family_case
    if family != "sd2":
        pytest.skip("one family is enough for the dtype check (the smallest to compile)")
    args = jax_args(inputs)
    bf16 = jax.jit(UNet2DConditionModel(config, dtype=jnp.bfloat16).apply)({"params": params}, *args)
    assert bf16.dtype == jnp.bfloat16
    assert rel_err(bf16, f32) <= 2e-2


def _tiny_config() -> UNetConfig:
    """One resolution, a ResNet and a transformer block each way: the fewest ops that still
    rematerialise both kinds of block (compiling the gradient twice is what costs here)."""
    return UNetConfig.from_diffusers({**FAMILIES["sd1"], "block_out_channels": [16], "layers_per_block": 1,
                                      "down_block_types": ["CrossAttnDownBlock2D"],
                                      "up_block_types": ["CrossAttnUpBlock2D"]})


def random_params(config: UNetConfig, seed: int = 0) -> dict:
    """Random fp32 params of the config's shapes, without compiling `init`."""
    abstract, _ = abstract_params(UNet2DConditionModel(config), *example_inputs(config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), abstract)


@pytest.mark.slow  # a UNet's backward twice (~20 s); parity tests run the same blocks
def test_remat_and_attention_chunks_give_same_gradients(monkeypatch):
    """Full remat of every block plus the self-attention's 64 queries in chunks of 16 (the chunking
    threshold lowered to this tiny UNet's logits) against neither."""
    config = _tiny_config()
    rng = np.random.default_rng(1)
    args = tuple(None if a is None else jnp.asarray(rng.standard_normal(a.shape), jnp.float32)
                 for a in example_inputs(config, batch=2, size=8))
    params = random_params(config)

    def grads(policy):
        model = UNet2DConditionModel(config, remat_policy=policy)
        loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, *args)))
        flat = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
        return np.concatenate([np.ravel(g) for g in flat])

    plain = grads(None)
    # 4 heads × 64 × 64 fp32 logits = 64 KiB per example: chunks of 16 queries stay within 16 KiB
    monkeypatch.setattr(attention_select, "CHUNK_LOGITS_BYTES", 16 << 10)
    monkeypatch.setattr(attention_select, "MIN_QUERY_CHUNK", 8)
    assert attention_select.query_chunk_size("einsum", heads=4, q_len=64, kv_len=64) == 16
    remat = grads("full")
    assert np.abs(plain).max() > 0
    # the project's metric over the whole gradient: max|remat - plain| / max|plain|
    assert rel_err(remat, plain) <= 1e-6


def test_unknown_remat_policy_is_an_error():
    config = _tiny_config()
    with pytest.raises(ValueError, match="remat policy 'sometimes'"):
        abstract_params(UNet2DConditionModel(config, remat_policy="sometimes"), *example_inputs(config))


def test_params_carry_logical_axes():
    config = UNetConfig.from_diffusers(FAMILIES["sdxl"])
    _, specs = abstract_params(UNet2DConditionModel(config), *example_inputs(config))
    assert tuple(specs["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    attn = specs["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]
    assert tuple(attn["to_q"]["kernel"]) == ("embed", "heads")
    assert tuple(attn["to_out_0"]["kernel"]) == ("heads", "embed")
    ff = specs["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["ff"]
    assert tuple(ff["net_0"]["proj"]["kernel"]) == ("embed", "mlp")


# ---- config handling -----------------------------------------------------------------


def test_config_round_trip_through_diffusers_dict():
    for family, kwargs in FAMILIES.items():
        config = UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **kwargs})
        again = UNetConfig.from_diffusers(config.to_diffusers())
        assert again == config, family
        assert config.to_diffusers()["down_block_types"] == kwargs["down_block_types"]


@pytest.mark.parametrize("key,value,match", [
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"], "AttnUpBlock2D"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("time_cond_proj_dim", 256, "time_cond_proj_dim=256"),
    ("encoder_hid_dim_type", "text_proj", "encoder_hid_dim_type='text_proj'"),
    ("num_attention_heads", 8, "num_attention_heads=8"),
    ("addition_embed_type", "image", "addition_embed_type='image'"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("cross_attention_dim", [32, 64], "per-block values must be equal"),
    ("attention_head_dim", [2, 4, 8], "one entry per block"),
    ("act_fn", "tanh", "activation 'tanh'"),
    ("not_a_diffusers_key", 1, "not_a_diffusers_key"),
])
def test_unsupported_config_values_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers({**FAMILIES["sd1"], key: value})


def test_defaults_of_unsupported_keys_are_accepted():
    # real SD2/SDXL configs spell these out at their defaults
    config = UNetConfig.from_diffusers({**FAMILIES["sd1"], "class_embed_type": None, "num_attention_heads": None,
                                        "dual_cross_attention": False, "resnet_time_scale_shift": "default",
                                        "time_embedding_type": "positional", "_diffusers_version": "0.19.0"})
    assert config.attention_head_dim == 4


def test_head_count_must_divide_channels():
    config = UNetConfig.from_diffusers({**FAMILIES["sd1"], "attention_head_dim": 5})
    with pytest.raises(ValueError, match="not divisible into 5 attention heads"):
        abstract_params(UNet2DConditionModel(config), *example_inputs(config))


def test_sdxl_needs_added_cond_and_checks_its_width():
    config = UNetConfig.from_diffusers(FAMILIES["sdxl"])
    sample, t, ctx, added = example_inputs(config)
    model = UNet2DConditionModel(config)
    with pytest.raises(ValueError, match="needs added_cond"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), sample, t, ctx, None))
    bad = {"text_embeds": jnp.zeros((1, TEXT_EMBED_DIM + 1)), "time_ids": added["time_ids"]}
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 64"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), sample, t, ctx, bad))
