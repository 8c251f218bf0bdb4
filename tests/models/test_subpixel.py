"""A nearest 2× upsampling + 3×3 conv as four 2×2 convs at the input's resolution (`jaxsd.models.subpixel`):
equal to upsampling then convolving (values and both gradients), and where `conv_select` runs it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models.conv_select import forced_conv, select_upsample
from jaxsd.models.im2col import conv_xla
from jaxsd.models.resnet import Upsample2D
from jaxsd.models.subpixel import upsample2x_conv3x3
from tests.helpers import rel_err


def test_select_upsample_table():
    assert select_upsample("auto", platform="cpu") == "subpixel"
    assert select_upsample("taps", platform="cpu") == "subpixel"
    assert select_upsample("xla", platform="cpu") == "repeat"  # forced plain XLA: diffusers' order
    for platform in ("gpu", "tpu"):
        assert select_upsample("auto", platform=platform) == "repeat"


def _upsampled_conv(x, kernel):
    return conv_xla(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), kernel, 1, ((1, 1), (1, 1)))


@pytest.mark.parametrize("h, w, cin, cout", [(5, 7, 6, 4), (1, 1, 3, 2), (8, 8, 16, 16)])
def test_subpixel_equals_upsample_then_conv(h, w, cin, cout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((2, 2 * h, 2 * w, cout)), jnp.float32)
    ours = lambda x, k: upsample2x_conv3x3(x, k, lambda x, k, pad: conv_xla(x, k, 1, pad))
    with_grads = lambda f: jax.jit(lambda x, k: (f(x, k), *jax.vjp(f, x, k)[1](dy)))
    for got, want in zip(with_grads(ours)(x, kernel), with_grads(_upsampled_conv)(x, kernel)):  # y, dx, dkernel
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-6


def test_upsample2d_runs_subpixel_on_cpu_auto_and_matches_the_xla_path():
    """diffusers' Upsample2D: `auto` on CPU traces four convs at the input's size and no upsampled copy; its
    output and every gradient equal the forced-XLA path's (upsample, then one conv)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 6, 4, 8)), jnp.float32)
    module = Upsample2D(8)
    params = module.init(jax.random.key(0), x)
    dy = jnp.asarray(rng.standard_normal((1, 12, 8, 8)), jnp.float32)
    results = {}
    for name in ("xla", "auto"):
        with forced_conv(name):
            jaxpr = str(jax.make_jaxpr(lambda p, x: module.apply(p, x))(params, x))
            assert jaxpr.count("conv_general_dilated") == (4 if name == "auto" else 1)
            results[name] = jax.jit(lambda p, x: (module.apply(p, x), *jax.vjp(module.apply, p, x)[1](dy)))(params, x)
    for got, want in zip(jax.tree.leaves(results["auto"]), jax.tree.leaves(results["xla"])):
        assert rel_err(got, want) <= 1e-6
