"""Shared test set-up: CPU only, deterministic, tiny.

Tests that need several devices run their body in a subprocess (see
`tests/helpers.py::run_python`) because XLA_FLAGS must be set before JAX is
imported, and this process has already imported it.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


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
