"""The reference packages load on CPU torch without torchvision's C extension, and leave no trace."""

import importlib
import importlib.util

import pytest

from tests.reference_packages import reference_packages


@pytest.mark.torch
def test_torchvision_models_lpips_and_pytorch_fid_import_run_and_leave_no_trace():
    import torch

    with reference_packages():
        vgg = importlib.import_module("torchvision.models").vgg16(weights=None).features.eval()
        lpips = importlib.import_module("lpips")
        inception = importlib.import_module("pytorch_fid.inception")
    assert vgg(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 1, 1)  # still usable after the block
    assert callable(lpips.LPIPS) and inception.InceptionV3.DEFAULT_BLOCK_INDEX == 3
    assert importlib.util.find_spec("torchvision") is None  # what transformers/diffusers check
