"""The training loop end to end on the tiny UNet (configs/tiny.yaml), each run in a fresh process:

* 20 steps straight vs. `kill -9` sent from outside once step 12 is logged + resume to 20: bitwise
  identical per-step losses and final params, one metrics record per step; a corrupt latest checkpoint
  falls back to the previous one, named, and reaching its step again writes a fresh one;
* a resume with a changed config: a learning-rate change resumes with a warning naming it; an
  optimizer change stops with one message naming it, and `train.resume=params_only` then continues;
* the from-scratch run reduces the loss; TensorBoard events read back;
* NaN batches: updates skipped, then a clean stop with the last good checkpoint intact; trigger-file save.

All runs share one persistent XLA compilation cache (`train.compilation_cache`), so the step is
compiled once for the module.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsd.train.logging import read_scalars
from tests.helpers import REPO, kill_9_once_logged

RUNNER = r"""
import hashlib, json, logging, sys
import jax, numpy as np
from jaxsd.config import load_config
from jaxsd.train.loop import train, make_source

cfg = load_config("tiny", sys.argv[2:])
source = None
if sys.argv[1] == "nan":  # batches 5, 6, 7, ... carry NaN latents
    class NaNSource:
        def __init__(self, inner): self.inner = inner
        def __getattr__(self, name): return getattr(self.inner, name)
        def __iter__(self): return self
        def __next__(self):
            i = self.inner.index
            b = next(self.inner)
            if i >= 5:
                b["latents"] = b["latents"] * np.nan
            return b
    source = NaNSource(make_source(cfg))
if sys.argv[1] == "sigterm":  # a real SIGTERM arrives while step 7 runs (when batch 7 is prefetched)
    import os, signal
    class SignalSource:
        def __init__(self, inner): self.inner = inner
        def __getattr__(self, name): return getattr(self.inner, name)
        def __iter__(self): return self
        def __next__(self):
            if self.inner.index == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self.inner)
    source = SignalSource(make_source(cfg))
EVENTS = []
if sys.argv[1] == "order":  # record when steps are dispatched and when their metrics are read
    from jaxsd.train import loop
    from jaxsd.train.compile import CompiledSteps
    call, read, dispatched = CompiledSteps.__call__, loop._Monitor.read, iter(range(1, 1000))
    def dispatch(self, state, batch):
        EVENTS.append(f"dispatch {next(dispatched)}")
        return call(self, state, batch)
    CompiledSteps.__call__ = dispatch
    loop._Monitor.read = lambda self, f: (EVENTS.append(f"read {f.step}"), read(self, f))[1]
logging.basicConfig(level=logging.WARNING)
result = train(cfg, source)
h = hashlib.sha256()
for leaf in jax.tree.leaves(result.state.params):
    h.update(np.asarray(leaf).tobytes())
print("RESULT" + json.dumps({"stopped": result.stopped, "step": result.step, "init_from": result.init_from,
                             "params_sha256": h.hexdigest(), "events": EVENTS, "torch": "torch" in sys.modules}))
"""

# a one-level UNet (down: resnet+attention, mid, up) — half the ops of tiny.yaml's, so half the compile
COMMON = ["model.unet.block_out_channels=[32]", "model.unet.down_block_types=[CrossAttnDownBlock2D]",
          "model.unet.up_block_types=[CrossAttnUpBlock2D]", "train.steps=20", "checkpoint.every=5", "checkpoint.keep=5", "logging.every=1",
          "logging.progress_bar=false", "logging.peak_flops=1e9", "checkpoint.poll_every=1"]


def _command(tmp: Path, mode: str, run_dir: Path, extra=()) -> tuple[list[str], dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the runs use train.compilation_cache
    cache = f"train.compilation_cache={tmp / 'xla_cache'}"
    return [sys.executable, "-c", RUNNER, mode, f"train.run_dir={run_dir}", cache, *COMMON, *extra], env


def _run(tmp: Path, mode: str, run_dir: Path, extra=(), expect_error=False):
    argv, env = _command(tmp, mode, run_dir, extra)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False)
    if expect_error:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return None, proc.stderr
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1]), proc.stderr


def _kill_once_logged(tmp: Path, run_dir: Path, step: int) -> None:
    """Start a run and `kill -9` it from outside as soon as metrics.jsonl records `step`."""
    argv, env = _command(tmp, "plain", run_dir)
    kill_9_once_logged(argv, run_dir / "metrics.jsonl", step, env)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl records steps twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    straight, _ = _run(tmp, "order", tmp / "straight")  # "order": also records when steps are dispatched and read
    assert any((tmp / "xla_cache").iterdir()), "train.compilation_cache stored nothing"
    return tmp, straight


def test_straight_run_learns_and_writes_tensorboard(runs):
    tmp, straight = runs
    run_dir = tmp / "straight"
    assert straight["stopped"] == "done" and straight["step"] == 20
    assert straight["init_from"].startswith("from scratch")
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(16, 21)) / 5
    assert last < 0.75 * first, (first, last)
    scalars = read_scalars(run_dir / "tensorboard")
    for tag in ("loss", "loss_raw", "lr", "grad_norm", "qk_grads_av", "step_time_s", "images_per_s", "mfu"):
        assert [s for s, _ in scalars[f"train/{tag}"]] == list(range(1, 21)), tag
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([losses[s] for s in range(1, 21)], rel=1e-6)
    assert scalars["train/qk_grads_av"][0][1] > 0 and 0 < scalars["train/mfu"][-1][1]
    assert (run_dir / "config.yaml").read_text().count("steps: 20") == 1
    assert not straight["torch"], "the TensorBoard writer imported PyTorch (2 s of start-up)"


@pytest.mark.slow
def test_kill_9_and_resume_is_bitwise_identical(runs):
    tmp, straight = runs
    run_dir = tmp / "killed"
    _kill_once_logged(tmp, run_dir, 12)
    resumed, _ = _run(tmp, "plain", run_dir)
    # step 10's async save may or may not have committed when the kill came: either is a valid resume point
    assert re.match(r"resumed from checkpoint step (5|10) ", resumed["init_from"]), resumed["init_from"]
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert _losses(run_dir) == _losses(tmp / "straight")  # every step's loss, bit for bit, once each
    scalars = read_scalars(run_dir / "tensorboard")  # one curve: the replayed steps' old points are purged
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 21))


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(runs):
    tmp, straight = runs
    run_dir = tmp / "corrupt"
    shutil.copytree(tmp / "straight", run_dir)
    for f in (run_dir / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
            f.write_bytes(b"garbage")
    resumed, stderr = _run(tmp, "plain", run_dir)
    assert f"checkpoint {run_dir / 'checkpoints' / '20'} is incomplete or corrupt" in stderr
    assert resumed["init_from"].startswith("resumed from checkpoint step 15")
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert (run_dir / "checkpoints.damaged" / "20").is_dir()  # set aside, not deleted
    # reaching step 20 again wrote a fresh checkpoint 20, and it restores to the straight run's params
    again, stderr = _run(tmp, "plain", run_dir)
    assert again["init_from"].startswith("resumed from checkpoint step 20"), stderr[-2000:]
    assert again["params_sha256"] == straight["params_sha256"]
    assert _losses(run_dir) == _losses(tmp / "straight")


def test_changed_config_resumes_with_a_warning_or_stops_naming_the_keys(runs):
    tmp, _ = runs
    # structure kept (learning rate, steps): resumes from 20 and warns with old -> new
    lr_dir = tmp / "lr_change"
    shutil.copytree(tmp / "straight", lr_dir)
    result, stderr = _run(tmp, "plain", lr_dir, extra=["optimizer.learning_rate=5e-4", "train.steps=22"])
    assert result["init_from"].startswith("resumed from checkpoint step 20") and result["step"] == 22
    assert "optimizer.learning_rate: 0.001 → 0.0005" in stderr and "train.steps: 20 → 22" in stderr
    # structure changed (optimizer): one message naming the key, nothing touched
    opt_dir = tmp / "opt_change"
    shutil.copytree(tmp / "straight", opt_dir)
    _, stderr = _run(tmp, "plain", opt_dir, extra=["optimizer.name=lion"], expect_error=True)
    assert "ResumeMismatch" in stderr and "optimizer.name: 'adamw' → 'lion'" in stderr
    assert "train.resume=params_only" in stderr and "corrupt" not in stderr
    assert not (opt_dir / "checkpoints.damaged").exists()  # a changed config is not a damaged checkpoint
    assert sorted(int(p.name) for p in (opt_dir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10, 15, 20]


@pytest.mark.slow  # one more run that compiles a Lion step (~15 s)
def test_params_only_continues_with_a_fresh_optimizer(runs):
    # params_only: the checkpoint's params, a fresh optimizer, the step count continues
    tmp, _ = runs
    opt_dir = tmp / "params_only"
    shutil.copytree(tmp / "straight", opt_dir)
    result, stderr = _run(tmp, "plain", opt_dir, extra=["optimizer.name=lion", "train.resume=params_only",
                                                        "optimizer.learning_rate=1e-4", "train.steps=22"])
    assert result["init_from"].startswith("params only from checkpoint step 20"), result["init_from"]
    assert result["step"] == 22
    losses = _losses(opt_dir)
    assert sorted(losses)[-2:] == [21, 22] and all(math.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_an_8bit_checkpoint_of_the_old_layout_asks_for_params_only(runs):
    """8-bit AdamW's state changed layout (per-param moments -> packed block buffers) with the same
    config: a checkpoint written before (no meta["state_format"]) is refused with the way out, not set
    aside as damaged; train.resume=params_only continues from its params."""
    tmp, _ = runs
    run_dir = tmp / "old_8bit"
    shutil.copytree(tmp / "straight", run_dir)
    meta_file = run_dir / "checkpoints" / "20" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("state_format") == 2
    # as an 8-bit run of the old layout would have recorded it
    meta["config"] = meta["config"].replace("name: adamw\n", "name: adamw8bit\n", 1)
    meta_file.write_text(json.dumps(meta))
    for step in (5, 10, 15):
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    _, stderr = _run(tmp, "plain", run_dir, extra=["optimizer.name=adamw8bit"], expect_error=True)
    assert "ResumeMismatch" in stderr and "older jaxsd whose 8-bit AdamW state" in stderr
    assert "train.resume=params_only" in stderr and not (run_dir / "checkpoints.damaged").exists()
    result, _ = _run(tmp, "plain", run_dir, extra=["optimizer.name=adamw8bit", "train.resume=params_only",
                                                   "train.steps=21"])
    assert result["init_from"].startswith("params only from checkpoint step 20") and result["step"] == 21


def test_nan_batches_are_skipped_then_the_run_stops_with_the_good_checkpoint(runs):
    tmp, _ = runs
    run_dir = tmp / "nan"
    run_dir.mkdir()
    (run_dir / "SAVE_NOW").touch()  # trigger file: saves after step 1, then disappears
    result, _ = _run(tmp, "nan", run_dir, extra=["train.max_nonfinite_skips=2"])
    assert result["stopped"] == "nonfinite" and result["step"] == 8  # steps 6, 7, 8 skipped
    assert not (run_dir / "SAVE_NOW").exists()
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 5]
    skipped = [json.loads(line)["skipped"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert skipped == [0] * 5 + [1] * 3


def test_the_host_reads_a_step_only_after_dispatching_the_next(runs):
    # one step stays in flight: step n's metrics are read after step n+1 is dispatched, except where a
    # decision needs step n itself (checkpoint steps 5, 10, ...: never checkpoint a skipped step).
    # Recorded by the straight run ("order" mode wraps the step call and the metrics read to log them).
    _, straight = runs
    assert straight["events"] == [
        "dispatch 1", "dispatch 2", "read 1", "dispatch 3", "read 2", "dispatch 4", "read 3", "dispatch 5", "read 4",
        "read 5", "dispatch 6", "dispatch 7", "read 6", "dispatch 8", "read 7", "dispatch 9", "read 8", "dispatch 10",
        "read 9", "read 10", "dispatch 11", "dispatch 12", "read 11", "dispatch 13", "read 12", "dispatch 14",
        "read 13", "dispatch 15", "read 14", "read 15", "dispatch 16", "dispatch 17", "read 16", "dispatch 18",
        "read 17", "dispatch 19", "read 18", "dispatch 20", "read 19", "read 20"]


# train.steps_in_flight: how many steps are dispatched ahead of the host's reads (the straight run: 1).
# Checkpoint steps (5, 10, 15, 20) read every step first, whatever the setting.
IN_FLIGHT_ORDERS = {
    0: [e for s in range(1, 21) for e in (f"dispatch {s}", f"read {s}")],  # each step read before the next
    2: [e for b in range(0, 20, 5) for e in (  # in each 5-step block (b+1 .. b+5):
        f"dispatch {b + 1}", f"dispatch {b + 2}", f"dispatch {b + 3}", f"read {b + 1}", f"dispatch {b + 4}",
        f"read {b + 2}", f"dispatch {b + 5}", f"read {b + 3}", f"read {b + 4}", f"read {b + 5}")],
}


# ~15 s a run: the default run's own order (1 in flight) is checked by test_the_host_reads_a_step_only_after_...
@pytest.mark.parametrize("in_flight", [pytest.param(0, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_steps_in_flight_sets_how_far_dispatch_runs_ahead_of_the_reads(runs, in_flight):
    tmp, straight = runs
    run_dir = tmp / f"in_flight_{in_flight}"
    result, _ = _run(tmp, "order", run_dir, extra=[f"train.steps_in_flight={in_flight}"])
    assert result["events"] == IN_FLIGHT_ORDERS[in_flight]
    # when the host reads changes nothing that is computed or logged
    assert result["params_sha256"] == straight["params_sha256"]
    assert _losses(run_dir) == _losses(tmp / "straight")


@pytest.mark.slow
def test_streamed_updates_log_gradient_statistics_and_skip_nan_losses(runs):
    # optimizer.clip_grad_norm=null: the step streams its updates, the loop finishes the gradient
    # statistics from per-param partial sums and skips on the loss alone
    tmp, _ = runs
    run_dir = tmp / "streamed"
    result, _ = _run(tmp, "nan", run_dir, extra=["train.max_nonfinite_skips=2", "optimizer.clip_grad_norm=null"])
    assert result["stopped"] == "nonfinite" and result["step"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0] * 5 + [1] * 3
    assert all(r["grad_norm"] > 0 and r["qk_grads_av"] > 0 for r in records[:5])
    assert not any(k.endswith(("_parts", "_count")) for r in records for k in r)


@pytest.mark.slow
@pytest.mark.torch
def test_export_loads_in_diffusers_and_matches_our_unet(runs, tmp_path):
    import jax
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from jaxsd.train.export import export_unet
    tmp, _ = runs
    out, step = export_unet(tmp / "straight", tmp_path / "unet")
    assert step == 20
    unet = UNet2DConditionModel.from_pretrained(out).eval()
    sample = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(sample), 500, torch.from_numpy(ctx)).sample.numpy()
    from jaxsd.convert.unet import load_unet
    from jaxsd.models.unet import UNet2DConditionModel as FlaxUNet
    config, params = load_unet(out)
    ours = jax.jit(FlaxUNet(config).apply)({"params": params}, sample.transpose(0, 2, 3, 1), np.array([500]), ctx)
    from tests.helpers import rel_err
    assert rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref) < 1e-4
    with pytest.raises(ValueError, match="without EMA"):
        export_unet(tmp / "straight", tmp_path / "ema", ema=True)


@pytest.mark.slow
def test_sigterm_saves_and_stops(runs):
    tmp, _ = runs
    run_dir = tmp / "sigterm"
    result, _ = _run(tmp, "sigterm", run_dir)
    assert result["stopped"] == "signal" and result["step"] == 7
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 7]
