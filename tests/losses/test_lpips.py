"""LPIPS and VGG16 features against the `lpips` package and torchvision, on a random VGG16 backbone
saved in torchvision's key layout and the real LPIPS v0.1 heads the package ships."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.errors import InputError, InputNotFoundError
from jaxsd.losses.lpips import LPIPS, scale_input
from jaxsd.losses.taps import TAPS
from jaxsd.losses.vgg import VGG16Features
from jaxsd.losses.weights import (
    installed_heads,
    load_lpips,
    load_vgg16,
    lpips_states,
    save_lpips_safetensors,
)
from tests.reference_packages import reference_packages

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def refs(torch_vgg16, vgg16_pth):
    """(torchvision VGG16 (random), lpips.LPIPS with that backbone and the shipped heads, backbone .pth, heads .pth
    as installed_heads() finds it with the package importable)."""
    with reference_packages():
        ref = importlib.import_module("lpips").LPIPS(net="vgg", pnet_rand=True, verbose=False)
        found = installed_heads()
    for k in range(1, 6):  # the random backbone's weights into lpips' own (differently seeded) trunk
        for name, module in getattr(ref.net, f"slice{k}").named_children():
            module.load_state_dict(torch_vgg16.features[int(name)].state_dict())
    return torch_vgg16, ref, vgg16_pth, found


@pytest.fixture(scope="module")
def params(refs):
    _, _, backbone, heads = refs
    return load_lpips(backbone, heads, allow_pickle=True)


def _images(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(2))


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_installed_heads_found_in_the_package(refs):
    assert refs[3] is not None and refs[3].parts[-3:] == ("weights", "v0.1", "vgg.pth")


def test_vgg_features_equal_torchvision(refs, params):
    import torch

    tv = refs[0]
    state = {k: v.numpy() for k, v in tv.state_dict().items()}  # with the classifier, which is ignored
    vgg_params = load_vgg16(state)
    x = np.random.default_rng(0).normal(size=(2, 40, 56, 3)).astype(np.float32)
    got = jax.jit(VGG16Features().apply)({"params": vgg_params}, x)
    with torch.no_grad():
        for tap, index in TAPS.items():
            want = tv.features[: index + 1](_nchw(x)).numpy().transpose(0, 2, 3, 1)
            assert got[tap].shape == want.shape, tap
            err = np.abs(np.asarray(got[tap]) - want).max() / np.abs(want).max()
            assert err <= 1e-4, (tap, err)
    jax.tree.map(np.testing.assert_array_equal, vgg_params, params["vgg"])  # .pth and in-memory load agree


@pytest.mark.parametrize("size", [(32, 32), pytest.param((24, 40), marks=pytest.mark.slow)])  # a compile each
def test_lpips_and_its_input_gradient_equal_the_package(refs, params, size):
    ref = refs[1]
    x0, x1 = _images(sum(size), (3, *size, 3))
    x1[2] = x0[2]  # an identical pair: distance exactly 0

    def total(a, b, p):  # params as an argument: as constants they would be folded into the program
        value, terms = LPIPS().apply({"params": p}, a, b, per_layer=True)
        return value.sum(), (value, terms)

    (_, (value, terms)), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(x0, x1, params)
    t0 = _nchw(x0).requires_grad_(True)
    want = ref(t0, _nchw(x1))
    want.sum().backward()
    want_grad = t0.grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(value), want.detach().numpy().reshape(-1), rtol=1e-4, atol=1e-6)
    err = np.abs(np.asarray(grad) - want_grad).max() / np.abs(want_grad).max()
    assert err <= 1e-4, err
    assert list(terms) == list(TAPS)
    np.testing.assert_allclose(np.asarray(sum(terms.values())), np.asarray(value), rtol=1e-6)
    assert float(value[2]) == 0.0


def test_one_safetensors_file_loads_without_pickle(refs, params, tmp_path):
    _, _, backbone, heads = refs
    out = save_lpips_safetensors(backbone, heads, tmp_path / "lpips_vgg.safetensors", allow_pickle=True)
    again = load_lpips(out)  # no heads path, no pickle
    jax.tree.map(np.testing.assert_array_equal, params, again)


def test_missing_and_refused_weights_say_what_and_where(refs, tmp_path, monkeypatch):
    _, _, backbone, heads = refs
    with pytest.raises(InputNotFoundError) as e:
        load_lpips(None)
    msg = str(e.value)
    assert "loss.lpips.weights" in msg and "vgg16-397923af.pth" in msg and "~/.cache/torch/hub/checkpoints" in msg
    assert "loss.lpips.heads" in msg and "weights/v0.1/vgg.pth" in msg
    with pytest.raises(InputError, match="pickle.*allow_pickle"):
        load_lpips(backbone, heads)
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_lpips(tmp_path / "nope.safetensors", heads)
    # a backbone-only safetensors, no heads path, and no lpips package
    from jaxsd.convert.safetensors_io import save_file

    features_only = tmp_path / "vgg16.safetensors"
    save_file({k: np.asarray(v) for k, v in lpips_states(backbone, heads, allow_pickle=True)[0].items()}, features_only)
    monkeypatch.setattr("jaxsd.losses.weights.installed_heads", lambda: None)  # as where no lpips is installed
    with pytest.raises(InputNotFoundError, match="heads missing.*weights/v0.1/vgg.pth"):
        load_lpips(features_only)
    with pytest.raises(InputError, match="does not match the model"):  # heads given as the backbone
        load_lpips(heads, features_only, allow_pickle=True)


def test_scale_input_is_lpips_scaling_layer(refs):
    x = _images(7, (1, 4, 4, 3))[0]
    want = refs[1].scaling_layer(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(scale_input(jnp.asarray(x))), want, rtol=1e-6, atol=1e-7)
