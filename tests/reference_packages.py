"""`bench.reference_packages` for tests: the PyTorch references that import torchvision (its VGG16 and
InceptionV3 definitions, `lpips`, `pytorch-fid`), loaded without torchvision's C extension; a test whose
packages are missing is skipped (`make venv-test` installs them).

    with reference_packages():
        lpips = importlib.import_module("lpips")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from bench import reference_packages as _packages

PACKAGES = _packages.PACKAGES


def require_reference_packages() -> None:
    """Skip the test when the reference packages are missing."""
    if not _packages.available():
        pytest.skip(_packages.MISSING)


@contextlib.contextmanager
def reference_packages() -> Iterator[None]:
    """As `bench.reference_packages.reference_packages`; skips the test when the packages are missing."""
    require_reference_packages()
    with _packages.reference_packages():
        yield
