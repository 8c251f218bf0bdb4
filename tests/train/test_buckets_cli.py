"""Aspect-ratio buckets through the commands a user types, on a tiny pipeline saved in the real format.

Images of three aspect ratios → `jaxsd cache` (buckets on: 8×32, 16×16 and 32×8 px) →
`jaxsd train` runs every step (one compiled step per bucket shape, logged) → `jaxsd export` works.
A second run is `kill -9`ed from outside while an asynchronous checkpoint save is in flight and
resumed: its per-step losses and exported UNet equal the straight run's bit for bit (the bucket
order is part of the data position). Two processes over loopback (gloo) agree on every step's bucket:
their losses equal the one-process, one-device run within 1e-5.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxsd.cli import main
from tests.helpers import REPO, jaxsd_command, local_processes
from tests.train.cli_runs import ENV, cached_dataset, records

# (height, width) of the images: four per aspect ratio, one ratio per bucket
SIZES = [(10, 40), (20, 20), (40, 10)] * 4
STEPS = 8
BUCKETS = "{resolution: 16, buckets: {enabled: true, min_side: 8, max_side: 32, step: 8}}"


def _losses(run_dir: Path) -> list[float]:
    logged = records(run_dir)
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    return [r["loss"] for r in logged]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("buckets")
    yaml = cached_dataset(base, SIZES, steps=STEPS, batch_size=2, image=BUCKETS)
    jaxsd_command("train", yaml, env=ENV)
    return base, yaml


def test_bucketed_run_trains_every_step_then_exports(straight):
    base, _ = straight
    run_dir = base / "straight"
    assert len(_losses(run_dir)) == STEPS
    log = (run_dir / "train.log").read_text()
    compiled = [line for line in log.splitlines() if "train step compiled for batch shapes" in line]
    latents = {re.search(r"latent_mean (\S+),", line).group(1) for line in compiled}
    assert latents == {"2x4x16x4", "2x8x8x4", "2x16x4x4"}, compiled  # one executable per bucket
    # no more: the first bucket's step, compiled from the planned state before the weights were loaded
    # (so the peak RSS is not compile + weights), is the executable the loaded state runs
    assert len(compiled) == 3, compiled
    assert log.index("train step compiled for batch shapes") < log.index("init: "), log
    assert main(["export", str(run_dir), "--out", str(base / "export")]) == 0  # in-process (test_export.py runs the command)
    assert (base / "export").is_dir()


def _orbax_save_in_flight(checkpoints: Path) -> bool:
    return checkpoints.is_dir() and any("tmp" in p.name for p in checkpoints.iterdir())


def test_kill_9_during_an_async_save_then_resume_is_bitwise_identical(straight):
    base, yaml = straight
    run_dir = base / "killed"
    args = ["train", yaml, f"train.run_dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=3"]
    exe = Path(sys.executable).parent / "jaxsd"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **ENV}
    proc = subprocess.Popen([str(exe), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=REPO)
    checkpoints, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    during_save = False
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if logged >= 3 and _orbax_save_in_flight(checkpoints):  # a save every step: this catches one in flight
            during_save = True
            break
        if logged >= STEPS - 2:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < STEPS
    jaxsd_command(*args, env=ENV)  # resumes
    assert _losses(run_dir) == _losses(base / "straight"), f"killed after {killed_at} steps, during a save: {during_save}"
    # the resumed position's bucket compiled from the planned state before the checkpoint was read
    lines = (run_dir / "train.log").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "init: resumed from checkpoint" in line)
    assert "train step compiled for batch shapes" in lines[at - 1], lines[:at + 1]
    jaxsd_command("export", run_dir, "--out", base / "export_killed")
    for f in sorted((base / "export").rglob("*.safetensors")):
        assert f.read_bytes() == (base / "export_killed" / f.relative_to(base / "export")).read_bytes(), f
    assert during_save, "the kill did not land during an asynchronous save (the run saves every step)"


@pytest.mark.slow  # 2 processes compiling 3 bucket shapes; the default run proves buckets through the CLI above
def test_two_processes_agree_on_every_steps_bucket(straight):
    # 2 processes x 1 device each read their own rows of each global batch; had they disagreed on a
    # step's bucket, the global batch could not be assembled. Their losses equal the straight run's
    # (1 process, 1 device, the same batches) within 1e-5: the same math on another mesh.
    base, yaml = straight
    run = local_processes(2, yaml, "train.steps=4", "checkpoint.every=100",
                          "checkpoint.async_save=false", f"train.run_dir={base / 'two'}", devices=1,
                          log_dir=base / "two_logs", env=ENV)
    assert run.returncode == 0, run.stderr + "".join(f.read_text()[-3000:] for f in (base / "two_logs").iterdir())
    shapes = (base / "two" / "train.log").read_text().count("train step compiled for batch shapes")
    assert shapes >= 2, "the 4 steps saw one bucket only: nothing to agree on"
    two, one = records(base / "two"), records(base / "straight")[:4]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
