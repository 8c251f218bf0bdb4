"""CLIP text encoders: parity with transformers PyTorch, EOS pooling rules, load/save round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.convert.folder import ComponentError
from jaxsd.convert.rules import ConversionError
from jaxsd.convert.safetensors_io import SafetensorsFile
from jaxsd.convert.text_encoders import load_clip, save_clip
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel, eos_positions
from tests.helpers import rel_err

VOCAB, LENGTH = 1000, 16
# CLIP-L-like: quick_gelu, legacy config (eos_token_id == 2 → pool at argmax of ids; EOS 999 is the largest id).
CLIP_L = {"hidden_act": "quick_gelu", "eos_token_id": 2, "bos_token_id": 998, "pad_token_id": 1}
# OpenCLIP-like: gelu + text_projection, eos_token_id rule with an EOS id that is NOT the largest id.
OPEN_CLIP = {"hidden_act": "gelu", "eos_token_id": 500, "bos_token_id": 998, "pad_token_id": 0}


def _torch_model(flavour: dict, with_projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel
    from transformers import CLIPTextModelWithProjection as HFProj

    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=LENGTH, projection_dim=24, **flavour)
    model = (HFProj if with_projection else HFModel)(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so every term matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _ids(eos: int, pad: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for n in (5, LENGTH - 2, 9):
        body = rng.integers(1, 990, size=n)
        body[body == eos] = 3
        row = [998, *body, eos][:LENGTH]
        rows.append(row + [pad] * (LENGTH - len(row)))
    return np.asarray(rows, np.int64)


@pytest.fixture(scope="module", params=["clip_l", "open_clip"])
def flavour(request, tmp_path_factory):
    """(name, folder, torch model, ids, attention_mask) for each flavour, saved by transformers."""
    name = request.param
    spec, proj, eos, pad = (CLIP_L, False, 999, 999) if name == "clip_l" else (OPEN_CLIP, True, 500, 0)
    model = _torch_model(spec, proj, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    ids = _ids(eos, pad, seed=1)
    mask = (np.arange(LENGTH)[None] < np.asarray([7, LENGTH, 11])[:, None]).astype(np.int64)
    return name, folder, model, ids, mask


@pytest.mark.torch
def test_parity_with_transformers(flavour):
    import torch

    name, folder, model, ids, mask = flavour
    config, params = load_clip(folder)
    assert config.with_projection == (name == "open_clip")
    flax_model = CLIPTextModel(config)
    apply = jax.jit(lambda p, i, m: flax_model.apply({"params": p}, i, m))
    # CLIP-L as diffusers runs it (no padding mask); OpenCLIP with a padding mask combined with the causal one.
    for m in [None] if name == "clip_l" else [mask]:
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m),
                        output_hidden_states=True)
        out = apply(params, jnp.asarray(ids, jnp.int32), None if m is None else jnp.asarray(m))
        assert len(out.hidden_states) == len(ref.hidden_states) == 4
        assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= 1e-4
        assert rel_err(out.hidden_states[-2], ref.hidden_states[-2]) <= 1e-4  # SDXL / clip-skip layer
        assert rel_err(out.hidden_states[-1], ref.hidden_states[-1]) <= 1e-4  # before the final norm
        if name == "open_clip":
            assert rel_err(out.text_embeds, ref.text_embeds) <= 1e-4
        else:
            assert rel_err(out.pooled, ref.pooler_output) <= 1e-4


def test_eos_positions_follow_the_config_rule():
    ids = jnp.asarray([[998, 5, 999, 700, 999], [998, 500, 7, 500, 999]])
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 4])  # legacy: largest id
    np.testing.assert_array_equal(eos_positions(ids, 500), [0, 1])  # first eos (row 0 has none → 0, as torch)
    np.testing.assert_array_equal(eos_positions(ids, 999), [2, 4])


@pytest.mark.torch
def test_save_round_trip_is_bit_exact_and_loads_in_transformers(flavour, tmp_path):
    from transformers import CLIPTextModel as HFModel
    from transformers import CLIPTextModelWithProjection as HFProj

    name, folder, model, _, _ = flavour
    config, params = load_clip(folder)
    save_clip(tmp_path, config, params)
    cls = HFProj if name == "open_clip" else HFModel
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = model.state_dict()
    saved = SafetensorsFile(tmp_path / "model.safetensors")
    for k, v in reloaded.state_dict().items():
        if k.endswith("position_ids"):
            continue
        np.testing.assert_array_equal(v.numpy(), ref[k].numpy())
    assert all(k.startswith(("text_model.", "text_projection.")) for k in saved)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls.__name__]
    config2, params2 = load_clip(tmp_path)
    assert config2 == config
    # A config.json without `architectures`: the projection is inferred from the weights.
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_clip(tmp_path)[0].with_projection == (name == "open_clip")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


@pytest.mark.torch
def test_bf16_load_is_a_per_tensor_cast(flavour):
    _, folder, *_ = flavour
    _, p32 = load_clip(folder)
    _, p16 = load_clip(folder, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_legacy_prefix_buffers_and_errors(tmp_path):
    """Old checkpoints carry `text_model.embeddings.position_ids`; a missing tensor is named; pickles refused."""
    from jaxsd.convert.safetensors_io import save_file
    from jaxsd.models.clip import example_inputs
    from jaxsd.models.params import abstract_params

    config = CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=6)
    abstract, _ = abstract_params(CLIPTextModel(config), *example_inputs(config))
    rng = np.random.default_rng(0)  # random values without eager per-op init (slow on CPU)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    save_clip(tmp_path / "ok", config, params)
    state = dict(SafetensorsFile(tmp_path / "ok" / "model.safetensors"))
    state["text_model.embeddings.position_ids"] = np.arange(6, dtype=np.int64)[None]
    save_file(state, tmp_path / "ok" / "model.safetensors")
    _, loaded = load_clip(tmp_path / "ok")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, loaded)

    del state["text_model.final_layer_norm.weight"]
    save_file(state, tmp_path / "ok" / "model.safetensors")
    with pytest.raises(ConversionError, match="text_model.final_layer_norm.weight"):
        load_clip(tmp_path / "ok")

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ComponentError, match="pickle"):
        load_clip(tmp_path / "pickled")
