"""Run directories on an object store: `train.run_dir: gs://...` and `jaxsd export gs://...`.

The bucket is the offline fake of tests/train/fake_gcs.py: epath reaches it through fsspec as it
would through gcsfs (objects only, no directories, no append), orbax's arrays through tensorstore's
real `gcs` driver over HTTP. The run is made in this process (`train` twice: 2 steps, then resumed to
4), with sample grids, TensorBoard and async checkpoints, and the working directory moved to an
empty folder: a run-dir path that went through `pathlib.Path` ("gs:/jaxsd-test/...") would land
there, on the local disk. `jaxsd export` then reads the run as the command a user types.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from jaxsd.config import load_config
from jaxsd.errors import ConfigError, InputError
from jaxsd.train.logging import read_images, read_scalars
from tests.helpers import jaxsd_command
from tests.train.fake_gcs import BUCKET, FakeGCS, FakeGCSServer, activate, command_env, deactivate
from tests.train.tiny_pipeline import tiny_pipeline

RUN = f"gs://{BUCKET}/runs/tiny"
NAME = "runs/tiny"  # its object-name prefix in the bucket
MANGLED = re.compile(r"gs:/(?!/)")  # what pathlib makes of gs://


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The fake bucket, active in this process (and, through `env`, in the commands it runs)."""
    store = FakeGCS(tmp_path_factory.mktemp("bucket"))
    server = FakeGCSServer(store)
    env = command_env(store, server)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
            mp.setenv(k, env[k])
        activate(store.root, mp.setattr)
        try:
            yield store, env
        finally:
            deactivate()
            server.close()


def _config(base, pipe, steps):
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {RUN}, steps: 2, batch_size: 2, data_source: synthetic, compilation_cache: {base / "xla"}}}
checkpoint: {{every: 2, keep: 1}}
logging: {{every: 1, progress_bar: false, sample_every: 2, sample_prompts: ["a cat"], sample_steps: 1}}
synthetic: {{num_examples: 8, latent_size: 8, latent_channels: 4, text_len: 8, text_dim: 32}}
""")
    return load_config(str(yaml), [f"train.steps={steps}"])


@pytest.fixture(scope="module")
def run(gcs, tmp_path_factory):
    """`train` to step 2, then resumed to step 4, in gs://; the working directory is an empty folder.

    The resumed run loads its step from the first one's compilation cache, which is turned off again
    afterwards (it is process-wide)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from jaxsd.train.loop import train

    base = tmp_path_factory.mktemp("run_dir")
    pipe = tiny_pipeline(base / "pipe")
    cwd = base / "cwd"
    cwd.mkdir()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("jaxsd").addHandler(handler)
    cache_dir = jax.config.jax_compilation_cache_dir
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            results = [train(_config(base, pipe, steps)) for steps in (2, 4)]
    finally:
        logging.getLogger("jaxsd").removeHandler(handler)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        compilation_cache.reset_cache()
    return base, pipe, cwd, results, [r.getMessage() for r in records]


def test_a_gs_run_dir_holds_the_whole_run_and_resumes_from_it(gcs, run, tmp_path):
    store, _ = gcs
    base, _, cwd, (first, second), messages = run
    assert list(cwd.iterdir()) == [], "something was written to the local disk instead of the bucket"
    assert not [m for m in messages if MANGLED.search(m)], "a gs:// path lost a slash on the way"

    assert (first.stopped, first.step, second.stopped, second.step) == ("done", 2, "done", 4)
    assert second.init_from == f"resumed from checkpoint step 2 in {RUN}/checkpoints"

    names = store.names(NAME + "/")
    # checkpoints: step 2 deleted by orbax once step 4 was committed (checkpoint.keep=1)
    assert sorted({n.split("/")[3] for n in names if n.startswith(f"{NAME}/checkpoints/")}) == ["4"]
    assert f"{NAME}/checkpoints/4/state/ocdbt.process_0/manifest.ocdbt" in names  # this process's shards
    assert f"{NAME}/checkpoints/4/commit_success.txt" in names  # orbax's commit marker on GCS
    config = store.get(f"{NAME}/config.yaml").decode()
    assert f"run_dir: {RUN}" in config and "steps: 4" in config

    # metrics.jsonl: uploaded whole (an object has no append), one record per step across the resume
    records = [json.loads(line) for line in store.get(f"{NAME}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == pytest.approx(first.losses + second.losses)

    # train.log: both sessions, the second one appended to the first's (downloaded at its start)
    log = store.get(f"{NAME}/train.log").decode()
    assert log.count("init: ") == 2 and f"init: resumed from checkpoint step 2 in {RUN}/checkpoints" in log
    staging = re.findall(r"are written in (\S+) and uploaded", log)
    assert len(staging) == 2 and not any((base / s).exists() for s in staging), "staging dirs left behind"

    # sample grids: PNGs in the bucket, the same pixels as the TensorBoard images
    events = [n for n in names if n.startswith(f"{NAME}/tensorboard/events.out.tfevents.")]
    assert len(events) == 2  # one event file per session
    local = tmp_path / "tensorboard"
    local.mkdir()
    for n in events:
        (local / n.rsplit("/", 1)[1]).write_bytes(store.get(n))
    assert [s for s, _ in read_scalars(local)["train/loss"]] == [1, 2, 3, 4]
    images = dict(read_images(local)["samples/params"])
    assert sorted(images) == [2, 4]
    for step in (2, 4):
        png = store.file(f"{NAME}/samples/step_{step:06d}.png")
        np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), images[step][..., :3])


def test_jaxsd_export_reads_a_gs_run_dir(gcs, run):
    _, env = gcs
    base, _, cwd, _, _ = run
    out = base / "exported"
    proc = jaxsd_command("export", RUN, "--out", out, env=env)
    assert f"step 4 → {out}: diffusers pipeline folder" in proc.stdout
    record = json.loads((out / "jaxsd_export.json").read_text())
    assert (record["run_dir"], record["step"]) == (RUN, 4)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_jaxsd_train_runs_and_resumes_in_a_bucket(gcs, run):
    """The same through the command (the default run makes its run in-process: the step compiles once)."""
    from tests.helpers import REPO

    store, env = gcs
    base, pipe, _, _, _ = run
    yaml = base / "cli.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: gs://{BUCKET}/runs/cli, batch_size: 2, data_source: synthetic, compilation_cache: {base / "xla"}}}
checkpoint: {{every: 2}}
logging: {{every: 1, progress_bar: false}}
synthetic: {{num_examples: 8, latent_size: 8, latent_channels: 4, text_len: 8, text_dim: 32}}
""")
    for steps in (2, 4):
        proc = jaxsd_command("train", yaml, f"train.steps={steps}", env=env)
        assert f"done at step {steps}" in proc.stdout
    assert "resumed from checkpoint step 2 in gs://jaxsd-test/runs/cli/checkpoints" in proc.stdout
    records = [json.loads(line) for line in store.get("runs/cli/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert store.get("runs/cli/train.log").decode().count("init: ") == 2
    assert not (REPO / "gs:").exists(), "a gs:// path became a local one (the commands run in the repo)"


def test_a_damaged_checkpoint_is_set_aside_in_the_bucket(gcs, run):
    """On an object store "moving" a checkpoint is copying its objects, then deleting them."""
    from jaxsd.train.checkpoint import Checkpointer

    store, _ = gcs
    base, pipe, _, _, _ = run
    cfg = _config(base, pipe, 4)
    copy = "runs/damaged"
    for n in store.names(f"{NAME}/checkpoints/"):
        store.put(copy + n[len(NAME):], store.get(n))
    store.delete(f"{copy}/checkpoints/4/meta/metadata")
    ckpt = Checkpointer(f"gs://{BUCKET}/{copy}/checkpoints", cfg.checkpoint)
    try:
        assert list(ckpt.metas()) == []
    finally:
        ckpt.close()
    assert ckpt.damaged == [f"gs://{BUCKET}/{copy}/checkpoints/4: FileNotFoundError"]
    assert store.names(f"{copy}/checkpoints/") == []
    moved = store.names(f"{copy}/checkpoints.damaged/4/")
    assert f"{copy}/checkpoints.damaged/4/state/manifest.ocdbt" in moved and len(moved) > 10


def test_staged_files_are_uploaded_whole_when_changed_and_when_the_run_fails(gcs):
    from jaxsd.train.run_dir import RunDir

    store, _ = gcs
    logger = logging.getLogger("jaxsd.test_run_dir")
    with pytest.raises(RuntimeError, match="the run failed"), RunDir(f"gs://{BUCKET}/runs/unit", logger=logger) as run:
        logger.info("hello")
        jsonl = run.local_file("metrics.jsonl")
        jsonl.write_text("1\n")
        run.sync()
        assert store.get("runs/unit/metrics.jsonl") == b"1\n"
        uploaded = store.file("runs/unit/metrics.jsonl").stat().st_mtime_ns
        run.sync()
        assert store.file("runs/unit/metrics.jsonl").stat().st_mtime_ns == uploaded  # unchanged: not sent again
        with jsonl.open("a") as f:
            f.write("2\n")
        raise RuntimeError("the run failed")
    assert store.get("runs/unit/metrics.jsonl") == b"1\n2\n"
    assert b"hello" in store.get("runs/unit/train.log")
    assert run.staging is None and not jsonl.exists() and logger.handlers == []


def test_a_trigger_file_in_a_bucket_is_looked_for_at_most_every_few_seconds(gcs):
    from jaxsd.train.run_dir import TRIGGER_SECONDS, TriggerFile, run_path

    store, _ = gcs
    trigger = TriggerFile(run_path(f"gs://{BUCKET}/runs/trigger") / "SAVE_NOW")
    assert not trigger.exists()
    store.put("runs/trigger/SAVE_NOW", b"")
    assert not trigger.exists()  # looked for a moment ago: no request now
    trigger._last -= TRIGGER_SECONDS
    assert trigger.exists()
    trigger.unlink()
    assert store.names("runs/trigger/") == []


def test_run_dir_paths_keep_their_scheme(gcs):
    from jaxsd.train.partial_restore import CheckpointReader
    from jaxsd.train.run_dir import RunDir, run_path

    assert str(run_path(RUN) / "checkpoints" / "4") == f"{RUN}/checkpoints/4"
    assert str(run_path(RUN + "/")) == RUN
    with RunDir(RUN, writer=False) as run:
        assert str(run / "samples") == f"{RUN}/samples" and run.staging is None
    assert str(CheckpointReader(f"{RUN}/checkpoints").directory) == f"{RUN}/checkpoints"
    for bad, why in [("s3://bucket/run", "s3:// is not supported"), ("memory://run", "memory:// is not supported"),
                     ("gs://", "names no bucket")]:
        with pytest.raises(ConfigError, match=why):
            run_path(bad)


def test_a_run_dir_orbax_cannot_write_to_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from jaxsd.cli import main
    from jaxsd.train.export import export

    monkeypatch.chdir(tmp_path)
    assert main(["train", "tiny", "train.run_dir=s3://bucket/run"]) == 2
    assert "train.run_dir='s3://bucket/run': s3:// is not supported" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="no checkpoints/ folder"):
        export(tmp_path / "nothing", tmp_path / "out")
