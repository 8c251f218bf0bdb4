"""`jaxsd export`: a whole pipeline folder that jaxsd and diffusers load, read from params only.

On the shared tiny run of tests/train/tiny_run.py (made as a user makes it: `jaxsd cache`, then `jaxsd train`
4 steps from a tiny pipeline folder whose UNet visibly shapes the images, EMA on, conv_in frozen, a large
learning rate so the trained UNet draws visibly other images than the base one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxsd.cli import main
from jaxsd.convert.safetensors_io import SafetensorsFile
from tests.helpers import jaxsd_command
from tests.train.tiny_pipeline import IMAGE_SIZE
from tests.train.tiny_run import STEPS as STEP

UNET_FILE = "diffusion_pytorch_model.safetensors"
PROMPT = "a cat"


@pytest.fixture(scope="module")
def run(tiny_run):
    """(the shared folder, the base pipeline, the run dir): read only, a test copies what it changes."""
    return tiny_run.base, tiny_run.pipe, tiny_run.run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """`jaxsd export RUN --out DIR`: the base pipeline is the run's model.pretrained."""
    _, _, run_dir = run
    out = tmp_path_factory.mktemp("export") / "exported"
    proc = jaxsd_command("export", run_dir, "--out", out)
    return out, proc.stdout


def _tensors(path: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: np.asarray(f[k]) for k in f}


def _same_file(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["export", *map(str, args)])
    printed = capsys.readouterr()
    return rc, printed.out, printed.err


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_exported_pipeline_samples_the_same_in_jaxsd_and_diffusers(run, exported, tmp_path):
    import diffusers
    import torch

    from jaxsd.diffusion.samplers import DIFFUSERS_EQUIVALENT
    from tests.pipelines.conftest import assert_images_close, assert_images_differ, to_uint8

    _, pipe, _ = run
    out, stdout = exported
    assert f"step {STEP} → {out}: diffusers pipeline folder" in stdout and str(pipe) in stdout
    # the trained UNet, every other component of the base (hard links, not copies or symlinks), its model_index
    assert sorted(p.name for p in out.iterdir()) == ["jaxsd_export.json", "model_index.json", "scheduler",
                                                     "text_encoder", "tokenizer", "unet", "vae"]
    for f in [*pipe.glob("*/*"), pipe / "model_index.json"]:
        if f.parent.name != "unet":
            linked = out / f.relative_to(pipe)
            assert not linked.is_symlink() and _same_file(linked, f), linked
    assert not _same_file(out / "unet" / UNET_FILE, pipe / "unet" / UNET_FILE)
    record = json.loads((out / "jaxsd_export.json").read_text())
    assert record["step"] == STEP and record["pipeline"] == str(pipe) and record["ema"] is False
    trained, original = _tensors(out / "unet" / UNET_FILE), _tensors(pipe / "unet" / UNET_FILE)
    assert trained.keys() == original.keys()
    for k in trained:  # frozen conv_in restored as it was; everything else trained
        assert np.array_equal(trained[k], original[k]) == k.startswith("conv_in."), k

    torch.set_num_threads(1)
    latents = np.random.default_rng(0).standard_normal((2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    jaxsd_command("sample", "--model", out, "--prompt", PROMPT, "--steps", "4", "--guidance", "7.5", "--scheduler",
                  "ddim", "--num-images", "2", "--latents", tmp_path / "latents.npy", "--out", tmp_path / "cat.png")
    ours = np.stack([np.asarray(Image.open(tmp_path / f"cat-{i}.png")) for i in range(2)])

    def diffusers_images(folder):
        ref = diffusers.DiffusionPipeline.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        cls_name, overrides = DIFFUSERS_EQUIVALENT["ddim"]
        ref.scheduler = getattr(diffusers, cls_name).from_config(ref.scheduler.config, **overrides)
        return to_uint8(ref(PROMPT, num_inference_steps=4, guidance_scale=7.5, num_images_per_prompt=2,
                            latents=torch.from_numpy(latents), output_type="np").images)

    assert_images_close(ours, diffusers_images(out))
    assert_images_differ(ours, diffusers_images(pipe))  # the base's own UNet draws other images


def _drop_optimizer_state(run_dir: Path) -> None:
    """Delete every optimizer-state entry (array metadata and chunks) from the checkpoint's OCDBT database:
    orbax packs all arrays in a few data files, so the entries are removed from its key-value index."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{run_dir}/checkpoints/{STEP}/state/"}).result()
    before = [k.decode() for k in kv.list().result()]
    assert any(k.startswith("opt_state.") for k in before) and any(k.startswith("ema.") for k in before)
    kv.delete_range(ts.KvStore.KeyRange(b"opt_state.", b"opt_state/")).result()  # "/" sorts right after "."
    after = [k.decode() for k in kv.list().result()]
    assert not any(k.startswith("opt_state") for k in after)
    assert {k for k in before if not k.startswith("opt_state.")} == set(after)


def test_export_never_reads_the_optimizer_state(run, tmp_path, capsys):
    import jax

    from jaxsd.config import ShardingConfig, from_yaml_text
    from jaxsd.train.base import checkpointed
    from jaxsd.train.checkpoint import RESTORE_ERRORS, Checkpointer
    from jaxsd.train.loop import plan_state
    from jaxsd.train.sharding import make_mesh

    _, _, run_dir = run
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    _drop_optimizer_state(damaged)
    cfg = from_yaml_text((run_dir / "config.yaml").read_text())
    plan = plan_state(cfg, make_mesh(ShardingConfig(data=1), jax.devices()[:1]))
    saved = checkpointed(plan.abstract)  # everything a checkpoint holds
    Checkpointer(run_dir / "checkpoints", cfg.checkpoint).restore(STEP, saved, partial=True)  # intact: restores
    with pytest.raises(RESTORE_ERRORS, match="opt_state"):  # damaged: a full restore cannot
        Checkpointer(damaged / "checkpoints", cfg.checkpoint).restore(STEP, saved, partial=True)

    jaxsd_command("export", damaged, "--out", tmp_path / "from_damaged", "--ema", "--unet-only")
    assert _run(capsys, run_dir, "--out", tmp_path / "from_intact", "--ema", "--unet-only")[0] == 0
    a, b = ((tmp_path / d / UNET_FILE).read_bytes() for d in ("from_damaged", "from_intact"))
    assert a == b
    params = tmp_path / "params"
    assert _run(capsys, run_dir, "--out", params, "--unet-only")[0] == 0
    assert (params / UNET_FILE).read_bytes() != a  # --ema wrote the EMA, not the params


def _as_if_trained_from_the_unet_folder(run_dir: Path, pipe: Path, copy: Path) -> Path:
    """A copy of the run whose checkpoint says model.pretrained = the base's unet/ folder (same UNet,
    but no pipeline to take the other components from)."""
    shutil.copytree(run_dir, copy)
    meta = copy / "checkpoints" / str(STEP) / "meta" / "metadata"
    record = json.loads(meta.read_text())
    assert f"pretrained: {pipe}\n" in record["config"]
    record["config"] = record["config"].replace(f"pretrained: {pipe}\n", f"pretrained: {pipe / 'unet'}\n")
    meta.write_text(json.dumps(record))
    return copy


def test_without_a_pipeline_the_unet_folder_and_how_to_get_one(run, exported, tmp_path, capsys):
    _, pipe, run_dir = run
    copy = _as_if_trained_from_the_unet_folder(run_dir, pipe, tmp_path / "run")
    rc, out, _ = _run(capsys, copy, "--out", tmp_path / "unet")
    assert rc == 0 and "diffusers UNet folder only" in out and "--pipeline BASE" in out
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json", UNET_FILE, "jaxsd_export.json"]
    trained = (exported[0] / "unet" / UNET_FILE).read_bytes()
    assert (tmp_path / "unet" / UNET_FILE).read_bytes() == trained

    # --pipeline elsewhere: that folder's components (its own files), the same trained UNet. Its unet/ is
    # never read, so a pipeline minus its unet (the components of a from-scratch UNet) will do
    other = shutil.copytree(pipe, tmp_path / "other")
    shutil.rmtree(other / "unet")
    rc, out, _ = _run(capsys, copy, "--out", tmp_path / "full", "--pipeline", other)
    assert rc == 0 and f"other components from {other}" in out
    assert _same_file(tmp_path / "full" / "vae" / UNET_FILE, other / "vae" / UNET_FILE)
    assert _same_file(tmp_path / "full" / "model_index.json", other / "model_index.json")
    assert (tmp_path / "full" / "unet" / UNET_FILE).read_bytes() == trained
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == sorted(p.name for p in exported[0].iterdir())


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_components_that_do_not_fit_are_refused(run, tmp_path, capsys):
    _, pipe, run_dir = run
    wide = shutil.copytree(pipe, tmp_path / "wide", copy_function=shutil.copy)
    _edit_config(wide / "text_encoder", hidden_size=64)
    rc, _, err = _run(capsys, run_dir, "--out", tmp_path / "a", "--pipeline", wide)
    assert rc == 2 and f"--pipeline {wide}" in err
    assert "text embeddings are 64 wide (text_encoder 64) but the UNet has cross_attention_dim=32" in err
    _edit_config(wide / "vae", latent_channels=8)
    rc, _, err = _run(capsys, run_dir, "--out", tmp_path / "a", "--pipeline", wide)
    assert rc == 2 and "vae latent_channels=8 but the UNet has in_channels=4, out_channels=4" in err
    index = json.loads((wide / "model_index.json").read_text())
    (wide / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "unet"}))
    rc, _, err = _run(capsys, run_dir, "--out", tmp_path / "a", "--pipeline", wide)
    assert rc == 2 and "its model_index.json lists no unet" in err
    (wide / "model_index.json").unlink()
    rc, _, err = _run(capsys, run_dir, "--out", tmp_path / "a", "--pipeline", wide)
    assert rc == 2 and f"--pipeline {wide}: no model_index.json" in err
    assert not (tmp_path / "a").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["wide"]  # no leftovers


def test_out_is_new_empty_or_a_previous_export(run, exported, tmp_path, capsys):
    _, pipe, run_dir = run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, _, err = _run(capsys, run_dir, "--out", mine)
    assert rc == 2 and "is not a previous export (no jaxsd_export.json" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    rc, _, err = _run(capsys, run_dir, "--out", pipe.parent)
    assert rc == 2 and "which this command reads" in err

    previous = shutil.copytree(exported[0], tmp_path / "previous")  # a previous pipeline export is replaced whole
    assert _run(capsys, run_dir, "--out", previous, "--unet-only")[0] == 0
    assert sorted(p.name for p in previous.iterdir()) == ["config.json", UNET_FILE, "jaxsd_export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "previous"]  # no staging folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, run_dir, "--out", empty, "--unet-only")[0] == 0 and (empty / UNET_FILE).is_file()


def test_a_base_scheduler_with_another_noise_schedule_gets_the_runs(tmp_path):
    from jaxsd.config import DiffusionConfig
    from jaxsd.convert.pipeline_copy import link_components
    from jaxsd.train.export import use_run_schedule
    from tests.train.tiny_pipeline import MODEL_INDEX, SCHEDULER

    base = tmp_path / "base"
    (base / "scheduler").mkdir(parents=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (base / "model_index.json").write_text(json.dumps({"scheduler": MODEL_INDEX["scheduler"]}))
    link_components(base, tmp_path / "same")
    assert not use_run_schedule(tmp_path / "same", DiffusionConfig())  # the tiny scheduler is the default schedule
    assert _same_file(tmp_path / "same" / "scheduler" / "scheduler_config.json", base / "scheduler" / "scheduler_config.json")

    link_components(base, tmp_path / "v")
    assert use_run_schedule(tmp_path / "v", DiffusionConfig(prediction_type="v_prediction",
                                                            rescale_betas_zero_snr=True))
    written = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert written == {**SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    assert json.loads((base / "scheduler" / "scheduler_config.json").read_text()) == SCHEDULER  # base untouched


def test_sdxl_components_must_give_the_pooled_width_the_unet_expects(tmp_path):
    from jaxsd.convert.pipeline_copy import check_unet_fits
    from jaxsd.errors import InputError

    base = tmp_path / "xl"
    configs = {"vae": {"latent_channels": 4}, "text_encoder": {"hidden_size": 32},
               "text_encoder_2": {"hidden_size": 64, "projection_dim": 32}}
    for name, config in configs.items():
        (base / name).mkdir(parents=True)
        (base / name / "config.json").write_text(json.dumps(config))
    index = {name: ["x", "y"] for name in [*configs, "unet"]}
    (base / "model_index.json").write_text(json.dumps(index))
    unet = {"in_channels": 4, "out_channels": 4, "cross_attention_dim": [96, 96], "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8}
    check_unet_fits(base, unet)
    with pytest.raises(InputError, match=r"projection_dim=32 \+ 6 time ids × addition_time_embed_dim=8 ≠ the "
                                         r"UNet's projection_class_embeddings_input_dim=64"):
        check_unet_fits(base, {**unet, "projection_class_embeddings_input_dim": 64})
    with pytest.raises(InputError, match="SDXL pipeline .* no text_time"):
        check_unet_fits(base, {**unet, "addition_embed_type": None})


def test_checkpoints_hold_no_frozen_params_and_a_changed_base_is_refused(run, tmp_path, capsys):
    from jaxsd.config import CheckpointConfig
    from jaxsd.convert.unet import load_unet, save_unet
    from jaxsd.train.checkpoint import Checkpointer

    base, pipe, run_dir = run
    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig())
    stored = ckpt.manager.item_metadata(STEP)["state"]
    ckpt.close()
    assert "params" in stored and "opt_state" in stored and "frozen" not in stored  # conv_in is reloaded
    # the same architecture with other weights: resuming on it is refused before anything is read
    other = shutil.copytree(pipe, tmp_path / "other")
    config, params = load_unet(other / "unet")
    save_unet(other / "unet", config, {**params, "conv_in": {k: np.asarray(v) + 1 for k, v in params["conv_in"].items()}})
    copy = shutil.copytree(run_dir, tmp_path / "run")
    rc = main(["train", str(base / "run.yaml"), f"train.run_dir={copy}", f"model.pretrained={other}",
               f"data.cache.vae={pipe}", f"data.cache.text_encoder={pipe}"])
    err = capsys.readouterr().err
    assert rc == 2 and "ResumeMismatch" in err and "another base model" in err, err
    assert f"model.pretrained: '{pipe}' → '{other}'" in err
