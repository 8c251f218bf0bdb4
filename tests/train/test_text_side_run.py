"""A DreamBooth-style run through the commands a user types: a tiny SD1 pipeline (saved in the real format)
whose 4 images `jaxsd cache` stores as token ids, plus a held-out folder cached the same way (copies of the
training images: the run is meant to learn them, so the fixed-noise loss on them must drop). `jaxsd train`
fine-tunes the UNet and the CLIP text encoder together (`train.text_encoder: full`, the encoder at its own
`train.text_encoder_lr`) with a validation loss every 4 steps; `jaxsd export` writes both models.

Text side:
* the encoder changed, and the exported text_encoder/ loads in transformers' CLIPTextModel with the outputs
  of jaxsd's encoder with the checkpoint's params (≤1e-4); the exported UNet is the checkpoint's;
* `slow`: a resume from the middle checkpoint ends bit for bit where the straight run ends; the single-file
  export holds the trained encoder;
* config errors: full with lora.text_encoder, full without a token cache.

Validation loss:
* metrics.jsonl and TensorBoard have val/loss and val/loss_t{T} at step 0 (before any update) and every
  `validation.every` steps, val/loss is their mean, and it drops as the run learns;
* evaluating the same params twice gives the same numbers, and the step-0 record is what jaxsd's evaluator
  gives for the run's initial params;
* a held-out set too small for one batch is refused by name.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.cli import main
from jaxsd.config import load_config
from jaxsd.errors import ConfigError
from tests.data.fakes import make_images
from tests.helpers import jaxsd_command, rel_err
from tests.train.cli_runs import records
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEPS, EVERY, TIMESTEPS = 8, 4, (100, 500, 900)
PROMPTS = ["caption 1", "a photo of a cat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The straight run (checkpoints at 4 and 8) and its export."""
    base = tmp_path_factory.mktemp("text_side_run")
    pipe = tiny_pipeline(base / "pipe", text_sensitive=True)
    images = make_images(base / "images", 4)
    held_out = base / "held_out"
    shutil.copytree(images, held_out)
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {base / 'run'}, steps: {STEPS}, batch_size: 4, data_source: cache, text_encoder: full,
         text_encoder_lr: 0.02}}
optimizer: {{learning_rate: 0.01}}
checkpoint: {{every: {EVERY}, async_save: false}}
logging: {{every: 1, progress_bar: false, tensorboard: true}}
validation: {{roots: [{held_out}], every: {EVERY}, timesteps: {list(TIMESTEPS)}, seed: 3, batch_size: 2}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: tokens, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
""")
    assert main(["cache", str(yaml), f"data.roots=[{images},{held_out}]", "--no-progress"]) == 0  # each root its own
    # cache; in-process: tests/train/tiny_run.py runs the command
    jaxsd_command("train", yaml)
    assert main(["export", str(base / "run"), "--out", str(base / "export")]) == 0  # in-process (test_export.py runs the command)
    return base, pipe, yaml


def _encode(params, config, ids) -> np.ndarray:
    from jaxsd.models.clip import CLIPTextModel

    return np.asarray(CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids)).last_hidden_state)


@pytest.mark.torch
def test_the_trained_text_encoder_is_exported_and_loads_in_transformers(run):
    import torch
    import transformers

    from jaxsd.convert.text_encoders import load_clip
    from jaxsd.convert.unet import load_unet
    from jaxsd.text.tokenizers import load_tokenizer
    from jaxsd.train.export import load_trained_unet

    base, pipe, _ = run
    trained = load_trained_unet(base / "run")
    config, base_params = load_clip(pipe / "text_encoder")
    ids = np.asarray(load_tokenizer(pipe / "tokenizer")(PROMPTS).input_ids)
    ours = _encode(trained.text.params["text_encoder"], config, ids)
    assert rel_err(ours, _encode(base_params, config, ids)) > 1e-3  # the encoder trained
    ref = transformers.CLIPTextModel.from_pretrained(base / "export" / "text_encoder")
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_err(ours, theirs) <= 1e-4
    _, unet = load_unet(base / "export" / "unet")  # and the UNet beside it is the checkpoint's
    np.testing.assert_array_equal(unet["conv_out"]["kernel"], trained.params["conv_out"]["kernel"])


@pytest.mark.slow  # another `jaxsd train`
def test_a_resume_ends_where_the_straight_run_ends(run):
    from jaxsd.train.export import load_trained_unet

    base, _, yaml = run
    resumed = base / "resumed"
    shutil.copytree(base / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    jaxsd_command("train", yaml, f"train.run_dir={resumed}")
    a, b = (load_trained_unet(d, step=STEPS) for d in (base / "run", resumed))
    assert set(a.text.params) == {"text_encoder"}
    for x, y in zip(jax.tree.leaves((a.params, a.text.params)), jax.tree.leaves((b.params, b.text.params)),
                    strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # another command on the run
def test_the_single_file_export_holds_the_trained_text_encoder(run):
    from jaxsd.convert.single_file.to_folder import model_folder
    from jaxsd.convert.text_encoders import load_clip
    from jaxsd.train.export import load_trained_unet

    base, _, _ = run
    out = base / "model.safetensors"
    jaxsd_command("export", base / "run", "--single-file", "--out", out)
    _, written = load_clip(model_folder(out) / "text_encoder")
    trained = load_trained_unet(base / "run").text.params["text_encoder"]
    for x, y in zip(jax.tree.leaves(written), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(x, y)


def test_full_and_lora_text_encoder_contradict(run):
    _, _, yaml = run
    with pytest.raises(ConfigError, match="contradicts train.text_encoder=full"):
        load_config(yaml, ["lora.text_encoder=true"])
    with pytest.raises(ConfigError, match="data.cache.text: tokens"):
        load_config(yaml, ["data.cache.text=clip", "validation.every=0"])
    legacy = load_config(yaml, ["train.text_encoder=null", "train.text_encoder_lr=null", "lora.text_encoder=true",
                                "lora.rank=2"])
    assert legacy.train.text_encoder == "lora"  # lora.text_encoder: true is train.text_encoder: lora


def _val_records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "val/loss" in r}


def test_validation_loss_is_logged_and_drops_as_the_run_learns(run):
    from jaxsd.train.logging import read_scalars

    base, _, _ = run
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


@pytest.fixture(scope="module")
def validator(run):
    """jaxsd's evaluator over the run's held-out set, and the run's initial train state (in this process)."""
    from jaxsd.train.model import initial_params
    from jaxsd.train.plan import fresh_state, plan_state
    from jaxsd.train.sharding import make_mesh
    from jaxsd.train.validation import Validator

    _, _, yaml = run
    cfg = load_config(yaml)
    mesh = make_mesh(cfg.sharding)
    plan = plan_state(cfg, mesh)
    params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings)
    return Validator.from_config(cfg, plan, mesh), fresh_state(cfg, plan, params), cfg, mesh


def test_the_same_params_give_the_same_validation_loss(run, validator):
    base, _, _ = run
    evaluator, state, _, _ = validator
    first = evaluator.losses(state.params, state.frozen)
    second = evaluator.losses(state.params, state.frozen)
    assert first == second  # bit for bit: fixed noise, fixed timesteps, the same batches
    logged = _val_records(base / "run")[0]
    for k, v in first.items():  # what the run logged before its first update
        assert v == pytest.approx(logged[k], rel=1e-5), k
    moved = {**state.params, "text_encoder": jax.tree.map(lambda p: p * 1.01, state.params["text_encoder"])}
    assert evaluator.losses(moved, state.frozen)["val/loss"] != first["val/loss"]  # it sees the text encoder


def test_a_held_out_set_without_a_whole_batch_is_refused(validator):
    from jaxsd.train.validation import held_out_batches

    _, _, cfg, mesh = validator
    too_big = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, batch_size=8))
    with pytest.raises(ConfigError, match="validation.batch_size=8: no bucket holds a full global batch"):
        held_out_batches(too_big, mesh)
