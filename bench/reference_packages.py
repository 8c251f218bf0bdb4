"""PyTorch references that import torchvision, loaded without torchvision's C extension.

torchvision's PyPI wheels are CUDA builds: their `_C` extension links CUDA torch libraries, so
`import torchvision` fails on this project's CPU torch (in `_meta_registrations`, which registers
fakes for the extension's ops). The references the metric tests need — torchvision's VGG16 and
InceptionV3 definitions, `lpips`, `pytorch-fid` — are plain Python over torch.nn. `make venv-test`
installs them with --no-deps into the venv's reference-packages/ folder (reference-packages.txt).

    with reference_packages():
        lpips = importlib.import_module("lpips")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True)
    ref(x, y)  # the objects keep working after the block

Used by the metric tests (tests/reference_packages.py skips a test when the folder is missing) and by
`jaxsd bench eval`'s torch side (pytorch-fid's InceptionV3).

Inside the block that folder is on sys.path and `torchvision` is a namespace over its files whose
`__init__` never runs (model definitions need nothing of the C extension). On leaving, every module
imported from there is dropped from sys.modules and the folder from sys.path again, so the rest of
the process — transformers and diffusers check whether torchvision is installed — never sees them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

PACKAGES = Path(sys.prefix) / "reference-packages"  # in the venv running the tests (make venv-test)
TOP_LEVEL = ("torchvision", "lpips", "pytorch_fid")
MISSING = f"reference packages missing in {PACKAGES}: run `make venv-test` (reference-packages.txt)"


def available() -> bool:
    return (PACKAGES / "torchvision").is_dir()


@contextlib.contextmanager
def reference_packages() -> Iterator[None]:
    """Make the reference packages importable for the block; RuntimeError when they are missing."""
    tv = PACKAGES / "torchvision"
    if not available():
        raise RuntimeError(MISSING)
    sys.path.insert(0, str(PACKAGES))
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = [str(tv)]
    pkg.__file__ = str(tv / "__init__.py")
    pkg.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    pkg.__spec__.submodule_search_locations = pkg.__path__
    pkg.__version__ = re.search(r"__version__ = '([^']+)'", (tv / "version.py").read_text()).group(1)
    sys.modules["torchvision"] = pkg
    try:
        pkg.models = importlib.import_module("torchvision.models")  # as torchvision's __init__ would
        yield
    finally:
        sys.path.remove(str(PACKAGES))
        for name in [n for n in sys.modules if n.split(".")[0] in TOP_LEVEL]:
            del sys.modules[name]
