"""Write an output folder whole or not at all, replacing only a folder the same tool wrote before.

`jaxsd export --out DIR` may point at:
  - a path that does not exist, or an empty folder: written;
  - a previous export (it holds the marker file, e.g. `jaxsd_export.json`): replaced as a whole;
  - anything else: refused with an InputError (the user's files are never overwritten or mixed in).

Everything is written into a hidden staging folder beside DIR (same filesystem, so the final
rename is atomic) and renamed to DIR only once complete: a failed or interrupted export leaves
DIR as it was, not half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from jaxsd.errors import InputError


def check_replaceable(out: str | os.PathLike, marker: str, keep: Sequence[str | os.PathLike] = (),
                      *, flag: str = "--out") -> None:
    """Raise InputError unless `out` may be (over)written; `keep`: paths that must not be inside it."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is a file, not a folder; choose another path")
    for path in keep:
        path = Path(path).resolve()
        if path == out.resolve() or out.resolve() in path.parents:
            raise InputError(f"{flag} {out}: it contains {path}, which this command reads; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise InputError(f"{flag} {out}: exists, is not empty and is not a previous export (no {marker} in it); "
                         "choose a new folder, or empty it yourself")


@contextlib.contextmanager
def replacing_folder(out: str | os.PathLike, marker: str, keep: Sequence[str | os.PathLike] = (),
                     *, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it becomes `out` (which it must
    fill, marker included); when the block raises, the staging folder is removed and `out` untouched."""
    out = Path(out).absolute()
    check_replaceable(out, marker, keep, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private to this user
    try:
        yield staging
        if not (staging / marker).is_file():
            raise RuntimeError(f"output folder written without its marker {marker}")  # a bug in the caller
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():  # an empty folder or a previous export: moved aside, then removed
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)
        os.rename(staging, out)
        shutil.rmtree(old)
    else:
        os.rename(staging, out)
