"""The PatchGAN discriminator against taming-transformers' NLayerDiscriminator, rebuilt in PyTorch from its
definition (bench/torch_discriminator.py: conv 4×4, LeakyReLU 0.2, BatchNorm2d in training mode), with our
weights converted in by `flax_to_torch`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsd.models.discriminator import NLayerDiscriminator, init_discriminator
from tests.helpers import rel_err


@pytest.mark.torch
def test_matches_taming_nlayer_discriminator_in_training_mode():
    import torch

    from bench.torch_discriminator import from_jaxsd

    layers, channels = 3, 8
    module = NLayerDiscriminator(layers, channels)
    params = init_discriminator(module, jax.random.key(0))
    ref = from_jaxsd(params, layers, channels)
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
