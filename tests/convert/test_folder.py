"""Generic loader proofs: component folders and safetensors files on disk.

A three-layer Flax module (conv, group norm, linear) stands in for any model:
what is proven here — file formats, shards, variants, pickle refusal, dtype at
load, corrupt input — is the same code path every model's `load_*` takes. The
expected Flax arrays are written out by hand (OIHW→HWIO, .T) so the check does
not lean on the rules it exercises.
"""

from __future__ import annotations

import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxsd.convert.folder import DIFFUSERS_WEIGHTS, ComponentError, save_weights
from jaxsd.convert.load import load_params, save_params
from jaxsd.convert.rules import ConversionError
from jaxsd.convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from jaxsd.models.layers import Conv, Dense, GroupNorm

WEIGHTS = f"{DIFFUSERS_WEIGHTS}.safetensors"


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Conv(4, 3, name="down_blocks_0")(x)
        x = GroupNorm(2, name="norm")(x)
        return Dense(6, name="proj")(x)


EXAMPLE = (jnp.zeros((1, 4, 4, 3)),)


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"down_blocks.0.weight": f(4, 3, 3, 3), "down_blocks.0.bias": f(4), "norm.weight": f(4),
            "norm.bias": f(4), "proj.weight": f(6, 4), "proj.bias": f(6)}


def _expected(state) -> dict:
    return {"down_blocks_0": {"kernel": state["down_blocks.0.weight"].transpose(2, 3, 1, 0),
                              "bias": state["down_blocks.0.bias"]},
            "norm": {"scale": state["norm.weight"], "bias": state["norm.bias"]},
            "proj": {"kernel": state["proj.weight"].T, "bias": state["proj.bias"]}}


def _folder(tmp_path, state, name=WEIGHTS):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text("{}")
    save_file(state, tmp_path / name, {"format": "pt"})
    return tmp_path


def _load(folder, **kw):
    return load_params(folder, Tiny(), EXAMPLE, weights_name=DIFFUSERS_WEIGHTS, **kw)


def _assert_tree_equal(got, want, dtype=None):
    flat_got, flat_want = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, g), (_, w) in zip(flat_got, flat_want):
        w = np.asarray(w if dtype is None else np.asarray(w).astype(dtype))
        assert g.dtype == w.dtype, path
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=str(path))


def test_single_file_loads_exactly_and_saves_back_identically(tmp_path):
    state = _state()
    params = _load(_folder(tmp_path / "in", state))
    _assert_tree_equal(params, _expected(state))
    save_params(tmp_path / "out", params, {"a": 1}, weights_name=DIFFUSERS_WEIGHTS)
    back = SafetensorsFile(tmp_path / "out" / WEIGHTS)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"a": 1}


def test_load_at_bfloat16_keeps_params_bfloat16(tmp_path):
    state = _state()
    params = _load(_folder(tmp_path, state), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _assert_tree_equal(params, _expected(state), dtype=ml_dtypes.bfloat16)


def test_sharded_index_checkpoint(tmp_path):
    state = _state()
    save_weights(tmp_path, state, DIFFUSERS_WEIGHTS, max_shard_bytes=200)
    (tmp_path / "config.json").write_text("{}")
    index = json.loads((tmp_path / f"{WEIGHTS}.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / WEIGHTS).exists()
    _assert_tree_equal(_load(tmp_path), _expected(state))
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(ComponentError, match=f"shard files missing: {shards[-1]}"):
        _load(tmp_path)


def test_fp16_variant_file(tmp_path):
    state = _state()
    half = {k: v.astype(np.float16) for k, v in state.items()}
    _folder(tmp_path, half, f"{DIFFUSERS_WEIGHTS}.fp16.safetensors")
    params = _load(tmp_path, variant="fp16")  # stored fp16, loaded into the fp32 model tree
    _assert_tree_equal(params, _expected({k: v.astype(np.float32) for k, v in half.items()}))
    with pytest.raises(ComponentError, match=r"no diffusion_pytorch_model\.safetensors .*fp16\.safetensors"):
        _load(tmp_path)  # no default file: the error lists what the folder has
    sharded = tmp_path / "sharded"  # diffusers' names: <name>.safetensors.index.fp16.json + <name>.fp16-0000i-of-...
    save_weights(sharded, half, DIFFUSERS_WEIGHTS, variant="fp16", max_shard_bytes=200)
    (sharded / "config.json").write_text("{}")
    assert (sharded / f"{WEIGHTS}.index.fp16.json").is_file()
    assert (sharded / f"{DIFFUSERS_WEIGHTS}.fp16-00001-of-00003.safetensors").is_file()
    _assert_tree_equal(_load(sharded, variant="fp16"), params)


def test_a_tensor_is_mapped_only_while_it_is_held(tmp_path):
    """Each tensor is a map of its own bytes, gone once the array is dropped, while the file object
    lives on: one map of the whole file kept every page read in the process's RSS (file + params)."""
    import gc

    state = _state()
    path = _folder(tmp_path, state) / WEIGHTS
    f = SafetensorsFile(path)
    read = {k: f[k] for k in f}
    for k in state:
        np.testing.assert_array_equal(read[k], state[k])
    assert str(path) in open("/proc/self/maps").read()
    del read
    gc.collect()
    assert str(path) not in open("/proc/self/maps").read()
    assert len(f) == len(state)  # still open for more reads


def test_truncated_file_is_refused_with_the_file_named(tmp_path):
    path = _folder(tmp_path, _state()) / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match=rf"{WEIGHTS}: tensor .* the file is truncated"):
        _load(tmp_path)
    path.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(SafetensorsError, match="header claims .* truncated or not safetensors"):
        _load(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(SafetensorsError, match="too short for a safetensors header"):
        _load(tmp_path)


def test_corrupt_header_is_refused(tmp_path):
    path = _folder(tmp_path, _state()) / WEIGHTS
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"\xff" * n
    path.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match="header is not valid JSON"):
        _load(tmp_path)
    header = {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}  # 3 floats need 12 bytes
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
    with pytest.raises(SafetensorsError, match="byte range does not match its shape"):
        _load(tmp_path)


def test_checkpoint_not_matching_the_model_is_one_error(tmp_path):
    state = _state()
    del state["norm.bias"]
    state["proj.weight"] = state["proj.weight"][:5]
    state["proj.extra"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError) as e:
        _load(_folder(tmp_path, state))
    msg = str(e.value)
    assert "missing keys (1): norm.bias" in msg
    assert "unexpected keys (1): proj.extra" in msg
    assert "proj.weight: checkpoint (5, 4) vs model (4, 6) (as proj/kernel)" in msg


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(ComponentError, match="does not exist"):
        _load(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ComponentError, match="folder has: config.json"):
        _load(tmp_path)


@pytest.mark.torch
def test_pickle_only_checkpoint_is_refused_unless_opted_in(tmp_path):
    import torch

    state = _state()
    (tmp_path / "config.json").write_text("{}")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / f"{DIFFUSERS_WEIGHTS}.bin")
    with pytest.raises(ComponentError) as e:
        _load(tmp_path)
    msg = str(e.value)
    for part in ("only pickle weights found (diffusion_pytorch_model.bin)", "arbitrary code",
                 "save_pretrained(folder, safe_serialization=True)", "allow_pickle=True"):
        assert part in msg
    _assert_tree_equal(_load(tmp_path, allow_pickle=True), _expected(state))


def test_safetensors_library_and_our_io_read_each_other(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"f32": rng.standard_normal((2, 3)).astype(np.float32),
               "f16": rng.standard_normal(5).astype(np.float16),
               "bf16": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
               "i64": np.arange(4, dtype=np.int64), "u8": np.arange(3, dtype=np.uint8),
               "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}
    save_file(tensors, tmp_path / "ours.safetensors", {"format": "pt"})
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    safetensors.numpy.save_file(tensors, tmp_path / "theirs.safetensors", {"format": "pt"})
    ours = SafetensorsFile(tmp_path / "theirs.safetensors")
    assert ours.metadata == {"format": "pt"}
    for k, v in tensors.items():
        for got in (theirs[k], ours[k]):
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert got.tobytes() == v.tobytes(), k  # bit-identical, bf16 included
    # same tensors, same bytes: our writer is deterministic (sorted names)
    save_file(dict(reversed(list(tensors.items()))), tmp_path / "again.safetensors", {"format": "pt"})
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


def test_bfloat16_round_trip_through_a_folder(tmp_path):
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in _state().items()}
    params = _load(_folder(tmp_path / "in", state), dtype=jnp.bfloat16)
    save_params(tmp_path / "out", params, {}, weights_name=DIFFUSERS_WEIGHTS)
    back = SafetensorsFile(tmp_path / "out" / WEIGHTS)
    for k, v in state.items():
        assert back.dtype(k) == v.dtype and back[k].tobytes() == v.tobytes(), k


def test_zero_dim_tensors_stay_zero_dim(tmp_path):
    """0-d tensors (e.g. CLIP's logit_scale) keep shape () through save and flax_to_torch."""
    from jaxsd.convert.rules import flax_to_torch

    assert flax_to_torch({"logit_scale": jnp.float32(2.0)})["logit_scale"].shape == ()
    save_file({"s": np.array(2.5, np.float32)}, tmp_path / "s.safetensors")
    assert SafetensorsFile(tmp_path / "s.safetensors")["s"].shape == ()
    assert safetensors.numpy.load_file(tmp_path / "s.safetensors")["s"].shape == ()


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(16):
            x = Dense(1024, use_bias=False, name=f"layers_{i}")(x)
        return x


def test_bfloat16_load_never_holds_an_fp32_copy_of_the_model(tmp_path):
    """16 × 4 MiB fp32 tensors loaded at bf16: host allocations peak at a few tensors' worth (one is
    read, cast and placed at a time), not at the model."""
    import tracemalloc

    rng = np.random.default_rng(0)
    state = {f"layers.{i}.weight": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(16)}
    one, total = 4 * 1024 * 1024, sum(v.nbytes for v in state.values())
    _folder(tmp_path, state)
    del state
    tracemalloc.start()
    try:
        params = load_params(tmp_path, Wide(), (jnp.zeros((1, 1024)),), weights_name=DIFFUSERS_WEIGHTS,
                             dtype=jnp.bfloat16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert peak < 3 * one, f"peak host allocation {peak} bytes for a {total}-byte fp32 checkpoint"
