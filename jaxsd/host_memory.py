"""Host memory the C library keeps after `free`: handing it back to the OS.

Compiling an XLA program on CPU allocates and frees a lot of small blocks; glibc keeps the
freed heap, and the process's RSS (and its peak, once the next allocations land elsewhere)
counts it. Used after compiling the train step (`jaxsd.train.compile`) and the generation
program (`jaxsd.pipelines.generate`), and once the train state is loaded (`jaxsd.train.loop`). Imports nothing of jaxsd, so every layer may use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def libc() -> ctypes.CDLL | None:
    """The C library, or None where there is none to load."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_freed_host_memory() -> None:
    """Return memory glibc holds after `free` to the OS (no-op on other C libraries)."""
    lib = libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)
