"""Shared test set-up: CPU only, deterministic, tiny.

Tests that need several devices run their body in a subprocess (see
`tests/helpers.py::run_python`) because XLA_FLAGS must be set before JAX is
imported, and this process has already imported it.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole run: this process, every pytest-xdist
# worker (they inherit the variable) and every `jaxsd` subprocess a test starts. Many tests
# compile the same tiny train step or pipeline; with the cache only the first one pays.
# A cache the user configured wins; the one made here is removed when the run ends.
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsd-tests-xla-")

# Tests compile hundreds of small programs and run each a few times: XLA:CPU's LLVM at -O0 compiles them
# 2-3x faster (a toy train step: 6.2 -> 2.0 CPU-s), and their slower kernels cost little at these sizes.
# It changes some results in the last bit only (every tolerance holds), the same in every process of the
# run: xdist workers, `jaxsd` and Python subprocesses inherit XLA_FLAGS (tests/helpers.py adds device
# counts to them). `jaxsd train`'s step, which sets -O1 itself, follows a level set in XLA_FLAGS too.
# XLA:CPU's older elemental fusion emitters compile the same programs in two thirds of the CPU time of its
# MLIR fusion emitters (the tiny train step at -O0: 7.6 -> 5.0 CPU-s; two test files: -17 % CPU), again with
# results that differ in the last bit at most. A flag the user set wins.
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

import pytest


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE is not None:
        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # A `torch` test without torch installed is skipped with a reason, not failed;
    # CI installs the [torch] extra, so there they run.
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    skip = pytest.mark.skip(reason="needs the [torch] extra (pip install -e '.[torch]')")
    for item in items:
        if "torch" in item.keywords and not have_torch:
            item.add_marker(skip)
    # Longest files first: pytest-xdist (--dist loadfile) hands files out in collection order, and the
    # alphabetical order left tests/train/'s long runs for last, one worker finishing alone for minutes
    # (the quick demo, the longest single test, first of all: handed out late, it ran alone at the end).
    items.sort(key=lambda item: _FIRST.get(item.path.parent.name, len(_FIRST)))  # stable: files stay whole


# test folders in the order their files are handed to the workers (the rest follow, alphabetically)
_FIRST = {name: i for i, name in enumerate(("demo", "train", "bench", "pipelines", "models"))}
