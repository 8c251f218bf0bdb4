"""LoRA safetensors files without torch: the key layouts (PEFT/diffusers, kohya incl. SDXL's SGM
names), bit-exact round trips, rank/alpha as diffusers reads them, the errors for files that do not
fit or use unsupported adapter types, and the base-UNet fingerprint warning.

That diffusers loads these files into the same model outputs is tests/pipelines/test_lora_parity.py.
"""

from __future__ import annotations

import json
import warnings

import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from jaxsd.convert.lora import (
    LoraBaseWarning,
    LoraInfo,
    LoraModel,
    LoraWeights,
    combine_loras,
    read_lora,
    warn_if_other_base,
    write_lora,
)
from jaxsd.convert.lora_names import sgm_name
from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.convert.unet import abstract_unet_params
from jaxsd.errors import InputError
from jaxsd.models.params import fingerprint_params
from jaxsd.models.unet import UNetConfig
from tests.convert.lora_tiny import CLIP, CLIP2, TINY_SD, TINY_SDXL, random_lora


@pytest.fixture(scope="module")
def sd_model():
    return LoraModel("sd1", TINY_SD, {"text_encoder": CLIP})


@pytest.fixture(scope="module")
def sdxl_model():
    return LoraModel("sdxl", TINY_SDXL, {"text_encoder": CLIP, "text_encoder_2": CLIP2})


def tensors(path) -> dict[str, tuple]:
    f = SafetensorsFile(path)
    return {k: (f.dtype(k), f.shape(k), np.asarray(f[k]).tobytes()) for k in f}


def test_kohya_sdxl_names_round_trip_bit_exact(sdxl_model, tmp_path):
    lora = random_lora(sdxl_model, ml_dtypes.bfloat16)
    first = tmp_path / "first.safetensors"
    write_lora(first, lora, sdxl_model, layout="kohya", dtype=np.float16,
               info=LoraInfo("sdxl", rank=4, alpha=8, conv_rank=2, conv_alpha=1, targets="attn_ff", steps=7))
    keys = set(SafetensorsFile(first))
    # SDXL: kohya's SGM UNet names, te1/te2 prefixes, 0-d alphas in the file dtype
    for key in ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_out_0.lora_down.weight",
                "lora_unet_input_blocks_2_0_op.lora_up.weight",            # down_blocks.0.downsamplers.0.conv
                "lora_unet_input_blocks_3_0_skip_connection.alpha",        # down_blocks.1.resnets.0.conv_shortcut
                "lora_unet_middle_block_1_proj_in.lora_up.weight",
                "lora_unet_middle_block_2_out_layers_3.lora_down.weight",  # mid_block.resnets.1.conv2
                "lora_unet_output_blocks_1_2_conv.lora_down.weight",       # up_blocks.0.upsamplers.0.conv
                "lora_unet_output_blocks_3_0_in_layers_2.lora_down.weight",
                "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_up.weight",
                "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.alpha"):
        assert key in keys, key
    f = SafetensorsFile(first)
    assert f.shape("lora_unet_input_blocks_2_0_op.lora_down.weight") == (2, 32, 3, 3)
    assert f.shape("lora_unet_input_blocks_2_0_op.lora_up.weight") == (32, 2, 1, 1)
    assert f.shape("lora_unet_input_blocks_2_0_op.alpha") == () and float(f["lora_unet_input_blocks_2_0_op.alpha"]) == 1
    meta = f.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"} and meta["jaxsd.steps"] == "7"

    back = read_lora(first, sdxl_model)
    assert back.layout == "kohya" and back.count() == lora.count()
    second = tmp_path / "second.safetensors"
    write_lora(second, back, sdxl_model, layout="kohya")
    assert tensors(second) == tensors(first)


def test_kohya_spellings_kohya_and_diffusers_accept_read_and_keep_their_names(sd_model, tmp_path):
    """SD1 with SGM UNet names, `lora_te1_`, a missing alpha (= rank): all accepted, names kept on write."""
    rng = np.random.default_rng(1)
    conv_in = sd_model.tables["unet"].layers[("up_blocks_1", "resnets_0", "conv1")][2]
    state = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": rng.standard_normal((3, 32)),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": rng.standard_normal((32, 3)),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": np.array(1.5),
        "lora_unet_up_blocks_1_resnets_0_conv1.lora_down.weight": rng.standard_normal((2, conv_in, 3, 3)),
        "lora_unet_up_blocks_1_resnets_0_conv1.lora_up.weight": rng.standard_normal((32, 2, 1, 1)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rng.standard_normal((4, 32)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rng.standard_normal((64, 4)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": np.array(2.0, np.float16),
    }
    state = {k: v.astype(v.dtype if v.dtype == np.float16 else np.float32) for k, v in state.items()}
    src = tmp_path / "kohya.safetensors"
    save_file(state, src)
    lora = read_lora(src, sd_model)
    q = lora.layers["unet"][("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")]
    conv = lora.layers["unet"][("up_blocks_1", "resnets_0", "conv1")]
    fc1 = lora.layers["text_encoder"][("text_model", "encoder", "layers_0", "mlp", "fc1")]
    assert (q.alpha, q.rank, conv.alpha, conv.rank, fc1.alpha) == (1.5, 3, 2.0, 2, 2.0)
    np.testing.assert_array_equal(q.down, state["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q."
                                               "lora_down.weight"].T)
    out = tmp_path / "out.safetensors"
    write_lora(out, lora, sd_model, layout="kohya")
    written = tensors(out)
    # same keys and bytes, plus the alpha kohya would have written for the layer that had none
    assert {k: v for k, v in written.items() if k in state} == tensors(src)
    assert set(written) - set(state) == {"lora_unet_up_blocks_1_resnets_0_conv1.alpha"}
    # written fresh (no file names to keep), SD1 uses diffusers' names and lora_te_
    fresh = LoraWeights(lora.layers)
    write_lora(out, fresh, sd_model, layout="kohya")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in tensors(out)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in tensors(out)


def _diffusers_style_peft_file(path, rng):
    """As diffusers' save_lora_weights writes one from transformers 5 (CLIPTextModel without text_model.),
    fp16, LoraConfig.to_dict() metadata with diffusers' `^name` rank patterns."""
    state = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": rng.standard_normal((4, 32)),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": rng.standard_normal((64, 4)),
        "unet.down_blocks.0.resnets.0.conv2.lora_A.weight": rng.standard_normal((2, 32, 3, 3)),
        "unet.down_blocks.0.resnets.0.conv2.lora_B.weight": rng.standard_normal((32, 2, 1, 1)),
        "text_encoder.encoder.layers.1.self_attn.v_proj.lora_A.weight": rng.standard_normal((4, 32)),
        "text_encoder.encoder.layers.1.self_attn.v_proj.lora_B.weight": rng.standard_normal((32, 4)),
    }
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"^down_blocks.0.resnets.0.conv2": 2},
              "unet.alpha_pattern": {"down_blocks.0.resnets.0.conv2": 3}, "unet.use_dora": False,
              "unet.target_modules": ["to_k", "conv2"], "unet.peft_type": "LORA",
              "text_encoder.r": 4, "text_encoder.lora_alpha": 1, "text_encoder.use_rslora": False}
    save_file({k: v.astype(np.float16) for k, v in state.items()}, path,
              {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return state


def test_peft_round_trip_bit_exact_and_alphas_as_diffusers_reads_them(sd_model, tmp_path):
    src = tmp_path / "peft.safetensors"
    _diffusers_style_peft_file(src, np.random.default_rng(2))
    lora = read_lora(src, sd_model)
    assert lora.layout == "peft"
    conv = lora.layers["unet"][("down_blocks_0", "resnets_0", "conv2")]
    k = lora.layers["unet"][("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k")]
    v = lora.layers["text_encoder"][("text_model", "encoder", "layers_1", "self_attn", "v_proj")]
    assert (conv.rank, conv.alpha, k.rank, k.alpha, v.alpha) == (2, 3.0, 4, 8.0, 1.0)
    assert conv.down.shape == (3, 3, 32, 2) and conv.up.shape == (1, 1, 2, 32) and conv.down.dtype == np.float16
    out = tmp_path / "out.safetensors"
    write_lora(out, lora, sd_model, layout="peft")
    assert tensors(out) == tensors(src)
    # our metadata reads back to the same ranks and alphas (alpha_pattern/rank_pattern as PEFT matches them)
    again = read_lora(out, sd_model)
    assert {(c, p): (x.rank, x.alpha) for c, ls in again.layers.items() for p, x in ls.items()} == \
           {(c, p): (x.rank, x.alpha) for c, ls in lora.layers.items() for p, x in ls.items()}
    meta = json.loads(SafetensorsFile(out).metadata["lora_adapter_metadata"])
    assert len(meta["unet.rank_pattern"]) == 1 and {meta["unet.r"], *meta["unet.rank_pattern"].values()} == {2, 4}
    # without metadata diffusers takes alpha = rank
    plain = tmp_path / "plain.safetensors"
    save_file({k: np.asarray(f) for k, f in SafetensorsFile(src).items()}, plain)
    assert read_lora(plain, sd_model).layers["unet"][("down_blocks_0", "resnets_0", "conv2")].alpha == 2.0


def test_fresh_peft_file_names_and_metadata(sdxl_model, tmp_path):
    out = tmp_path / "lora.safetensors"
    write_lora(out, random_lora(sdxl_model), sdxl_model, info=LoraInfo("sdxl", rank=4, alpha=8, targets="attn_ff",
                                                                      base_unet_hash="abc"))
    f = SafetensorsFile(out)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj.lora_A.weight" in f
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_B.weight" in f
    meta = json.loads(f.metadata["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"], meta["text_encoder_2.lora_alpha"]) == (4, 8, 2)
    assert "encoder.layers.1.mlp.fc1" in meta["text_encoder_2.target_modules"]  # matches with or without text_model.
    assert {"jaxsd.base_model": "sdxl", "jaxsd.base_unet_hash": "abc", "jaxsd.targets": '"attn_ff"'}.items() \
        <= f.metadata.items()
    assert not any(k.startswith("ss_") for k in f.metadata)


def _write(path, state):
    save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, path)
    return path


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("state, message", [
    ({f"{Q}.lora_A.weight": np.zeros((4, 32)), f"{Q}.lora_B.weight": np.zeros((32, 3))},
     r"rank mismatch between down \(rank 4\) and up \(rank 3\)"),
    ({f"{Q}.lora_A.weight": np.zeros((4, 48)), f"{Q}.lora_B.weight": np.zeros((32, 4))}, r"do not fit the layer"),
    ({f"{Q}.lora_A.weight": np.zeros((4, 32))}, r"needs both down and up"),
    ({f"{Q}.lora_A.weight": np.zeros((4, 32)), f"{Q}.lora_B.weight": np.zeros((32, 4)),
      "unet.down_blocks.3.attentions.0.proj_in.lora_A.weight": np.zeros((4, 32)),
      "unet.down_blocks.3.attentions.0.proj_in.lora_B.weight": np.zeros((32, 4))},
     r"(?s)keys that name no adaptable layer.*down_blocks\.3\.attentions.*another architecture"),
    ({"lora_unet_x.hada_w1_a": np.zeros(2), "lora_unet_y.lokr_w1": np.zeros(2)}, r"LoHa.*LoKr"),
    ({f"{Q}.lora_A.weight": np.zeros((4, 32)), f"{Q}.lora_B.weight": np.zeros((32, 4)),
      f"{Q}.lora_magnitude_vector": np.zeros(32)}, r"DoRA"),
    ({"lora_unet_a.lora_down.weight": np.zeros((4, 32)), "lora_unet_a.dora_scale": np.zeros(32)}, r"DoRA"),
    ({f"{Q}.lora_A.weight": np.zeros((4, 32)), "lora_unet_a.lora_down.weight": np.zeros((4, 32))}, r"mixes PEFT"),
])
def test_files_that_do_not_fit_are_one_input_error_naming_the_keys(sd_model, tmp_path, state, message):
    with pytest.raises(InputError, match=message):
        read_lora(_write(tmp_path / "bad.safetensors", state), sd_model)


def test_sdxl_lora_on_sd1_names_the_first_keys(sd_model, sdxl_model, tmp_path):
    path = tmp_path / "xl.safetensors"
    write_lora(path, random_lora(sdxl_model), sdxl_model, layout="kohya")
    with pytest.raises(InputError, match=r"does not fit this sd1 model:\n.*keys that name no adaptable layer of the "
                                         r"model \(\d+ layers/keys\): lora_te2_text_model_encoder_layers_0_mlp_fc1\.\*, "
                                         r".*\.\.\.") as err:
        read_lora(path, sd_model)
    assert err.value.args[0].count("lora_") < 25  # the first keys, not hundreds
    assert "lora_unet_middle_block_1_proj_in: 2-D/2-D weights for a conv" in err.value.args[0]  # SD1's 1x1 proj


def test_unsupported_peft_options_and_inconsistent_metadata(sd_model, tmp_path):
    state = {f"{Q}.lora_A.weight": np.zeros((4, 32), np.float32), f"{Q}.lora_B.weight": np.zeros((32, 4), np.float32)}
    for config, message in (({"unet.r": 4, "unet.use_rslora": True}, "use_rslora"),
                            ({"unet.r": 8}, r"rank 4 in its tensors but 8 in the file's lora_adapter_metadata")):
        save_file(state, tmp_path / "m.safetensors", {"lora_adapter_metadata": json.dumps(config)})
        with pytest.raises(InputError, match=message):
            read_lora(tmp_path / "m.safetensors", sd_model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="junk.safetensors"):
        read_lora(tmp_path / "junk.safetensors", sd_model)
    with pytest.raises(InputError, match="no such file"):
        read_lora(tmp_path / "missing.safetensors", sd_model)


def test_variables_scale_and_several_loras_concatenate(sd_model):
    a, b = random_lora(sd_model, seed=3), random_lora(sd_model, seed=4)
    v = combine_loras([(a, 0.5), (b, 2.0)])
    q = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
    node = v["unet"]
    for part in q:
        node = node[part]
    assert node["down"].shape == (32, 8) and node["up"].shape == (8, 32)
    np.testing.assert_allclose(node["scale"], [0.5 * 8 / 4] * 4 + [2.0 * 8 / 4] * 4)
    np.testing.assert_array_equal(node["down"][:, 4:], b.layers["unet"][q].down)


def test_base_fingerprint_is_dtype_independent_and_a_different_base_warns(sd_model, tmp_path):
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(5)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((64, 33)), jnp.float32)},
              "b": {"scale": jnp.asarray(rng.standard_normal(7), jnp.float32)}}
    fp = fingerprint_params(params)
    assert fp == fingerprint_params(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    assert fp != fingerprint_params({**params, "b": {"scale": params["b"]["scale"] * 1.01}})
    assert len(fp) == 16 and fp == fingerprint_params(params)

    path = tmp_path / "l.safetensors"
    write_lora(path, random_lora(sd_model), sd_model, info=LoraInfo("sd1", base_unet_hash=fp))
    lora = read_lora(path, sd_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_other_base(lora, fp)
    with pytest.warns(LoraBaseWarning, match=f"another base UNet.*{fp}"):
        assert warn_if_other_base(lora, "0123456789abcdef")


def test_sgm_names_equal_kohyas_sdxl_conversion_map():
    """Pairs from kohya's library/sdxl_model_util.make_unet_conversion_map for the real SDXL UNet."""
    sdxl = UNetConfig(block_out_channels=(320, 640, 1280), layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    pairs = {
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_out.0":
            "input_blocks.7.1.transformer_blocks.9.attn2.to_out.0",
        "down_blocks.2.resnets.1.conv2": "input_blocks.8.0.out_layers.3",
        "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
        "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj":
            "output_blocks.2.1.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.attentions.0.proj_in": "output_blocks.3.1.proj_in",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "time_embedding.linear_1": "time_embed.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_out": "out.2",
    }
    assert {name: sgm_name(name, sdxl) for name in pairs} == pairs


def test_every_adaptable_unet_layer_has_one_kohya_and_one_peft_name(sdxl_model):
    table = sdxl_model.tables["unet"]
    kernels = [p for p in traverse_util.flatten_dict(abstract_unet_params(TINY_SDXL)) if p[-1] == "kernel"]
    assert len(set(table.kohya.values())) == len(table.layers) == len(set(table.peft.values())) == len(kernels)
    for path in table.layers:
        assert table.lookup(table.kohya[path]) == path
        assert table.lookup("unet." + table.peft[path]) == path
