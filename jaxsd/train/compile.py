"""Compiling the train step: the XLA options it needs, and the host memory it uses on CPU.

Every choice here is measured on XLA:CPU and applied only when the backend is CPU; GPU and
TPU compile with XLA's defaults. Measured effects on the SD1.5 train step (fp32 AdamW,
32×32 latents, CPU):

* XLA:CPU's default scheduler orders the update of each param after the whole
  backward pass, so every gradient is alive at once (3.5 GB of temporaries). Its
  memory-optimized scheduler updates some params before the backward pass ends when
  nothing else needs their gradients (see `streamed` in `jaxsd.train.step`), same step
  time: re-measured 2026-12-08 (`jaxsd bench train-step --preset sd15 --latent 32 --dtype
  float32 --clip 0|1 --memory-only`) 2.82 GB of temporaries streamed vs 3.36 GB with
  clipping (the fp32 gradients alone are 3.44 GB). It does not order them early enough
  for a segmented backward pass: SD1.5 batch 4 at 64×64 keeps 1.9 GB of gradients of the
  later blocks at its peak with or without clipping — `train.fused_update` ties each
  block's update into its backward pass (jaxsd/train/fused_update.py).
* LLVM at -O1 instead of XLA's default -O2 for the step's own kernels (the convolutions and
  matmuls are library calls either way): compile 24.5 → 22.3 s, step time unchanged
  (interleaved A/B in one process: SD1.5 8.77 vs 8.74 s, `small` 1.079 vs 1.077 s; -O0
  compiles faster still but its unvectorised kernels make the step 50 % slower). A level set
  in XLA_FLAGS wins (the test suite compiles its tiny steps at -O0).
* Compiling a model this size (and XLA's cost analysis of it) leaves ~1 GB of freed
  memory in glibc's heap, which the process keeps (peak RSS counts it) unless it is
  handed back with `malloc_trim`.
* The gradient norm's Σ g² of all params under 2^18 values is one reduction over their
  concatenated gradients (`shared_reduction_below`): XLA:CPU compiles every reduction as a
  kernel of its own (SD1.5: −3 s of compile).
* A program that runs once (a random init) compiles at LLVM -O0 (`run_once`): `jaxsd demo`'s
  UNet init compiles in 8 s instead of 27 s, its VAE's in 6 s instead of 28 s (2-core machine
  under load); the init itself then takes 0.1 s instead of 0.03 s. Some params can differ from
  an -O2 init in the last bit.

And for small, fast steps (`warm_cpu_heap`, applied by `jaxsd demo`): a step's temporaries
are one block per call (89 MB for the demo's UNet at batch 64), above glibc's mmap threshold,
so every step mmaps fresh pages that the kernel zero-fills one fault at a time, and unmaps
them after. Demo UNet, 200 steps on a loaded machine: 4.8 M → 0.32 M minor page faults, system
time 18.4 → 4.7 s, the same losses bitwise. And `split_cpu_into_devices`: the demo's batch split
over two CPU devices, whose halves run side by side where one device's small ops leave a core idle.

And a persistent compilation cache (`train.compilation_cache`): a resumed, restarted or
repeated run loads the compiled step from disk instead of compiling it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax

from jaxsd.host_memory import libc as _libc
from jaxsd.host_memory import release_freed_host_memory

log = logging.getLogger("jaxsd.train")
T = TypeVar("T")


def use_compilation_cache(path: str | None) -> str | None:
    """Keep compiled programs in `path` (None = off) — those that took longer to compile than
    `jax_persistent_cache_min_compile_time_secs` (JAX's default: 1 s).

    A cache directory the user already configured (JAX_COMPILATION_CACHE_DIR or
    `jax.config`) wins. Returns the directory in use.
    """
    from jax.experimental.compilation_cache import compilation_cache

    configured = jax.config.jax_compilation_cache_dir
    if configured or not path:
        return configured or None
    directory = os.path.expanduser(path)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    compilation_cache.reset_cache()  # in case something compiled before the directory was set
    return directory


def train_step_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA options for compiling the train step on `backend` (default: jax's default backend)."""
    if (backend or jax.default_backend()) != "cpu":
        return {}
    options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # a level the user set wins
        options["xla_backend_optimization_level"] = 1
    return options


def cpu_only() -> bool:
    """Whether JAX can only run on the CPU here (JAX_PLATFORMS=cpu, or no GPU/TPU plugin installed),
    known without starting a backend."""
    import importlib.metadata
    import importlib.util

    platforms = jax.config.jax_platforms or ""
    if platforms:
        return platforms.split(",") == ["cpu"]
    plugins = list(importlib.metadata.entry_points(group="jax_plugins"))
    return not plugins and importlib.util.find_spec("libtpu") is None and importlib.util.find_spec("jax_plugins") is None


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def warm_cpu_heap() -> bool:
    """On a CPU-only JAX whose backend has not started: every thread allocates from glibc's main
    heap, which never mmaps and never trims, so each step's temporaries reuse the previous step's
    pages (module doc). Returns whether it applied. Once XLA's threads have their own arenas it
    would change nothing, so it is skipped then (e.g. in a process that already ran JAX code).

    Not applied by `jaxsd train`: a heap that never returns memory could raise the peak RSS of
    large models on CPU, which is unmeasured."""
    from jax._src import xla_bridge  # no public "has a backend started" yet

    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or xla_bridge.backends_are_initialized() or not cpu_only():
        return False
    libc.mallopt(_M_ARENA_MAX, 1)  # XLA's worker threads share the main heap (its own arenas cap blocks at 64 MB)
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return True


def split_cpu_into_devices(count: int) -> int:
    """On a CPU-only JAX whose backend has not started: `count` CPU devices instead of one (via
    XLA_FLAGS), so a data-parallel step (`sharding.data: -1`) runs one slice of the batch per
    device, each device on a thread of its own. Returns the number of CPU devices the backend will
    have: `count`, or 1 when not applied (a backend already started, not CPU-only, or XLA_FLAGS
    already names a device count).

    For steps whose ops are too small for XLA:CPU to spread over the cores: the demo's UNet step
    (batch 64, 8×8 latents) keeps about one of two cores busy on one device; on two its median
    step took 0.69× the time (0.195 vs 0.283 s, quiet 2-core machine, `bench/demo_step_ab.py
    --devices 1,2`), at less CPU per step. Applied by `jaxsd demo` only: a large step already fills
    the cores, and devices would split its memory."""
    from jax._src import xla_bridge  # no public "has a backend started" yet

    flags = os.environ.get("XLA_FLAGS", "")
    if (count <= 1 or xla_bridge.backends_are_initialized() or not cpu_only()
            or "xla_force_host_platform_device_count" in flags):
        return 1
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return count


def run_once(fn: Callable[..., T], *args: Any, out_shardings: Any = None) -> T:
    """`fn(*args)` (e.g. a random init) compiled for a single call: on CPU at LLVM -O0, whose
    kernels are slower but compile several times faster (module doc); elsewhere as `jax.jit`."""
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return jitted.lower(*args).compile(compiler_options=options)(*args)


def shared_reduction_below(backend: str | None = None) -> int:
    """Params with fewer values than this share one Σ g² reduction in the step's gradient norm
    (their gradients concatenated; SD1.5: ~460 params, 30 MB). XLA:CPU compiles each reduction
    into a kernel of its own: one per param cost ~3 s of the SD1.5 step's compile. 0 (one
    reduction per param, XLA's default) on other backends."""
    return 1 << 18 if (backend or jax.default_backend()) == "cpu" else 0


def compile_train_step(lowered: Any) -> tuple[Any, float | None]:
    """(`lowered.compile()` with `train_step_compiler_options`, FLOPs of one call from XLA's cost
    analysis), then the memory both used given back (each leaves freed heap behind; SD1.5:
    RSS 13.8 → 13.5 GB at the first step when the trim also follows the cost analysis)."""
    from jaxsd.train.logging import compiled_flops

    compiled = lowered.compile(compiler_options=train_step_compiler_options())
    flops = compiled_flops(compiled)
    release_freed_host_memory()
    return compiled, flops


def batch_signature(batch: dict[str, Any]) -> tuple:
    """What a compiled step is specific to: each batch entry's name, shape and dtype."""
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))


class CompiledSteps:
    """The jitted train step compiled once per batch shape and kept.

    The loop compiles its first batch's shape from the planned state (ShapeDtypeStructs with their
    shardings, no arrays) before any weight is loaded (`compile`), so the compiler's transient host
    memory is handed back before the weights arrive: the peak is the larger of compiling and
    training, not their sum. Aspect-ratio buckets give batches of other shapes; each gets its own
    executable on first sight (logged with its shapes and compile time). With
    `train.compilation_cache` a resumed run loads them from disk instead of compiling again.
    """

    def __init__(self, jitted: Any, mesh: Any = None):
        self.jitted, self.mesh = jitted, mesh
        self.compiled: dict[tuple, tuple[Any, float | None]] = {}

    def compile(self, state: Any, batch: dict[str, Any]) -> None:
        """Compile the step for `batch`'s shapes unless it is compiled already. state: the train state,
        or its abstract values (`StatePlan.abstract`) — the same shapes, dtypes and shardings, so the
        executable is the one the real state runs (a mismatch is an error when it is called)."""
        key = batch_signature(batch)
        if key in self.compiled:
            return
        t0 = time.perf_counter()
        # traced under the mesh: a kernel that must run per device (TPU splash attention) finds it
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            lowered = self.jitted.lower(state, batch)
        self.compiled[key] = compile_train_step(lowered)
        shapes = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s, _ in key)
        log.info("train step compiled for batch shapes {%s} in %.1f s (%d shape%s so far)", shapes,
                 time.perf_counter() - t0, len(self.compiled), "s" if len(self.compiled) > 1 else "")

    def __call__(self, state: Any, batch: dict[str, Any]) -> tuple[Any, Any, float | None]:
        """(new state, metrics, FLOPs of this step or None)."""
        self.compile(state, batch)
        compiled, flops = self.compiled[batch_signature(batch)]
        state, metrics = compiled(state, batch)
        return state, metrics, flops
