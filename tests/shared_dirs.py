"""Folders made once per test run and read by every pytest-xdist worker.

With `--dist loadfile` the files that use one fixture land on different workers, and a session fixture
runs once per worker. A folder under the run's temporary root (the parent of each worker's basetemp),
made under a file lock by the first worker that asks and read by the others, is made once per run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

MADE = ".made"  # written last: a folder without it is a failed attempt, made again


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """`<run tmp>/shared-<name>`, made by `make(folder)` in the first process of the run that asks for it.

    The others wait on the lock, then read the folder. A `make` that failed leaves no MADE marker, so the
    next process tries again (and fails its own tests with its own traceback)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the controller's basetemp: one per run, above every worker's
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / MADE).exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / MADE).touch()
    return folder
