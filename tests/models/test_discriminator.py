"""The PatchGAN discriminator against taming-transformers' NLayerDiscriminator, rebuilt in PyTorch from its
definition (conv 4×4, LeakyReLU 0.2, BatchNorm2d in training mode), with our weights copied in."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsd.models.discriminator import NLayerDiscriminator, init_discriminator
from tests.helpers import rel_err


def _torch_reference(torch, layers: int, channels: int):
    nn = torch.nn
    seq = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        seq += [nn.Conv2d(channels * prev, channels * mult, 4, 2 if n < layers else 1, 1, bias=False),
                nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
    seq += [nn.Conv2d(channels * mult, 1, 4, 1, 1)]
    return nn.Sequential(*seq).train()  # the discriminator always runs in training mode in LDM


@pytest.mark.torch
def test_matches_taming_nlayer_discriminator_in_training_mode():
    import torch

    layers, channels = 3, 8
    module = NLayerDiscriminator(layers, channels)
    params = init_discriminator(module, jax.random.key(0))
    ref = _torch_reference(torch, layers, channels)
    convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ref if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            conv.weight.copy_(torch.from_numpy(np.array(params[f"conv_{i}"]["kernel"]).transpose(3, 2, 0, 1).copy()))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.array(params[f"conv_{i}"]["bias"])))
        for i, norm in enumerate(norms, start=1):
            norm.weight.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["scale"])))
            norm.bias.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["bias"])))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(module.apply({"params": params}, x))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == theirs.shape == (2, 6, 6, 1)
    assert rel_err(ours, theirs) < 1e-4


def test_init_is_taming_weights_init():
    params = init_discriminator(NLayerDiscriminator(3, 16), jax.random.key(1))
    kernel = np.asarray(params["conv_2"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    scale = np.asarray(params["norm_2"]["scale"])
    assert abs(scale.mean() - 1.0) < 0.02 and 0.01 < scale.std() < 0.03
    assert not np.asarray(params["norm_2"]["bias"]).any() and not np.asarray(params["conv_0"]["bias"]).any()
    assert params["conv_3"]["kernel"].shape == (4, 4, 64, 128) and params["conv_4"]["kernel"].shape[-1] == 1
