"""The CPU-only compile and memory choices of `jaxsd.train.compile`: which platform gets what, and
that each does what its docstring says."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.train.compile import (
    run_once,
    shared_reduction_below,
    split_cpu_into_devices,
    train_step_compiler_options,
    warm_cpu_heap,
)
from tests.helpers import run_python


def test_only_the_cpu_gets_tuned_compile_options(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    cpu = train_step_compiler_options("cpu")
    assert cpu == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", "xla_backend_optimization_level": 1}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
    assert "xla_backend_optimization_level" not in train_step_compiler_options("cpu")  # the user's level wins
    assert shared_reduction_below("cpu") == 1 << 18  # small params' Σ g² in one reduction
    for accelerator in ("gpu", "cuda", "rocm", "tpu"):
        assert train_step_compiler_options(accelerator) == {}, accelerator
        assert shared_reduction_below(accelerator) == 0, accelerator


def test_run_once_computes_what_jit_does():
    def init(key):
        return {"w": jax.random.normal(key, (64, 32)), "b": jnp.zeros(32)}

    key = jax.random.key(3)
    ours, ref = run_once(init, key), jax.jit(init)(key)
    np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(ours["b"], ref["b"])


def test_warm_heap_is_skipped_once_jax_runs():
    jnp.zeros(1).block_until_ready()  # this process's backend is up: XLA's threads have their arenas
    assert warm_cpu_heap() is False


def test_split_cpu_into_devices_only_before_the_backend_starts():
    jnp.zeros(1).block_until_ready()  # this process's backend is up: its device count is fixed
    assert split_cpu_into_devices(2) == 1


_SPLIT = """
import jax
from jaxsd.train.compile import split_cpu_into_devices
print(split_cpu_into_devices(2), len(jax.devices("cpu")), split_cpu_into_devices(2))
"""


def test_split_cpu_into_devices_gives_a_fresh_process_that_many_unless_xla_flags_name_a_count():
    suite_flags = os.environ.get("XLA_FLAGS", "")  # the suite's compile flags, no device count
    assert run_python(_SPLIT, env={"XLA_FLAGS": suite_flags}).split() == ["2", "2", "1"]
    assert run_python(_SPLIT, devices=3).split() == ["1", "3", "1"]  # the count already set wins


_STEPS = """
import resource, sys
import jax, jax.numpy as jnp
from jaxsd.train.compile import warm_cpu_heap
applied = warm_cpu_heap() if sys.argv[-1] == "warm" else False

# a gradient through a 96 MB activation: one large temporary per call, as a small train step has
step = jax.jit(jax.grad(lambda w, a: jnp.tanh(a @ w).sum()))
a, b = jnp.ones((6000, 8), jnp.float32), jnp.ones((8, 4000), jnp.float32)
step(b, a).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step(b, a).block_until_ready()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # ~12 s: 200 steps twice in a subprocess; `jaxsd demo`'s test runs with the warm heap
def test_warm_heap_reuses_step_temporaries_instead_of_fresh_pages():
    """Page faults (not time: they do not depend on the machine's load) over 10 calls of a step
    with a 96 MB temporary: fresh zero-filled pages each call by default, the same pages warm."""
    def run(mode: str) -> list[str]:
        return run_python(f"import sys; sys.argv.append({mode!r})\n" + _STEPS, devices=1).split()

    (default_applied, default_faults), (warm_applied, warm_faults) = run("cold"), run("warm")
    assert (default_applied, warm_applied) == ("False", "True")
    assert int(default_faults) > 10 * 20_000  # ~24 k pages of 4 kB per call
    # measured: 234 k → 94 k here (the output buffers still come and go); demo UNet steps 24 k → 1.6 k each
    assert int(warm_faults) < int(default_faults) / 2
