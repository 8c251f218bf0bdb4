"""Run directories anywhere: a local path or an object store (`gs://bucket/run`), through etils `epath`.

    with RunDir("gs://bucket/runs/sd15", writer=jax.process_index() == 0, logger=log) as run:
        (run.path / "config.yaml").write_text(...)      # whole files: straight to the run dir
        jsonl = run.local_file("metrics.jsonl")          # growing files: a local file, uploaded by sync()

Every path of a run goes through `epath.Path` — the path library orbax uses — never through
`pathlib.Path` or string joins: `pathlib.Path("gs://b/run")` is the local directory "gs:/b/run".

Supported: local paths (including buckets mounted with gcsfuse, NFS, ...) and `gs://` (epath's
fsspec backend: needs `gcsfs`, the `jaxsd[gcs]` extra). epath also knows s3://, az:// and hf://, but
orbax writes arrays only to local paths and gs:// (tensorstore's file and gcs drivers): those are
refused with a message, before anything is written.

How each file reaches the run dir:
  checkpoints/    orbax, every process writing its own shards (on gs:// through tensorstore's gcs driver)
  config.yaml, samples/*.png, checkpoints.damaged/   written whole by process 0, straight to the run dir
  train.log, metrics.jsonl, tensorboard/   grow during the run. An object store has no append (an
                  object is written whole), so on a remote run dir process 0 writes them in a local
                  staging directory and `sync()` uploads each file that changed, whole: every
                  SYNC_SECONDS when a step is logged, after each checkpoint save, and when the run
                  ends — also by an exception. A killed process loses at most what it logged since
                  the last sync; the records up to the last checkpoint are always uploaded, which is
                  where a resumed run goes on from (it first downloads train.log and
                  metrics.jsonl). Local run dirs are written in place, as the run goes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Self

from etils import epath

from jaxsd.errors import ConfigError, InputError

log = logging.getLogger("jaxsd.train")

SYNC_SECONDS = 60.0  # a remote run dir's growing files are uploaded at least this often (while steps are logged)
TRIGGER_SECONDS = 10.0  # a remote run dir's trigger file is looked for at most this often (one request each)
SCHEMES = ("gs://",)  # the object stores orbax checkpoints to (tensorstore's gcs driver)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (scheme://...) rather than a local path."""
    return "://" in os.fspath(path)


def run_path(path: str | os.PathLike, what: str = "train.run_dir") -> epath.Path:
    """`path` as an epath.Path: a URI kept as it is, a local path made absolute (orbax needs that).

    Raises ConfigError for a URI scheme jaxsd cannot checkpoint to, naming `what`."""
    text = os.fspath(path)
    if not is_remote(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if not text.startswith(SCHEMES):
        scheme = text.split("://", 1)[0]
        raise ConfigError(f"{what}={text!r}: {scheme}:// is not supported; a run directory is a local path "
                          f"(a mounted bucket works as one) or {' / '.join(s + '...' for s in SCHEMES)} — orbax "
                          "writes checkpoint arrays only there")
    if not text[len("gs://"):].strip("/"):
        raise ConfigError(f"{what}={text!r}: names no bucket; use gs://BUCKET/PATH")
    _check_gcs_filesystem(text, what)
    return epath.Path(text.rstrip("/"))


def _check_gcs_filesystem(text: str, what: str) -> None:
    """epath reaches gs:// through fsspec's "gs" filesystem, which gcsfs provides."""
    import fsspec

    try:
        fsspec.get_filesystem_class("gs")
    except ImportError as e:
        raise ConfigError(f"{what}={text!r}: gs:// needs gcsfs ({e}); install it with pip install 'jaxsd[gcs]'") from e


def move_tree(src: epath.Path, dst: epath.Path) -> None:
    """Move the directory `src` to `dst` (which must not exist).

    Local: one rename. Object store: every object copied, then `src` removed — an object store
    has no directories to rename, and no empty parent directory for a rename to go to."""
    if not is_remote(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        return
    for rel in _files(src):
        (dst / rel).write_bytes((src / rel).read_bytes())
    src.rmtree()


def _files(top: epath.Path, prefix: str = "") -> list[str]:
    """The files under `top`, as paths relative to it (iterdir: epath's walk loses the scheme of its
    fsspec roots)."""
    out = []
    for child in top.iterdir():
        rel = f"{prefix}{child.name}"
        out.extend(_files(child, rel + "/") if child.is_dir() else [rel])
    return out


def _file_state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class RunDir:
    """One run directory: its epath `path`, and local files for what grows during the run.

    writer: whether this process writes the run dir's shared files (process 0); the others get
    no staging directory and their `sync` does nothing. logger: one whose records the writer
    also appends to <run_dir>/train.log (across resumes). Use as a context manager: leaving it
    detaches train.log, uploads what is staged (also when leaving by an exception) and removes
    the staging directory.
    """

    def __init__(self, path: str | os.PathLike, *, writer: bool = True, logger: logging.Logger | None = None,
                 what: str = "train.run_dir"):
        self.path = run_path(path, what)
        self.remote = is_remote(self.path)
        self.writer = writer
        self.staging: Path | None = None
        self._synced: dict[str, tuple[int, int]] = {}  # staged file (relative) → (size, mtime) last uploaded
        self._last_sync = time.monotonic()
        self._log: tuple[logging.Logger, logging.Handler] | None = None
        if not writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)  # an object store creates nothing: a no-op there
        if self.remote:
            self.staging = Path(tempfile.mkdtemp(prefix="jaxsd-run-"))
        if logger is not None:
            handler = logging.FileHandler(self.local_file("train.log"))
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            self._log = (logger, handler)
        if self.remote:
            log.info("run dir %s is remote: train.log, metrics.jsonl and tensorboard/ are written in %s and "
                     "uploaded at least every %d s, after each checkpoint and at the end", self.path,
                     self.staging, SYNC_SECONDS)

    def __truediv__(self, name: str) -> epath.Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def local_file(self, name: str) -> Path:
        """A local file to write the run dir's growing file `name` in: the file itself in a local run
        dir; else a staged copy, starting as the run dir's current one (a resumed run goes on from it)."""
        if not self.remote:
            return Path(self.path) / name  # a local path: the one place a local run dir becomes a pathlib.Path
        staged = self._staged(name)
        remote = self.path / name
        if not staged.exists() and remote.exists():
            staged.write_bytes(remote.read_bytes())
            self._synced[name] = _file_state(staged)  # as uploaded: not sent again unless it changes
        return staged

    def local_dir(self, name: str) -> Path:
        """A local directory for the run dir's growing directory `name` (new files only: TensorBoard)."""
        if not self.remote:
            return Path(self.path) / name
        staged = self._staged(name)
        staged.mkdir(parents=True, exist_ok=True)
        return staged

    def _staged(self, name: str) -> Path:
        if self.staging is None:
            raise RuntimeError("only the writing process (process 0) stages run-dir files")  # a bug in the caller
        staged = self.staging / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def sync(self) -> None:
        """Upload every staged file that changed since its last upload (whole: objects have no append)."""
        self._last_sync = time.monotonic()
        if self.staging is None:
            return
        for root, _, files in os.walk(self.staging):
            for name in files:
                local = Path(root) / name
                rel = local.relative_to(self.staging).as_posix()
                state = _file_state(local)
                if self._synced.get(rel) == state:
                    continue
                (self.path / rel).write_bytes(local.read_bytes())
                self._synced[rel] = state

    def maybe_sync(self) -> None:
        """`sync()` when SYNC_SECONDS have passed since the last one (cheap to call every step)."""
        if self.staging is not None and time.monotonic() - self._last_sync >= SYNC_SECONDS:
            self.sync()

    def close(self) -> None:
        """Detach train.log, upload what is staged and remove the staging directory."""
        if self._log is not None:
            logger, handler = self._log
            logger.removeHandler(handler)
            handler.close()
            self._log = None
        if self.staging is None:
            return
        self.sync()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TriggerFile:
    """The trigger file of a run dir (`checkpoint.trigger_file`), looked for by process 0.

    Local: a stat per call. Remote: each look is a request to the object store, so it is made at
    most every TRIGGER_SECONDS (a save is then asked for within about that time)."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.every = TRIGGER_SECONDS if is_remote(path) else 0.0
        self._last = -float("inf")

    def exists(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return self.path.exists()

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def require_run_dir(path: str | os.PathLike, what: str = "RUN_DIR") -> epath.Path:
    """A run dir to read (`jaxsd export`): its epath.Path; InputError when it has no checkpoints/."""
    run = run_path(path, what)
    if not (run / "checkpoints").is_dir():
        raise InputError(f"{run}: no checkpoints/ folder — not a `jaxsd train` run directory, or a run that "
                         "has not saved a checkpoint yet")
    return run
