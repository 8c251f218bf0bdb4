"""LoRA / LoCon adapters as the "lora" variable collection: target selection, initialisation,
the unmerged low-rank term in Dense/Conv, and the tree helpers (scale, concat, fold, axes).

Blocks, not the whole UNet, keep the compiles small; the UNet is built of these blocks, and
tests/pipelines/test_lora_parity.py checks whole models against diffusers + PEFT.
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from jaxsd.errors import InputError
from jaxsd.models.layers import Conv, Dense
from jaxsd.models.lora import (
    adapted_modules,
    adapter_logical_axes,
    concat_adapters,
    dropout_keys,
    dropout_mask,
    dropout_variables,
    fold_adapters,
    init_adapters,
    plan_adapters,
    scale_adapters,
)
from jaxsd.models.names import torch_module_name
from jaxsd.models.params import abstract_params
from jaxsd.models.resnet import Downsample2D, ResnetBlock2D
from jaxsd.models.transformer import Transformer2DModel
from jaxsd.models.unet import UNet2DConditionModel, example_inputs
from tests.convert.lora_tiny import TINY_SD


@pytest.fixture(scope="module")
def sd_shapes():
    return abstract_params(UNet2DConditionModel(TINY_SD), *example_inputs(TINY_SD))


def _names(plan) -> set[str]:
    return {torch_module_name(p) for p in plan}


def test_presets_select_diffusers_module_names(sd_shapes):
    shapes, _ = sd_shapes
    attn = _names(plan_adapters(shapes, "attn", 4, 4))
    # 4 transformers (down 0, mid, up 1 x 2), each with attn1/attn2 x q/k/v/out
    transformers = ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
                    "up_blocks.1.attentions.1")
    assert len(attn) == 4 * 2 * 4
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in attn
    assert all(re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n) for n in attn)
    attn_ff = _names(plan_adapters(shapes, "attn_ff", 4, 4))
    assert attn_ff - attn == {f"{t}.{leaf}" for t in transformers
                              for leaf in ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                                           "proj_in", "proj_out")}
    linear = _names(plan_adapters(shapes, "all_linear", 4, 4))
    assert {"time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"} <= linear
    assert attn_ff < linear and not any("conv_shortcut" in n or n.endswith(("conv1", "conv2")) for n in linear)


def test_locon_adds_resnet_and_resampler_convs_with_their_own_rank(sd_shapes):
    shapes, _ = sd_shapes
    plan = plan_adapters(shapes, "attn", 4, 8, conv_rank=2, conv_alpha=1)
    convs = {torch_module_name(p): s for p, s in plan.items() if s.rank == 2}
    assert "down_blocks.0.downsamplers.0.conv" in convs and "up_blocks.0.upsamplers.0.conv" in convs
    assert "up_blocks.0.resnets.0.conv_shortcut" in convs and "mid_block.resnets.1.conv2" in convs
    assert "conv_in" not in convs and "conv_out" not in convs
    assert all(s.alpha == 1.0 and s.is_conv for s in convs.values())
    assert all(s.alpha == 8.0 and s.rank == 4 for n, s in plan.items() if torch_module_name(n) not in convs)


def test_targets_errors_name_the_problem(sd_shapes):
    shapes, _ = sd_shapes
    with pytest.raises(InputError, match="not a preset.*attn_ff"):
        plan_adapters(shapes, "attention", 4, 4)
    with pytest.raises(InputError, match="bad regex"):
        plan_adapters(shapes, ["to_q("], 4, 4)
    with pytest.raises(InputError, match="match none of the .* layers"):
        plan_adapters(shapes, [r"nonexistent$"], 4, 4)


def test_init_is_peft_and_up_is_zero(blocks):
    params, _ = blocks
    some = [r"attn1\.to_q$", r"proj_in$", r"ff\.net\.0\.proj$"]
    ad = init_adapters(params, some, 8, 4, jax.random.key(0), conv_rank=4, conv_alpha=8)
    kernels = traverse_util.flatten_dict(params)
    downs = []
    for path, value in traverse_util.flatten_dict(ad).items():
        kernel = kernels[path[:-1] + ("kernel",)].shape
        if path[-1] == "up":
            assert value.shape == (1,) * (len(kernel) - 2) + (value.shape[-2], kernel[-1])
            assert not np.any(np.asarray(value))
        elif path[-1] == "down":
            assert value.shape == kernel[:-1] + (value.shape[-1],)
            bound = 1 / math.sqrt(math.prod(kernel[:-1]))  # PEFT: kaiming-uniform(a=sqrt(5)) = U(±1/sqrt(fan_in))
            assert float(jnp.abs(value).max()) <= bound
            downs.append(np.ravel(value) / bound)
        else:
            assert value.dtype == jnp.float32 and float(value[0]) in (4 / 8, 8 / 4)
    u = np.concatenate(downs)
    assert abs(u.std() - 1 / math.sqrt(3)) < 0.02 and abs(u.mean()) < 0.02  # uniform on [-1, 1]
    gauss = init_adapters(params, some, 8, 8, jax.random.key(1), init="gaussian", conv_rank=8)
    g = np.concatenate([np.ravel(v) for p, v in traverse_util.flatten_dict(gauss).items() if p[-1] == "down"])
    assert abs(g.std() - 1 / 8) < 0.005 and abs(g.mean()) < 0.005  # PEFT's "gaussian": N(0, (1/r)^2)
    with pytest.raises(InputError, match="init 'xavier'"):
        init_adapters(params, "attn", 8, 8, jax.random.key(1), init="xavier")


def test_adapter_logical_axes_follow_the_kernels(sd_shapes):
    shapes, specs = sd_shapes
    ad = jax.eval_shape(lambda k: init_adapters(shapes, "attn_ff", 4, 4, k, conv_rank=2), jax.random.key(0))
    axes = traverse_util.flatten_dict(adapter_logical_axes(specs, ad), is_leaf=lambda _, v: isinstance(v, PartitionSpec))
    q = ("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
    assert axes[q + ("down",)] == PartitionSpec("embed", None) and axes[q + ("up",)] == PartitionSpec(None, "heads")
    conv = ("down_blocks_0", "resnets_0", "conv1")
    assert axes[conv + ("down",)] == PartitionSpec(None, None, "conv_in", None)
    assert axes[conv + ("up",)] == PartitionSpec(None, None, None, "conv_out") and axes[conv + ("scale",)] == PartitionSpec(None)


class _Blocks(nn.Module):
    """A resnet with a conv shortcut, SD1- and SD2-style transformers (1x1-conv and linear proj_in/out)
    and a downsampler: every kind of layer the UNet adapts."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = ResnetBlock2D(16, groups=4, name="resnets_0")(x, temb)
        x = Transformer2DModel(2, 8, norm_num_groups=4, name="attentions_0")(x, context)
        x = Transformer2DModel(2, 8, norm_num_groups=4, use_linear_projection=True, name="attentions_1")(x, context)
        return Downsample2D(16, name="downsamplers_0")(x)


@pytest.fixture(scope="module")
def blocks():
    # random params and inputs from numpy (flax's init would compile a random op per param: slow)
    rng = np.random.default_rng(0)
    inputs = tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((2, 6, 6, 8), (2, 12), (2, 5, 8)))
    module = _Blocks()
    shapes, _ = abstract_params(module, *inputs)
    params = traverse_util.unflatten_dict({
        p: jnp.asarray((1.0 if p[-1] == "scale" else 0.0) + 0.3 * rng.standard_normal(v.shape), jnp.float32)
        for p, v in traverse_util.flatten_dict(shapes).items()})
    apply = jax.jit(lambda variables: module.apply(variables, *inputs))
    return params, apply


def _random_up(adapters, seed):
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(adapters)
    return traverse_util.unflatten_dict({
        p: (jnp.asarray(0.2 * rng.standard_normal(v.shape), jnp.float32) if p[-1] == "up" else v)
        for p, v in sorted(flat.items())})


def test_step0_is_bitwise_the_base_and_trained_adapters_equal_their_merged_weights(blocks):
    params, apply = blocks
    ad = init_adapters(params, "all_linear", 4, 8, jax.random.key(3), conv_rank=2, conv_alpha=3)
    # 2 transformers x (proj_in, q/k/v/out x 2, ff x 2, proj_out), time_emb_proj, 3 resnet convs, the downsampler
    assert len(adapted_modules(ad)) == 2 * 12 + 1 + 3 + 1
    base = apply({"params": params})
    assert np.array_equal(np.asarray(apply({"params": params, "lora": ad})), np.asarray(base))

    trained = _random_up(ad, 4)
    out = apply({"params": params, "lora": trained})
    fold = jax.jit(fold_adapters)
    merged = apply({"params": fold(params, trained)})
    assert float(jnp.abs(out - base).max()) > 0.1  # the adapters matter
    np.testing.assert_allclose(out, merged, rtol=0, atol=2e-5 * float(jnp.abs(out).max()))

    # scale 0 is the base again; scale is linear in the adapter's contribution
    np.testing.assert_allclose(apply({"params": params, "lora": scale_adapters(trained, 0.0)}), base, atol=1e-6)
    # two LoRAs at once = their ranks concatenated = the sum of both deltas (to first order in
    # each: check on merged weights, where it is exact)
    other = _random_up(ad, 5)
    both = concat_adapters([trained, other])
    assert both["resnets_0"]["conv1"]["down"].shape[-1] == 4 and both["resnets_0"]["conv1"]["scale"].shape == (4,)
    both_merged = fold(fold(params, trained), other)
    np.testing.assert_allclose(apply({"params": fold(params, both)}), apply({"params": both_merged}),
                               atol=1e-5 * float(jnp.abs(out).max()))


class _ThreeLayers(nn.Module):
    """Two Dense layers and a 3x3 Conv reading the same input."""

    @nn.compact
    def __call__(self, x):
        return Dense(8, name="a")(x), Dense(8, name="b")(x), Conv(8, name="c")(x)


def _probe_variables(params, seed=None):
    """Adapters on a, b, c: identity down/up, scale 1 (the term is then exactly the adapter's input),
    or random ones for `seed`."""
    rng = np.random.default_rng(seed)
    eye = np.eye(8, dtype=np.float32)
    center = np.zeros((3, 3, 8, 8), np.float32)
    center[1, 1] = eye  # a 3x3 conv with padding 1 that copies its input
    lora = {}
    for name, down, up in (("a", eye, eye), ("b", eye, eye), ("c", center, eye[None, None])):
        if seed is not None:
            down, up = (rng.standard_normal(v.shape).astype(np.float32) for v in (down, up))
        lora[name] = {"down": jnp.asarray(down), "up": jnp.asarray(up),
                      "scale": jnp.full((8,), 0.5 if seed is not None else 1.0, jnp.float32)}
    return {"params": params, "lora": lora}


def test_adapter_dropout_masks_the_adapter_input_per_sample_and_layer():
    module, p = _ThreeLayers(), 0.3
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4, 4, 8)), jnp.float32)
    shapes, _ = abstract_params(module, x)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # base layers output 0
    keys = dropout_keys(jax.random.key(7), 4)
    apply = jax.jit(module.apply)  # two programs: without and with the "lora_dropout" collection

    def dropped(variables, rate=p):
        return apply({**variables, "lora_dropout": dropout_variables([("a",), ("b",), ("c",)], keys, rate)}, x)

    assert all(np.array_equal(o, x) for o in apply(_probe_variables(zero), x))  # each output = the adapter input
    masks = []
    for out in dropped(_probe_variables(zero)):
        keep = np.asarray(out) != 0
        # PEFT's lora_dropout (torch.nn.Dropout): zeros, the rest scaled by 1 / (1 - p)
        np.testing.assert_array_equal(out, np.where(keep, x * np.float32(1 / (1 - p)), 0))
        assert abs(1 - keep.mean() - p) < 0.06, keep.mean()
        masks.append(keep)
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])  # per layer
    assert not np.array_equal(masks[0][0], masks[0][1])  # per sample
    # a sample's mask does not depend on the rest of the batch: micro-batches see the batch's masks
    np.testing.assert_array_equal(dropout_mask(keys[1:3], p, "a", (4, 4, 8)), masks[0][1:3])

    # real adapters on a real base: base(x) + (((mask · x / (1 - p)) @ down) · scale) @ up, by hand
    params = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(1).standard_normal(s.shape), s.dtype), shapes)
    variables = _probe_variables(params, seed=2)
    no_up = {**variables, "lora": {n: {**ad, "up": jnp.zeros_like(ad["up"])} for n, ad in variables["lora"].items()}}
    base = apply(no_up, x)  # up = 0: exactly the base layers
    for out, b, keep, name in zip(dropped(variables), base, masks, "abc"):
        ad = variables["lora"][name]
        h = np.where(keep, np.asarray(x) / (1 - p), 0)
        if name == "c":
            h = jax.lax.conv_general_dilated(jnp.asarray(h, jnp.float32), ad["down"], (1, 1), ((1, 1),) * 2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            h = h @ np.asarray(ad["down"], np.float64)
        expected = np.asarray(b, np.float64) + (np.asarray(h, np.float64) * 0.5) @ np.asarray(ad["up"]).reshape(8, 8)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # rate 0: bit for bit the layers without dropout
    assert all(np.array_equal(a, b) for a, b in zip(dropped(variables, rate=0.0), apply(variables, x)))
