"""`jaxsd train` as 2 processes × 2 fake CPU devices (`launch/local_processes.sh 2 --devices 2`, mesh
data=2 × fsdp=2, gloo collectives over loopback) on data made by `jaxsd cache`, against the same run as
1 process with 4 devices:

* per-step losses and final params are equal within 1e-5: the same math on the same mesh shape (only
  the order in which the cross-process and in-process collectives add up the gradients may differ);
* each process reads only its own rows of every global batch: with `logging.debug=[jaxsd.data.loader]`
  each process logs the sample ids it reads; process 0 reads the first half and process 1 the second
  half of the batch the single process reads whole;
* a checkpoint is written once, by both processes together: one step directory holding each process's
  own shards, one "saving" line per process, and one metrics record per step (process 0 writes them).

`slow`: the checkpoint restores on the same 2-process layout and on 1 process with another mesh
(data=1 × fsdp=4: params resharded on restore), continuing with the same losses and params; SIGTERM sent
to one process, and the trigger file, make every process save the same step (after the signal, all
stop there); a NaN latent in the cache stops every process at the same step, without saving it.
"""

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.train.partial_restore import CheckpointReader
from tests.helpers import jaxsd_command, local_processes, rel_err
from tests.train.cli_runs import ENV, cached_dataset, records

STEPS = 4
MESH = ("sharding.data=2", "sharding.fsdp=2")
SAMPLE_IDS = "logging.debug=[jaxsd.data.loader]"
QUIET = "logging.tensorboard=false"
SAMPLES = re.compile(r"global batch (\d+): process (\d+) of (\d+) reads samples \[([\d, ]*)\]")


def _sample_ids(log: str) -> dict[tuple[int, int], list[int]]:
    """{(global batch, process): sample ids it read} from a debug log (batches prefetched past the run included)."""
    ids = {}
    for batch, process, _, samples in SAMPLES.findall(log):
        ids[int(batch), int(process)] = [int(s) for s in samples.split(",")]
    return ids


def _process_logs(log_dir: Path) -> list[str]:
    return [(log_dir / f"process_{i}.log").read_text() for i in range(2)]


def _finished(run, log_dir: Path) -> str:
    """What to show when a 2-process run failed: the launcher's report and each process's output."""
    tails = [f"--- process {i}:\n{log[-4000:]}" for i, log in enumerate(_process_logs(log_dir))]
    return f"exit {run.returncode}\n{run.stderr}\n" + "\n".join(tails)


def _params(run_dir: Path, step: int) -> list[np.ndarray]:
    """The trained params of a checkpoint as host arrays, in tree order (whatever mesh saved them)."""
    saved = ocp.PyTreeCheckpointer().metadata(run_dir / "checkpoints" / str(step) / "state").item_metadata.tree
    shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved["params"])
    reader = CheckpointReader(run_dir / "checkpoints")
    try:
        return jax.tree.leaves(reader.restore_fields(step, {"params": shapes})["params"])
    finally:
        reader.close()


def _assert_same_run(run_dir: Path, reference: Path, steps: list[int]) -> None:
    """Losses of `steps` and the params after the last of them equal the reference run's within 1e-5."""
    ours = {r["step"]: r["loss"] for r in records(run_dir)}
    ref = {r["step"]: r["loss"] for r in records(reference)}
    for s in steps:
        assert abs(ours[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, ours[s], ref[s])
    for a, b in zip(_params(run_dir, steps[-1]), _params(reference, steps[-1]), strict=True):
        assert rel_err(a, b) <= 1e-5


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _shards(run_dir: Path, step: int) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints" / str(step) / "state").glob("ocdbt.process_*"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    return base, cached_dataset(base, [(16, 16)] * 12, steps=STEPS, batch_size=4, image="{resolution: 16}")


@pytest.fixture(scope="module")
def one_process(data):
    """The reference: 1 process with 4 devices on the same mesh; returns its run dir and sample-id log."""
    base, yaml = data
    run = jaxsd_command("train", yaml, f"train.run_dir={base / 'one'}", *MESH, SAMPLE_IDS, QUIET, devices=4, env=ENV)
    return base / "one", run.stderr


@pytest.fixture(scope="module")
def two_processes(data):
    base, yaml = data
    logs = base / "two_logs"
    run = local_processes(2, yaml, f"train.run_dir={base / 'two'}", *MESH, SAMPLE_IDS, QUIET, devices=2,
                          log_dir=logs, env=ENV)
    assert run.returncode == 0, _finished(run, logs)
    return base / "two", _process_logs(logs)


def test_two_processes_train_as_one_process_with_four_devices(one_process, two_processes):
    (one, one_log), (two, two_logs) = one_process, two_processes
    assert [r["step"] for r in records(two)] == list(range(1, STEPS + 1))  # process 0 alone writes them
    _assert_same_run(two, one, list(range(1, STEPS + 1)))

    # each process read only its half of every batch: rows 0-1 on process 0's devices, 2-3 on process 1's
    whole = _sample_ids(one_log)
    for p, log in enumerate(two_logs):
        mine = _sample_ids(log)
        assert {q for _, q in mine} == {p}, f"process {p} logged another process's reads"
        for batch in range(STEPS):
            assert mine[batch, p] == whole[batch, 0][2 * p:2 * p + 2], (batch, p, mine[batch, p], whole[batch, 0])

    # checkpoints every 2 steps: each written once, holding both processes' shards
    assert _checkpoints(two) == [2, 4]
    for step in (2, 4):
        assert _shards(two, step) == ["ocdbt.process_0", "ocdbt.process_1"]
        for log in two_logs:
            assert len(re.findall(rf"checkpoint: saving step {step} to ", log)) == 1
    assert _shards(one, 4) == ["ocdbt.process_0"]


@pytest.mark.slow  # two more runs, one of them compiling for a third mesh
def test_restores_on_the_same_layout_and_on_one_process_with_another_mesh(data, one_process, two_processes):
    base, yaml = data
    one, two = one_process[0], two_processes[0]
    same, other = base / "resume_same", base / "resume_other"
    for run_dir in (same, other):  # as if the 2-process run had stopped after its step-2 checkpoint
        shutil.copytree(two, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "4")
    run = local_processes(2, yaml, f"train.run_dir={same}", *MESH, QUIET, devices=2, log_dir=base / "same_logs",
                          env=ENV)
    assert run.returncode == 0, _finished(run, base / "same_logs")
    assert "resumed from checkpoint step 2" in (same / "train.log").read_text()
    _assert_same_run(same, two, [3, 4])

    # 1 process, 4 devices as data=1 x fsdp=4: the params saved sharded 2-ways are read back 4-ways
    jaxsd_command("train", yaml, f"train.run_dir={other}", "sharding.data=1", "sharding.fsdp=4", QUIET,
                  devices=4, env=ENV)
    assert "resumed from checkpoint step 2" in (other / "train.log").read_text()
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1} over 4 devices, 1 processes" in (other / "train.log").read_text()
    _assert_same_run(other, one, [3, 4])


def _wait_for(condition, what: str, script, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert script.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow  # a 2-process run stopped from outside
def test_the_trigger_file_and_sigterm_to_one_process_reach_every_process(data):
    base, yaml = data
    run_dir, logs = base / "stopped", base / "stopped_logs"
    script = local_processes(2, yaml, f"train.run_dir={run_dir}", *MESH, QUIET, "train.steps=300",
                             "checkpoint.every=1000", "checkpoint.poll_every=2", devices=2, log_dir=logs, env=ENV,
                             wait=False)
    try:
        pids = [int(re.fullmatch(r"process \d: pid (\d+)\n", script.stderr.readline()).group(1)) for _ in range(2)]
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, "step 2", script)
        trigger = run_dir / "SAVE_NOW"
        trigger.touch()
        _wait_for(lambda: not trigger.exists() and _checkpoints(run_dir), "the triggered checkpoint", script)
        [triggered] = _checkpoints(run_dir)
        os.kill(pids[1], signal.SIGTERM)  # process 1 only: process 0 learns of it in the next poll
        _, err = script.communicate(timeout=600)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 0, err
    stopped = [re.search(r"jaxsd train: signal at step (\d+)", log) for log in _process_logs(logs)]
    assert all(stopped), _process_logs(logs)
    at = {int(m.group(1)) for m in stopped}
    assert len(at) == 1, f"the processes stopped at different steps: {at}"
    [at] = at
    assert triggered % 2 == 0 and at % 2 == 0 and at > triggered  # both acted at a poll (every 2 steps)
    assert _checkpoints(run_dir) == [triggered, at]
    for step in (triggered, at):
        assert _shards(run_dir, step) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert records(run_dir)[-1]["step"] == at < 300


@pytest.mark.slow  # a 2-process run on a copy of the cache
def test_a_nan_latent_stops_every_process_at_the_same_step(data, one_process):
    base, yaml = data
    poisoned, run_dir, logs = base / "poisoned", base / "nan", base / "nan_logs"
    shutil.copytree(base / "images", poisoned)
    # a sample first read in step 3 (12 samples, 4 a batch: each sample once in batches 0-2) gets a NaN
    # latent, as an fp16 VAE that overflowed would have written it
    sample = _sample_ids(one_process[1])[2, 0][0]
    key = sorted(json.loads((poisoned / "jaxsd_cache.json").read_text())["entries"])[sample]  # the store's order
    sidecar = poisoned / f"{key}.sd_vae"
    f = SafetensorsFile(sidecar)
    arrays = {k: np.array(f[k]) for k in f}
    arrays["latent_mean"] = np.full_like(arrays["latent_mean"], np.nan)
    save_file(arrays, sidecar, dict(f.metadata))
    run = local_processes(2, yaml, f"data.roots=[{poisoned}]", f"train.run_dir={run_dir}", *MESH, QUIET,
                          "train.steps=6", "train.max_nonfinite_skips=0", devices=2, log_dir=logs, env=ENV)
    assert run.returncode == 1, _finished(run, logs)  # jaxsd train's status for a non-finite stop
    for log in _process_logs(logs):
        assert "jaxsd train: nonfinite at step 3" in log, log[-3000:]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3] and records(run_dir)[-1]["skipped"] == 1
    assert _checkpoints(run_dir) == [2]  # the last good one; step 3 was never saved
