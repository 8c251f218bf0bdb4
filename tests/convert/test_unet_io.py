"""UNet folders: diffusers → jaxsd → save → diffusers is bit-exact with an equal config;
load options (dtype, variant, shards); bad folders fail with errors that name the problem.

Nothing here runs the model (loading validates against `jax.eval_shape` only), so
these tests are quick; the numerical parity lives in tests/models/test_unet.py.
"""

from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.convert.folder import ComponentError
from jaxsd.convert.rules import ConversionError
from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.convert.unet import load_unet, save_unet
from tests.models.test_unet import FAMILIES, build_diffusers_unet

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """(diffusers model, folder it was saved to) for the SDXL-shaped family."""
    model = build_diffusers_unet("sdxl")
    folder = tmp_path_factory.mktemp("sdxl")
    model.save_pretrained(folder)
    return model, folder


def _comparable(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.torch
@pytest.mark.parametrize("family", ["sdxl", "hybrid"])
def test_round_trip_is_bit_exact_and_loads_cleanly(family, sdxl_folder, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.utils import logging as dlogging

    if family == "sdxl":
        model, src = sdxl_folder
    else:
        model, src = build_diffusers_unet(family), tmp_path / "src"
        model.save_pretrained(src)
    config, params = load_unet(src)
    save_unet(tmp_path / "out", config, params)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    dlogging.get_logger("diffusers").addHandler(handler)
    try:
        # low_cpu_mem_usage=False: without `accelerate` diffusers warns about that instead
        again, info = TorchUNet.from_pretrained(tmp_path / "out", output_loading_info=True, low_cpu_mem_usage=False)
    finally:
        dlogging.get_logger("diffusers").removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    assert _comparable(again.config) == _comparable(model.config)

    ref, got = model.state_dict(), again.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k


@pytest.mark.torch
def test_load_dtype_variant_and_shards(sdxl_folder, tmp_path):
    _, src = sdxl_folder
    config, params = load_unet(src)
    bf16_config, bf16 = load_unet(src, dtype=jnp.bfloat16)
    assert bf16_config == config
    assert {a.dtype for a in _leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}

    save_unet(tmp_path / "v", config, params, dtype=np.float16, variant="fp16", max_shard_bytes=20_000)
    assert (tmp_path / "v" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    with pytest.raises(ComponentError):
        load_unet(tmp_path / "v")  # the variant must be asked for
    _, fp16 = load_unet(tmp_path / "v", variant="fp16")
    for a, b in zip(_leaves(params), _leaves(fp16), strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a).astype(np.float16).astype(np.float32), np.asarray(b))


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _copy_folder(src, dst, edit_config=None, edit_state=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    f = SafetensorsFile(src / WEIGHTS)
    state = {k: np.asarray(f[k]) for k in f}
    if edit_state:
        edit_state(state)
    save_file(state, dst / WEIGHTS)
    return dst


@pytest.mark.torch
def test_unknown_block_type_names_key_and_value(sdxl_folder, tmp_path):
    _, src = sdxl_folder

    def edit(c):
        c["down_block_types"][0] = "KDownBlock2D"

    with pytest.raises(ValueError, match=r"down_block_types.*'KDownBlock2D' is not supported"):
        load_unet(_copy_folder(src, tmp_path / "bad", edit_config=edit))


@pytest.mark.torch
def test_missing_key_is_listed(sdxl_folder, tmp_path):
    _, src = sdxl_folder
    key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"

    def edit(s):
        del s[key]

    with pytest.raises(ConversionError, match=r"missing keys \(1\): " + key.replace(".", r"\.")):
        load_unet(_copy_folder(src, tmp_path / "bad", edit_state=edit))


@pytest.mark.torch
def test_shape_mismatch_is_listed(sdxl_folder, tmp_path):
    _, src = sdxl_folder

    def edit(c):
        c["cross_attention_dim"] = 32  # the checkpoint's to_k/to_v are 48 wide

    with pytest.raises(ConversionError, match=r"shape mismatches \(\d+\):.*attn2\.to_k\.weight: checkpoint "
                                              r"\(\d+, 48\) vs model"):
        load_unet(_copy_folder(src, tmp_path / "bad", edit_config=edit))


@pytest.mark.torch
def test_pickle_checkpoint_refused(sdxl_folder, tmp_path):
    _, src = sdxl_folder
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "p" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(Exception, match=r"(?i)pickle"):
        load_unet(tmp_path / "p")


def test_save_refuses_params_that_do_not_fit_the_config(tmp_path):
    from jaxsd.models.unet import UNetConfig
    from tests.models.test_unet import random_params

    config = UNetConfig.from_diffusers({**FAMILIES["sd1"], "block_out_channels": [16, 32], "layers_per_block": 1})
    params = random_params(config)
    other = UNetConfig.from_diffusers({**FAMILIES["sd1"], "block_out_channels": [16, 32], "layers_per_block": 1,
                                       "cross_attention_dim": 24})
    with pytest.raises(ConversionError, match=r"attn2/to_k/kernel: \(32, \d+\) vs config \(24, \d+\)"):
        save_unet(tmp_path / "x", other, params)
    assert not (tmp_path / "x").exists()


@pytest.mark.torch
def test_loading_compiles_no_program_per_param_shape(sdxl_folder):
    """Params are placed with device_put: jnp.asarray compiled an identity program per distinct shape
    (79 for the bench's `small` UNet, ~0.1 GB of executables kept for the process's life)."""
    import jax

    compiles, listening = [], [True]

    def listener(event, duration, **kw):  # listeners cannot be removed: switched off at the end instead
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        _, params = load_unet(sdxl_folder[1])
    finally:
        listening[0] = False
    # what remains is a fixed handful (the example inputs' zeros for jax.eval_shape), not one per shape
    assert len(jax.tree.leaves(params)) > 100
    assert len(compiles) <= 8, f"{len(compiles)} XLA compilations while loading a UNet folder"
