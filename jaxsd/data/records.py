"""Reading and writing one cached sample: sidecar safetensors files and packed records.

A sidecar `root/foo.<suffix>` is an ordinary safetensors file whose metadata
records what it was made from (`spec`: hash of the producer spec; `source`: the
image's size+mtime or the caption's hash), so a resumed `jaxsd cache` can tell
from the header alone whether it is still valid.

A packed record is the same arrays in one self-describing byte string (JSON
header + raw bytes), stored in ArrayRecord shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxsd.convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from jaxsd.errors import InputError

STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                  "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class SidecarMismatch(InputError):
    """A sidecar whose header names another producer than the manifest's."""


def spec_hash(spec: Mapping) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def sidecar_path(root: str | os.PathLike, key: str, suffix: str) -> Path:
    return Path(root) / f"{key}.{suffix}"


def write_sidecar(path: Path, arrays: Mapping[str, np.ndarray], *, spec: Mapping, source: str) -> None:
    save_file(dict(arrays), path, {"jaxsd_spec": spec_hash(spec), "jaxsd_source": source})


def sidecar_is_current(path: Path, spec: Mapping, source: str) -> bool:
    """True if `path` exists, is readable, and was made by `spec` from `source` (header only)."""
    if not path.is_file():
        return False
    try:
        meta = SafetensorsFile(path).metadata
    except (SafetensorsError, OSError):
        return False  # truncated or corrupt: re-encode it
    return meta.get("jaxsd_spec") == spec_hash(spec) and meta.get("jaxsd_source") == source


def read_sidecar(path: Path, spec: Mapping | None = None) -> dict[str, np.ndarray]:
    """The sidecar's arrays; with `spec`, first check (from the header) that `spec` produced it."""
    f = SafetensorsFile(path)
    if spec is not None and f.metadata.get("jaxsd_spec") != spec_hash(spec):
        raise SidecarMismatch(f"{path} was not made by the producer its manifest names (was the cache "
                              "rebuilt with other settings and interrupted?); re-run `jaxsd cache CONFIG`")
    return {k: np.array(f[k]) for k in f}


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def encode_record(arrays: Mapping[str, np.ndarray], meta: Mapping) -> bytes:
    """One sample as bytes: u64 header length, JSON header {"meta", "arrays": {name: [dtype, shape]}}, data."""
    header = {"meta": dict(meta), "arrays": {}}
    blobs = []
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        header["arrays"][name] = [a.dtype.name, list(a.shape)]
        blobs.append(a.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def decode_record(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    arrays, offset = {}, 8 + n
    for name, (dtype, shape) in header["arrays"].items():
        dt = _dtype(dtype)
        size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(data, dt, count=size // dt.itemsize if dt.itemsize else 0,
                                     offset=offset).reshape(shape)
        offset += size
    return arrays, header["meta"]
