"""launch/tpu_pod.sh without a cloud: the gcloud commands its --dry-run prints, and the remote command
lines it would send to every worker, run here by bash in a stand-in home directory whose
~/jaxsd/.venv/bin/jaxsd records the arguments it gets and waits for a signal."""

import os
import subprocess
import tarfile
import time

import pytest

from tests.launch.dry_run import CONFIG, OVERRIDES, dry_run, script

POD = ["--name", "pod", "--zone", "us-east5-a", "--project", "proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-east5-a", "--project=proj"]

# stands in for the worker's jaxsd: records its argv (NUL-separated); `train` runs until a SIGTERM, noted
RECORDING_JAXSD = """#!/usr/bin/env bash
trap 'echo SIGTERM > "$HOME/signal"; exit 0' TERM
printf '%s\\0' "$@" > "$HOME/argv.tmp" && mv "$HOME/argv.tmp" "$HOME/argv"
[ "$1" = train ] || exit 0
for _ in $(seq 600); do sleep 0.1; done
"""


def _remote(argv: list[str]) -> tuple[str, str]:
    """(workers, command line) of a `gcloud compute tpus tpu-vm ssh` argv."""
    assert argv[:len(SSH)] == SSH, argv
    [workers] = [a.removeprefix("--worker=") for a in argv if a.startswith("--worker=")]
    [command] = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    assert len(argv) == len(SSH) + 2, argv
    return workers, command


def _on_worker(home, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, "HOME": str(home)}, cwd=home)


@pytest.fixture
def worker(tmp_path):
    """A stand-in worker home with ~/jaxsd/.venv/bin/jaxsd recording its arguments."""
    venv_bin = tmp_path / "jaxsd" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "jaxsd").write_text(RECORDING_JAXSD)
    (venv_bin / "jaxsd").chmod(0o755)
    yield tmp_path
    pid_file = tmp_path / "jaxsd_train.pid"
    if pid_file.exists():  # the recording jaxsd this test started, if it still runs
        subprocess.run(["kill", pid_file.read_text().strip()], capture_output=True, check=False)


def _wait_for(path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_start_runs_jaxsd_train_on_every_worker_with_the_config_unchanged_then_stop_signals_it(worker):
    [start] = dry_run("tpu_pod.sh", "start", *POD, "--bucket", "gs://my-bucket/", CONFIG, *OVERRIDES)
    workers, command = _remote(start)
    assert workers == "all"
    started = _on_worker(worker, command)
    assert started.returncode == 0 and "jaxsd train started" in started.stdout, started
    _wait_for(worker / "argv")
    argv = (worker / "argv").read_text().split("\0")[:-1]
    # the bucket's run dir and sharding.distributed=on come before the user's overrides, which win
    assert argv == ["train", CONFIG, "sharding.distributed=on", "train.run_dir=gs://my-bucket/runs/pod", *OVERRIDES]

    again = _on_worker(worker, command)
    assert again.returncode == 1 and "already running" in again.stderr, again

    [stop] = dry_run("tpu_pod.sh", "stop", *POD)
    workers, command = _remote(stop)
    assert workers == "all"
    stopped = _on_worker(worker, command)
    assert "SIGTERM sent to jaxsd train" in stopped.stdout, stopped
    _wait_for(worker / "signal")


def test_stop_without_a_run_says_so(worker):
    [stop] = dry_run("tpu_pod.sh", "stop", *POD)
    assert "no jaxsd train running" in _on_worker(worker, _remote(stop)[1]).stdout


def test_run_and_logs_reach_the_chosen_workers(worker):
    [run] = dry_run("tpu_pod.sh", *POD, "run", "--worker", "0", "--", "jaxsd", "export", "gs://b/run", "--out", "ft")
    workers, command = _remote(run)
    assert workers == "0"
    assert _on_worker(worker, command).returncode == 0  # the checkout's venv is on PATH
    assert (worker / "argv").read_text().split("\0")[:-1] == ["export", "gs://b/run", "--out", "ft"]

    [logs] = dry_run("tpu_pod.sh", "logs", *POD)
    assert _remote(logs) == ("0", "tail -n 100 -F ~/jaxsd_train.log")
    [logs] = dry_run("tpu_pod.sh", "logs", *POD, "--worker", "all")
    assert _remote(logs)[0] == "all"


def test_create_and_delete_a_pod_or_a_queued_resource():
    flags = [*POD, "--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5"]
    assert dry_run("tpu_pod.sh", "create", *flags) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-east5-a", "--project=proj",
         "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]]
    assert dry_run("tpu_pod.sh", "create", *flags, "--queued", "--spot") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--node-id=pod", "--zone=us-east5-a",
         "--project=proj", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot"]]
    assert dry_run("tpu_pod.sh", "delete", *POD) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone=us-east5-a", "--project=proj", "--quiet"]]
    assert dry_run("tpu_pod.sh", "delete", *POD, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod", "--zone=us-east5-a", "--project=proj",
         "--force", "--quiet"]]
    # defaults, and the environment variables that set them
    [create] = dry_run("tpu_pod.sh", "create", env={"TPU_NAME": "t", "ZONE": "z", "PROJECT": ""})
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--zone=z",
                      "--accelerator-type=v5litepod-32", "--version=v2-alpha-tpuv5-lite"]


def test_install_packs_the_checkout_without_ignored_files_and_installs_jax_tpu_on_every_worker(tmp_path):
    pack, scp, ssh = dry_run("tpu_pod.sh", "install", *POD, env={"TMPDIR": str(tmp_path)})
    tarball = tmp_path / "jaxsd-pod.tar.gz"
    assert pack[-1] == str(tarball)
    subprocess.run(pack, check=True, timeout=120)  # only writes the tarball
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "launch/tpu_pod.sh", "launch/lib.sh", "jaxsd/cli.py"} <= names
    assert not [n for n in names if n.startswith((".venv/", ".git/")) or "__pycache__" in n]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball), "pod:jaxsd.tar.gz", "--zone=us-east5-a",
                   "--project=proj", "--worker=all"]
    workers, command = _remote(ssh)
    assert workers == "all"
    for step in ("tar -xzf ~/jaxsd.tar.gz -C ~/jaxsd", "uv venv --python 3.12 .venv",
                 'uv pip install --python .venv/bin/python -e ".[gcs]" "jax[tpu]"'):
        assert step in command


def test_input_errors_name_what_is_wrong():
    for args, message in ((["launch"], "unknown command 'launch'"), ([], "expected a command"),
                          (["start"], "start needs CONFIG"), (["logs", "--zone"], "--zone needs a value"),
                          (["create", "--bucket", "my-bucket"], "--bucket must be a gs:// URL"),
                          (["stop", "--force"], "unknown option --force")):
        proc = script("tpu_pod.sh", "--dry-run", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert "usage: launch/tpu_pod.sh COMMAND" in script("tpu_pod.sh", "--help").stdout
