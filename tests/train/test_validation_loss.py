"""The validation loss (`validation:`), through `jaxsd train` on data made by `jaxsd cache`: a tiny pipeline's
UNet fine-tuned on 4 cached images, with a held-out folder cached by `jaxsd cache` too (copies of the training
images: the run is meant to learn them, so the fixed-noise loss on them must drop).

* metrics.jsonl has val/loss and val/loss_t{T} at step 0 (before any update) and every `validation.every`
  steps, and they drop as the run learns;
* evaluating the same params twice gives the same numbers, and the step-0 record is what jaxsd's evaluator
  gives for the run's initial params;
* a held-out set too small for one batch is refused by name.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from jaxsd.config import load_config
from tests.data.fakes import make_images
from tests.helpers import jaxsd_command
from tests.train.cli_runs import records
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEPS, EVERY, TIMESTEPS = 8, 4, (100, 500, 900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("validation_loss")
    pipe = tiny_pipeline(base / "pipe")
    images = make_images(base / "images", 4)
    held_out = base / "held_out"
    shutil.copytree(images, held_out)
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {base / 'run'}, steps: {STEPS}, batch_size: 4, data_source: cache}}
optimizer: {{learning_rate: 0.01}}
checkpoint: {{every: {STEPS}, async_save: false}}
logging: {{every: 1, progress_bar: false, tensorboard: true}}
validation: {{roots: [{held_out}], every: {EVERY}, timesteps: {list(TIMESTEPS)}, seed: 3, batch_size: 2}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: clip, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
""")
    jaxsd_command("cache", yaml, "--no-progress")
    jaxsd_command("cache", yaml, f"data.roots=[{held_out}]", "--no-progress")
    jaxsd_command("train", yaml)
    return base, yaml


def _val_records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "val/loss" in r}


def test_validation_loss_is_logged_and_drops_as_the_run_learns(run):
    from jaxsd.train.logging import read_scalars

    base, _ = run
    val = _val_records(base / "run")
    assert sorted(val) == [0, 4, 8]
    keys = {"step", "val/loss", *(f"val/loss_t{t}" for t in TIMESTEPS)}
    assert all(set(r) == keys for r in val.values())
    for r in val.values():  # val/loss is the mean over the timesteps
        assert r["val/loss"] == pytest.approx(np.mean([r[f"val/loss_t{t}"] for t in TIMESTEPS]), rel=1e-6)
    assert val[8]["val/loss"] < val[4]["val/loss"] < 0.95 * val[0]["val/loss"], val
    # the training records are untouched: one per step, no val keys
    train = [r for r in records(base / "run") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    scalars = read_scalars(base / "run" / "tensorboard")
    assert [s for s, _ in scalars["val/loss"]] == [0, 4, 8]
    assert scalars["val/loss_t500"][-1][1] == pytest.approx(val[8]["val/loss_t500"], rel=1e-6)


def test_the_same_params_give_the_same_validation_loss(run):
    from jaxsd.train.model import initial_params
    from jaxsd.train.plan import fresh_state, plan_state
    from jaxsd.train.sharding import make_mesh
    from jaxsd.train.validation import Validator

    base, yaml = run
    cfg = load_config(yaml)
    mesh = make_mesh(cfg.sharding)
    plan = plan_state(cfg, mesh)
    params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings)
    state = fresh_state(cfg, plan, params)
    validator = Validator.from_config(cfg, plan, mesh)
    first = validator.losses(state.params, state.frozen)
    second = validator.losses(state.params, state.frozen)
    assert first == second  # bit for bit: fixed noise, fixed timesteps, the same batches
    logged = _val_records(base / "run")[0]
    for k, v in first.items():  # what the run logged before its first update
        assert v == pytest.approx(logged[k], rel=1e-5), k
    moved = jax.tree.map(lambda p: p * 1.01, state.params)
    assert validator.losses(moved, state.frozen)["val/loss"] != first["val/loss"]  # it does see the params


def test_a_held_out_set_without_a_whole_batch_is_refused(run):
    base, yaml = run
    proc = jaxsd_command("train", yaml, "validation.batch_size=8", f"train.run_dir={base / 'refused'}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "validation.batch_size" in proc.stderr + proc.stdout
