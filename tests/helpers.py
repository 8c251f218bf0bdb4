"""Test helpers: relative-error checks and running code on fake devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref| — the parity metric used throughout."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def run_python(code: str, *, devices: int = 8, timeout: float = 600, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter with `devices` fake CPU devices; return its stdout.

    XLA_FLAGS must be set before JAX is first imported, so this cannot run in the
    test process. Fails the test with the child's stderr if it exits non-zero.
    """
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc.stdout


def jaxsd_command(*args: str, env: dict | None = None, timeout: float = 900, check: bool = True,
                  devices: int | None = None) -> subprocess.CompletedProcess:
    """Run the `jaxsd` console script a user types (`.venv/bin/jaxsd ARGS`) in a fresh process.

    PYTHONPATH points at this checkout so a worktree tests its own code. `devices` sets fake CPU
    devices. check=True fails the test with the command's output when it exits non-zero.
    """
    exe = Path(sys.executable).parent / "jaxsd"
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    if devices is not None:
        full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"`jaxsd {' '.join(map(str, args))}` exited {proc.returncode}:\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc
