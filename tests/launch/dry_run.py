"""Running the launch/ scripts in the tests: their --dry-run output read back as argv lists."""

from __future__ import annotations

import os
import shlex
import subprocess

from tests.helpers import REPO

LAUNCH = REPO / "launch"

# a config path and overrides that only survive correct quoting: spaces, brackets, quotes, $, globs
CONFIG = "my configs/run 1.yaml"
OVERRIDES = ["data.roots=[/data/a b, /data/c]", "logging.sample_prompts=[\"it's a cat\", \"$HOME *\"]",
             "train.steps=10", "model.pretrained=/models/sd 1.5"]


def script(name: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/NAME ARGS (the caller's environment plus `env`); check: fail the test on a non-zero exit."""
    proc = subprocess.run([str(LAUNCH / name), *args], capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    if check:
        assert proc.returncode == 0, f"{name} {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def dry_run(name: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands `launch/NAME --dry-run ARGS` prints, one argv per line, as a shell would split them."""
    out = script(name, "--dry-run", *args, env=env).stdout
    return [shlex.split(line) for line in out.splitlines()]
