"""A run that starts from a single-file checkpoint and ends as one.

The tiny pipeline (tests/train/tiny_pipeline.py) as a single file `jaxsd convert --single-file` writes;
`jaxsd cache` with `data.cache.vae=FILE`, `jaxsd train` with `model.pretrained=FILE` (both read the file
in place), then `jaxsd export --single-file` (VAE and text encoder from the run's model.pretrained, the file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxsd.cli import main
from jaxsd.convert.folder import open_weights
from jaxsd.convert.safetensors_io import SafetensorsFile
from jaxsd.convert.single_file.read import SingleFile
from tests.helpers import jaxsd_command
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEP = 2


POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def with_extras(written: Path, out: Path) -> Path:
    """The file as A1111 users have it: with CLIP's position_ids and the training EMA (model_ema.*)."""
    from jaxsd.convert.safetensors_io import save_file
    from jaxsd.convert.single_file.layout import ema_key

    f = SafetensorsFile(written)
    tensors = {k: np.asarray(f[k]) for k in f}
    tensors.update({ema_key(k): v for k, v in tensors.items() if k.startswith("model.diffusion_model.")})
    tensors[POSITION_IDS] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, out, f.metadata)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.data.fakes import make_images

    base = tmp_path_factory.mktemp("single_file_run")
    pipe = tiny_pipeline(base / "pipe")
    written = base / "written.safetensors"
    jaxsd_command("convert", pipe, "--out", written, "--single-file")
    file = with_extras(written, base / "model.safetensors")
    images = make_images(base / "images", 2)
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {file}}}
optimizer: {{learning_rate: 0.01}}
train: {{run_dir: {base / 'run'}, steps: {STEP}, batch_size: 2, data_source: cache}}
checkpoint: {{every: 100, async_save: false}}
logging: {{every: 1, progress_bar: false}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {file}, text_encoder: {pipe}, text: clip, dtype: float32, batch_size: 2}}
  loader: {{batch_size: 2, threads: 1, prefetch: 1}}
""")
    jaxsd_command("cache", yaml, "--no-progress")
    proc = jaxsd_command("train", yaml)
    return base, pipe, file, base / "run", proc.stdout + proc.stderr


def _state(mapping) -> dict[str, np.ndarray]:
    return {k: np.asarray(mapping[k]) for k in mapping}


def test_train_from_a_single_file_and_export_one(run):
    base, pipe, file, run_dir, log = run
    assert f"pretrained single file {file}" in log
    # the cache's VAE fingerprint is the folder's: the file's VAE is the same tensors
    from jaxsd.data.manifest import fingerprint_folder
    from jaxsd.data.model_encoders import vae_folder
    assert fingerprint_folder(vae_folder(file)) == fingerprint_folder(pipe / "vae")

    out = base / "trained.safetensors"
    proc = jaxsd_command("export", run_dir, "--single-file", "--out", out, "--dtype", "float16")
    assert f"step {STEP} → {out}: sd1 single file" in proc.stdout and str(file) in proc.stdout
    folder = base / "trained_folder"
    # the same UNet as a diffusers folder (in this process: `jaxsd export` runs as a command in test_export.py)
    assert main(["export", str(run_dir), "--out", str(folder), "--pipeline", str(pipe)]) == 0

    exported = SingleFile(out)
    meta = exported.metadata
    assert meta["jaxsd.steps"] == str(STEP) and meta["jaxsd.prediction_type"] == "epsilon"
    assert json.loads(meta["jaxsd.scheduler"])["prediction_type"] == "epsilon"
    trained = _state(open_weights(folder / "unet", "diffusion_pytorch_model"))
    got = _state(exported.state("unet"))
    assert got.keys() == trained.keys()
    for k in trained:
        assert got[k].dtype == np.float16
        np.testing.assert_array_equal(got[k], trained[k].astype(np.float16), err_msg=k)
    assert not np.array_equal(trained["conv_in.weight"], np.asarray(open_weights(pipe / "unet", "diffusion_pytorch_model")["conv_in.weight"]))
    source = SingleFile(file)
    for name in ("vae", "text_encoder"):  # from the base file, cast
        want, have = _state(source.state(name)), _state(exported.state(name))
        assert want.keys() == have.keys()
        for k in want:
            np.testing.assert_array_equal(have[k], want[k].astype(np.float16), err_msg=f"{name}.{k}")
    keys = set(SafetensorsFile(out))  # the base's text-encoder extras carried over; its UNet's EMA is not
    assert POSITION_IDS in keys and not any(k.startswith("model_ema") for k in keys)


def test_export_refuses_an_existing_file_and_unet_only(run, tmp_path, capsys):
    _, _, file, run_dir, _ = run
    assert main(["export", str(run_dir), "--single-file", "--out", str(file)]) == 2
    assert "exists; jaxsd does not overwrite a file" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--single-file", "--unet-only", "--out", str(tmp_path / "u.safetensors")]) == 2
    assert "--unet-only is for folders" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--dtype", "float16", "--out", str(tmp_path / "f")]) == 2
    assert "--dtype is for --single-file" in capsys.readouterr().err
