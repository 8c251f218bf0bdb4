"""The random torchvision VGG16 of the loss tests, for `jaxsd eval --pairs --lpips-weights`."""

from tests.losses.conftest import torch_vgg16, vgg16_pth  # noqa: F401  (session fixtures, shared)
