"""Torch-free safetensors reading and writing with numpy.

Our own small reader instead of `safetensors.numpy.load_file` because we need
(a) bfloat16 (numpy has no bf16; `ml_dtypes` does), (b) lazy tensors, each read
from the file on its own when indexed, so a loader can cast one tensor at a time
to the target dtype without ever holding the whole file or an fp32 copy of the
model, and (c) a clear error for a truncated or corrupt file that names the
file and what is wrong.

Each tensor is its own memory map, released when the caller drops the array: one
map of the whole file keeps every page read so far resident in the process (RSS
counts mapped file pages until the map is closed), so loading SD1.5's fp32 UNet
through one peaked at the file plus the params (7.1 GB instead of 3.7 GB).

Format: 8-byte little-endian header length N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxsd.errors import InputError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


def is_float(dtype) -> bool:
    """A floating-point dtype, bfloat16 included (numpy does not count ml_dtypes' bfloat16 as floating)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype == _DTYPES["BF16"]


class SafetensorsError(InputError):
    """A safetensors file that cannot be read as one."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A lazily read safetensors file: `f[name]` is a read-only memory map of that tensor alone.

    Nothing is read beyond the header until a tensor is indexed; casting the
    returned array (`f[name].astype(dtype)`) touches only that tensor's bytes, and
    its pages stay mapped only while the array is referenced.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise SafetensorsError(f"{self.path}: file is {size} bytes, too short for a safetensors header (truncated or not safetensors)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"{self.path}: header claims {n} bytes but the file has {size}; the file is truncated or not safetensors. "
                    "Re-download or re-export it.")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e}); the file is corrupt.") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed or unsupported header entry {info!r}") from e
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise SafetensorsError(f"{self.path}: tensor {name!r} byte range does not match its shape {shape} and dtype {info['dtype']}")
            if self._data_start + end > size:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} but the file has {size} bytes; "
                    "the file is truncated. Re-download or re-export it.")
            self._entries[name] = (dtype, shape, begin, end)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        # a map of this tensor alone: unmapped when the caller drops the array
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (numpy arrays, bf16 via ml_dtypes allowed) as a safetensors file.

    Tensors are written in sorted-name order, like the reference implementation,
    so the same dict always gives the same bytes. The write goes to a temporary
    file that is renamed into place: a killed process never leaves half a file.
    """
    arrays = {name: np.asarray(tensors[name], order="C") for name in tensors}  # not ascontiguousarray: 0-d stays 0-d
    save_file_streamed({k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays.__getitem__, path, metadata)


def save_file_streamed(layout: Mapping[str, tuple[tuple[int, ...], np.dtype]], get: Callable[[str], np.ndarray],
                       path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time: `layout` gives each name's (shape, dtype) for the
    header, `get(name)` the tensor when its turn comes (e.g. read from a memory-mapped file and cast).
    Only one tensor is in memory at a time; same bytes as `save_file` of the same tensors."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    names = sorted(layout)
    offset = 0
    for name in names:
        shape, dtype = tuple(layout[name][0]), np.dtype(layout[name][1])
        if dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r}: dtype {dtype} has no safetensors name")
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align tensor data to 8 bytes
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name in names:
                arr = np.asarray(get(name), order="C")
                want = header[name]
                if list(arr.shape) != want["shape"] or _NAMES.get(arr.dtype) != want["dtype"]:
                    raise RuntimeError(f"{name}: got {arr.dtype}{list(arr.shape)}, the header says "
                                       f"{want['dtype']}{want['shape']}")  # a bug in the caller's layout
                fh.write(arr.tobytes(order="C"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
