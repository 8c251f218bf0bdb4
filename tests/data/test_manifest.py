"""Fingerprints: content not layout, any weight change detected, remembered across processes."""

import json

import numpy as np

from jaxsd.convert.folder import save_weights
from jaxsd.data import manifest
from jaxsd.data.manifest import fingerprint_folder


def _folder(path, state, shard=None, extra_config=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"scaling_factor": 0.18215, **(extra_config or {})}))
    save_weights(path, state, "diffusion_pytorch_model", max_shard_bytes=shard)
    return path


def test_fingerprint_is_content_not_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    state = {f"layer{i}.weight": rng.standard_normal((8, 8)).astype(np.float32) for i in range(4)}
    single = fingerprint_folder(_folder(tmp_path / "single", state))
    sharded_dir = _folder(tmp_path / "sharded", state, shard=600)
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    assert fingerprint_folder(sharded_dir) == single  # same weights split differently
    # library-version keys of config.json do not count; real config keys do
    assert fingerprint_folder(_folder(tmp_path / "ver", state, extra_config={"_diffusers_version": "9"})) == single
    assert fingerprint_folder(_folder(tmp_path / "cfg", state, extra_config={"scaling_factor": 0.13025})) != single
    changed = dict(state, **{"layer2.weight": state["layer2.weight"].copy()})
    changed["layer2.weight"][3, 3] += 1e-3
    assert fingerprint_folder(_folder(tmp_path / "changed", changed)) != single


def test_fingerprint_memo_survives_the_process_and_notices_changes(tmp_path, monkeypatch):
    state = {"w": np.ones((4, 4), np.float32)}
    folder = _folder(tmp_path / "m", state)
    first = fingerprint_folder(folder)
    manifest._fingerprint_memo.clear()  # as in a new process: only the on-disk memo is left

    def no_hashing(*a):
        raise AssertionError("hashed again although nothing changed")

    monkeypatch.setattr(manifest, "_hash_state", no_hashing)
    assert fingerprint_folder(folder) == first
    monkeypatch.undo()
    save_weights(folder, {"w": np.zeros((4, 4), np.float32)}, "diffusion_pytorch_model")  # same size, new bytes
    assert fingerprint_folder(folder) != first
