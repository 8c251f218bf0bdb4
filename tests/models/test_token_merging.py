"""Token merging (ToMe for SD) in the UNet vs the `tomesd` package patched onto the same diffusers UNet.

tomesd's deterministic dst choice (`use_rand=False`) is the reference; merging happens at
the full-resolution level (and the half-resolution one with max_downsample=2), where each
check also asserts that merging changed the output by far more than the tolerance.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxsd.errors import InputError
from jaxsd.models.token_merging import TokenMerging
from jaxsd.models.unet import UNet2DConditionModel
from tests.helpers import rel_err
from tests.models.test_unet import build_diffusers_unet, jax_args, make_inputs, torch_forward

# (family, settings): sd1 at 16x16 with tomesd's defaults; sd2 at 15x13 (cells cut at the edges,
# sx != sy) merging every sub-layer at the two finest levels (slow: a second UNet to build and compile)
CASES = {
    "sd1-defaults": ("sd1", TokenMerging(ratio=0.5, use_rand=False)),
    "sd2-all-layers": ("sd2", TokenMerging(ratio=0.4, max_downsample=2, sx=2, sy=3, use_rand=False,
                                           merge_crossattn=True, merge_mlp=True)),
}


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    """family -> (diffusers model, config, params, inputs, jaxsd output without merging), built on first use."""
    pytest.importorskip("tomesd")
    import torch

    from jaxsd.convert.unet import load_unet

    torch.set_num_threads(1)
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build_diffusers_unet(family)
            folder = tmp_path_factory.mktemp(f"tome_{family}")
            model.save_pretrained(folder)
            config, params = load_unet(folder)
            inputs = make_inputs(family, config)
            plain = np.asarray(jax.jit(UNet2DConditionModel(config).apply)({"params": params}, *jax_args(inputs)))
            cache[family] = (model, config, params, inputs, plain)
        return cache[family]

    return get


def _tomesd_forward(model, inputs, tm: TokenMerging) -> np.ndarray:
    import tomesd

    tomesd.apply_patch(model, **dataclasses.asdict(tm))
    try:
        return torch_forward(model, inputs)
    finally:
        tomesd.remove_patch(model)


@pytest.mark.torch
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "sd2-all-layers" else c
                                  for c in CASES])
def test_unet_with_token_merging_matches_tomesd(units, case):
    family, tm = CASES[case]
    model, config, params, inputs, plain = units(family)
    ref = _tomesd_forward(model, inputs, tm)
    ours = np.asarray(jax.jit(UNet2DConditionModel(config, token_merging=tm).apply)({"params": params},
                                                                                       *jax_args(inputs)))
    assert rel_err(ref, plain) > 1e-2, "tomesd merged nothing: the case does not test merging"
    assert rel_err(ours, ref) <= 1e-4, case


@pytest.mark.torch
def test_ratio_zero_is_bit_identical_and_random_dst_differs(units):
    _, config, params, inputs, plain = units("sd1")
    args = jax_args(inputs)
    apply = lambda tm: np.asarray(jax.jit(UNet2DConditionModel(config, token_merging=tm).apply)(
        {"params": params}, *args))
    assert np.array_equal(apply(TokenMerging(ratio=0.0)), plain)
    fixed = apply(TokenMerging(ratio=0.5, use_rand=False))
    # an even batch draws each cell's dst token: another merge than the top-left one
    assert rel_err(apply(TokenMerging(ratio=0.5, use_rand=True)), fixed) > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0.8}, r"ratio=0.8 must be in \[0, 0.75\]"),
    ({"sx": 0}, "strides must be >= 1"),
    ({"max_downsample": 0}, "max_downsample=0 must be >= 1"),
])
def test_bad_settings_are_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        TokenMerging(**kwargs)
