"""The Gram-matrix style loss against a direct NumPy computation on torchvision VGG16 features, and the
`loss.style` / `loss.lpips` config keys."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsd.config import load_config
from jaxsd.errors import ConfigError
from jaxsd.losses.lpips import SCALE, SHIFT
from jaxsd.losses.style import gram_matrix, style_loss
from jaxsd.losses.taps import TAPS
from jaxsd.losses.weights import load_vgg16


def _numpy_gram(f: np.ndarray) -> np.ndarray:
    """f [B, C, H, W] (torch layout) → [B, C, C], normalised by C·H·W."""
    b, c, h, w = f.shape
    flat = f.reshape(b, c, h * w).astype(np.float64)
    return flat @ flat.transpose(0, 2, 1) / (c * h * w)


@pytest.mark.torch
def test_style_loss_equals_numpy_on_torchvision_features(torch_vgg16):
    import torch

    tv = torch_vgg16
    params = load_vgg16({k: v.numpy() for k, v in tv.state_dict().items()})
    rng = np.random.default_rng(0)
    x, y = (rng.uniform(-1, 1, (2, 32, 40, 3)).astype(np.float32) for _ in range(2))
    layers, weights = ["relu1_2", "relu3_3", "relu4_3"], [1.0, 0.5, 2.0]

    want = 0.0
    with torch.no_grad():
        for layer, weight in zip(layers, weights):
            fx, fy = (tv.features[: TAPS[layer] + 1](torch.from_numpy(
                ((a - np.array(SHIFT, np.float32)) / np.array(SCALE, np.float32)).transpose(0, 3, 1, 2).copy())).numpy()
                for a in (x, y))
            want += weight * np.mean((_numpy_gram(fx) - _numpy_gram(fy)) ** 2)
    got = jax.jit(style_loss, static_argnums=(3, 4))(params, x, y, tuple(layers), tuple(weights))
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
    assert float(style_loss(params, x, x, ["relu1_2"])) == 0.0


def test_gram_matrix_normalisation():
    f = np.random.default_rng(2).normal(size=(2, 3, 5, 4)).astype(np.float32)  # [B, H, W, C]
    np.testing.assert_allclose(np.asarray(gram_matrix(f)), _numpy_gram(f.transpose(0, 3, 1, 2)), rtol=1e-5)


def test_style_and_lpips_config_keys():
    cfg = load_config("tiny", ["loss.style.layers=[relu2_2,relu5_3]", "loss.style.layer_weights=[1.0,0.25]",
                               "loss.lpips.weights=/w/vgg16.safetensors"])
    assert cfg.loss.style.layers == ["relu2_2", "relu5_3"] and cfg.loss.lpips.weights == "/w/vgg16.safetensors"
    with pytest.raises(ConfigError, match="unknown \\['relu6_1'\\].*relu5_3"):
        load_config("tiny", ["loss.style.layers=[relu6_1]"])
    with pytest.raises(ConfigError, match="2 values for 1"):
        load_config("tiny", ["loss.style.layers=[relu1_2]", "loss.style.layer_weights=[1,2]"])


@pytest.mark.parametrize("key, nearest", [("loss.lpips.weight", "loss.lpips.weights"),
                                          ("loss.style.weight", "loss.style.layer_weights")])
def test_the_sections_have_no_weight_of_their_own(key, nearest):
    """The multipliers are loss.perceptual.* / loss.vae.lpips_weight: `weight` here is an unknown key,
    named with its nearest valid one as any other."""
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean '{nearest}'"):
        load_config("tiny", [f"{key}=0.5"])
