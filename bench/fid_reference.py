"""pytorch-fid's FID InceptionV3 with random weights: the state dict the FID tests and `jaxsd bench eval`
load on both sides (pytorch-fid publishes only trained weights, which neither may download).

The weights are drawn so activations stay O(1) through the 20-odd conv layers (torchvision's default
init shrinks them ~3× per layer, which would make a parity test of the pool features compare
near-zeros): He-normal convs, BatchNorm affine and running statistics around the identity.
"""

from __future__ import annotations

import importlib

from bench.reference_packages import reference_packages


def random_fid_state(seed: int = 0) -> dict:
    """A random state dict in the layout of pytorch-fid's `pt_inception-2015-12-05` file (torch tensors)."""
    import torch

    with reference_packages():
        inc = importlib.import_module("pytorch_fid.inception")
        model = inc._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        model.Mixed_5b = inc.FIDInceptionA(192, pool_features=32)
        model.Mixed_5c = inc.FIDInceptionA(256, pool_features=64)
        model.Mixed_5d = inc.FIDInceptionA(288, pool_features=64)
        model.Mixed_6b = inc.FIDInceptionC(768, channels_7x7=128)
        model.Mixed_6c = inc.FIDInceptionC(768, channels_7x7=160)
        model.Mixed_6d = inc.FIDInceptionC(768, channels_7x7=160)
        model.Mixed_6e = inc.FIDInceptionC(768, channels_7x7=192)
        model.Mixed_7b = inc.FIDInceptionE_1(1280)
        model.Mixed_7c = inc.FIDInceptionE_2(2048)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            value = 0.75 + 0.5 * torch.rand(value.shape, generator=gen)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * torch.randn(value.shape, generator=gen)
        state[key] = value
    return state
