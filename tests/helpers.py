"""Test helpers: relative-error checks and running code on fake devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref| — the parity metric used throughout."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def xla_flags(devices: int) -> str:
    """This run's XLA_FLAGS (tests/conftest.py sets the compile level) with `devices` fake CPU devices."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count=")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def run_python(code: str, *, devices: int = 8, timeout: float = 600, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter with `devices` fake CPU devices; return its stdout.

    XLA_FLAGS must be set before JAX is first imported, so this cannot run in the
    test process. Fails the test with the child's stderr if it exits non-zero.
    """
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": xla_flags(devices),
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False,
                          timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc.stdout


JAXSD = Path(sys.executable).parent / "jaxsd"  # the console script of this venv


def jaxsd_env(env: dict | None = None) -> dict:
    """The environment `jaxsd_command` runs the console script in (CPU, PYTHONPATH on this checkout)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}


def jaxsd_command(*args: str, env: dict | None = None, timeout: float = 900, check: bool = True,
                  devices: int | None = None) -> subprocess.CompletedProcess:
    """Run the `jaxsd` console script a user types (`.venv/bin/jaxsd ARGS`) in a fresh process.

    PYTHONPATH points at this checkout so a worktree tests its own code. `devices` sets fake CPU
    devices. check=True fails the test with the command's output when it exits non-zero.
    """
    full_env = jaxsd_env(env)
    if devices is not None:
        full_env["XLA_FLAGS"] = xla_flags(devices)
    proc = subprocess.run([str(JAXSD), *map(str, args)], capture_output=True, text=True, check=False, timeout=timeout,
                          env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"`jaxsd {' '.join(map(str, args))}` exited {proc.returncode}:\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def jaxsd_main(capsys, *args) -> tuple[int, str, str]:
    """`jaxsd ARGS` through `jaxsd.cli.main` in this process: (exit status, stdout, stderr).

    For the refusals and the repeated runs of a command whose console script another test starts
    (`jaxsd_command`): no interpreter start-up and imports of their own (~1.5-3 CPU-s each).
    argparse's usage errors exit with status 2, as in the console script."""
    from jaxsd.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    printed = capsys.readouterr()
    return rc, printed.out, printed.err


def local_processes(n: int, *args: str, devices: int, log_dir: Path, env: dict | None = None,
                    wait: bool = True, timeout: float = 900) -> subprocess.CompletedProcess | subprocess.Popen:
    """`launch/local_processes.sh --devices DEVICES --log-dir LOG_DIR N ARGS` with this venv's jaxsd:
    N processes over loopback, process i's output in LOG_DIR/process_<i>.log.

    wait=False returns the running script (its stderr, a pipe, names each process's pid first);
    wait=True its finished run, without checking the exit status (a run may stop on purpose).
    """
    argv = [str(REPO / "launch" / "local_processes.sh"), "--devices", str(devices), "--log-dir", str(log_dir),
            "--jaxsd", str(JAXSD), str(n), *map(str, args)]
    full_env = jaxsd_env(env)  # the script keeps XLA_FLAGS but for the device count, which it sets
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                cwd=REPO)
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout, env=full_env,
                          cwd=REPO)


def kill_9_once_logged(argv: list, metrics: Path, step: int, env: dict, timeout: float = 600) -> None:
    """Start the training run `argv` and `kill -9` it from outside as soon as `metrics` (its metrics.jsonl)
    records `step`; fails the test if the run ends before that. A `jaxsd` command: `[JAXSD, *args]`,
    env `jaxsd_env()`."""
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if line.endswith("}")):
            break
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
