"""One random torchvision VGG16 for the loss tests (building it — classifier included — takes seconds)."""

from __future__ import annotations

import importlib

import pytest

from tests.reference_packages import reference_packages


@pytest.fixture(scope="session")
def torch_vgg16():
    """torchvision's `vgg16()` with a seeded random init, in eval mode."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    with reference_packages():
        return importlib.import_module("torchvision.models").vgg16().eval()


@pytest.fixture(scope="session")
def vgg16_pth(torch_vgg16, tmp_path_factory):
    """The random backbone saved as torchvision saves it (its `features.*` keys) in a .pth."""
    import torch

    path = tmp_path_factory.mktemp("vgg16") / "vgg16-random.pth"
    torch.save({k: v for k, v in torch_vgg16.state_dict().items() if k.startswith("features.")}, path)
    return path
