"""The convolution seam: `conv_select`'s decision table, the im2col and taps lowerings against XLA's
convolution (values and both gradients), the `Conv` layer with LoCon adapters, and a tiny UNet forced onto
im2col against diffusers and against the XLA path (outputs and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.errors import InputError
from jaxsd.models import conv_select
from jaxsd.models.conv_select import forced_conv, requested_implementation, select_conv
from jaxsd.models.im2col import conv_im2col, conv_output_hw, conv_taps, conv_xla
from jaxsd.models.layers import Conv
from tests.helpers import rel_err

_SD = {"batch": 1, "kernel_hw": (3, 3), "itemsize": 4}


@pytest.mark.parametrize("platform, kw, expected", [
    ("cpu", {"out_hw": (8, 8), "in_channels": 1280}, "im2col"),       # SD's 8×8 level: the big win
    ("cpu", {"out_hw": (16, 16), "in_channels": 640}, "im2col"),
    ("cpu", {"out_hw": (32, 32), "in_channels": 320}, "taps"),        # im2col neutral there, its kernel grad not
    ("cpu", {"out_hw": (256, 256), "in_channels": 128}, "taps"),      # SD's VAE at 256²
    ("cpu", {"out_hw": (32, 32), "in_channels": 3}, "xla"),           # too few channels
    ("cpu", {"out_hw": (16, 16), "in_channels": 128}, "xla"),         # too few positions (the demo's sizes)
    ("cpu", {"out_hw": (64, 64), "in_channels": 128, "kernel_hw": (1, 1)}, "xla"),
    ("cpu", {"out_hw": (8, 8), "in_channels": 1280, "kernel_hw": (1, 1)}, "xla"),
    ("cpu", {"out_hw": (8, 8), "in_channels": 1280, "dilation": 2}, "xla"),
    ("cpu", {"out_hw": (8, 8), "in_channels": 1280, "groups": 2}, "xla"),
    ("cpu", {"out_hw": (16, 16), "in_channels": 1280, "batch": 64}, "xla"),  # 1.5 GB of patches: too big
    ("gpu", {"out_hw": (8, 8), "in_channels": 1280}, "xla"),
    ("gpu", {"out_hw": (64, 64), "in_channels": 128}, "xla"),
    ("tpu", {"out_hw": (8, 8), "in_channels": 1280}, "xla"),
])
def test_auto_table(platform, kw, expected):
    assert select_conv("auto", platform=platform, **{**_SD, **kw}) == expected


def test_forced_choices_and_their_errors(monkeypatch):
    small = dict(_SD, out_hw=(32, 32), in_channels=4)
    assert select_conv("im2col", platform="gpu", **small) == "im2col"
    assert select_conv("taps", platform="gpu", **small) == "taps"
    assert select_conv("xla", platform="cpu", **{**_SD, "out_hw": (8, 8), "in_channels": 1280}) == "xla"
    with pytest.raises(InputError, match="no dilation or groups"):
        select_conv("im2col", platform="cpu", dilation=2, **small)
    with pytest.raises(InputError, match="taps convolution has no dilation or groups"):
        select_conv("taps", platform="cpu", groups=2, **small)
    monkeypatch.setenv(conv_select.ENV_VAR, "fast")
    with pytest.raises(InputError, match=r"\$JAXSD_CONV: convolution implementation 'fast' unknown"):
        requested_implementation()
    with forced_conv("im2col"):  # the context wins over the variable
        assert requested_implementation() == "im2col"
    monkeypatch.setenv(conv_select.ENV_VAR, "XLA")
    assert requested_implementation() == "xla"
    with pytest.raises(InputError, match="'sometimes' unknown"), forced_conv("sometimes"):
        pass


# (H, W, Cin, Cout, k, stride, padding): SD's resnet conv, the downsampler's stride 2 with diffusers'
# asymmetric (0, 1) padding, an odd-sized input, a 5×5 kernel, a patch-embedding-like unpadded conv, and
# narrow outputs (kh·kw·Cout ≤ Cin: the taps' kernel gradient from shifted dy, as a decoder's conv_out)
CASES = [(8, 8, 16, 8, 3, 1, ((1, 1), (1, 1))), (8, 8, 8, 8, 3, 2, ((0, 1), (0, 1))),
         (9, 7, 4, 6, 3, 2, ((1, 1), (1, 1))), (8, 6, 4, 4, 5, 1, ((2, 2), (2, 2))),
         (6, 6, 3, 5, 2, 2, ((0, 0), (0, 0))), (9, 7, 32, 3, 3, 1, ((1, 1), (1, 1))),
         (8, 6, 16, 2, 2, 1, ((0, 1), (1, 0)))]


@pytest.mark.parametrize("lowering", [conv_im2col, conv_taps])
@pytest.mark.parametrize("h, w, cin, cout, k, stride, pad", CASES)
def test_lowering_equals_xla_conv_and_its_gradients(lowering, h, w, cin, cout, k, stride, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    xla = lambda x, kernel: jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, kernel: lowering(x, kernel, stride, pad)
    dy = jnp.asarray(rng.standard_normal((2, *conv_output_hw((h, w), (k, k), stride, pad), cout)), jnp.float32)
    with_grads = lambda f: jax.jit(lambda x, kernel: (f(x, kernel), *jax.vjp(f, x, kernel)[1](dy)))
    for got, want in zip(with_grads(ours)(x, kernel), with_grads(xla)(x, kernel)):  # output, dx, dkernel
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-6


def test_taps_kernel_gradient_accumulates_in_fp32_and_only_when_trained():
    """bf16 inputs: the kernel gradient is the fp32 sum of the bf16 products, rounded once to bf16 (a bf16
    accumulation over 2·16·16 positions would be off by far more than one rounding); a gradient in the
    input alone has no tap matmuls (a LoRA step's base conv: XLA's input gradient only)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 8)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 4)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.bfloat16)
    pad = ((1, 1), (1, 1))
    dkernel = jax.jit(lambda x, k: jax.vjp(lambda k: conv_taps(x, k, 1, pad), k)[1](dy)[0])(x, kernel)
    exact = jax.vjp(lambda k: conv_xla(x.astype(jnp.float32), k, 1, pad), kernel.astype(jnp.float32))[1](
        dy.astype(jnp.float32))[0]
    assert dkernel.dtype == jnp.bfloat16
    assert rel_err(dkernel, exact) <= 2.0 ** -8  # one bf16 rounding of the exact fp32 sum
    input_grad_only = jax.jit(lambda x: jax.vjp(lambda x: conv_taps(x, kernel, 1, pad), x)[1](dy)[0])
    assert "dot_general" not in input_grad_only.lower(x).as_text()
    assert input_grad_only.lower(x).as_text().count("convolution") == 1


def _conv_ops(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


def test_conv_layer_with_locon_adapter_runs_the_forced_lowering():
    """A stride-2 Conv with a LoCon adapter (its down conv has the base's kernel and stride) gives the
    same output and gradients on both lowerings, and the forced lowering is the one traced."""
    rng = np.random.default_rng(1)
    layer = Conv(8, strides=2, padding=((0, 1), (0, 1)))
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 6)), jnp.float32)
    params = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 6, 8)), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(8), jnp.float32)}
    lora = {"down": jnp.asarray(rng.standard_normal((3, 3, 6, 2)), jnp.float32),
            "up": jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32), "scale": jnp.full((2,), 0.5)}
    dy = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
    apply = lambda p, a, x: layer.apply({"params": p, "lora": a}, x)
    output_and_grads = lambda p, a, x: (apply(p, a, x), jax.grad(lambda *v: jnp.sum(apply(*v) * dy), (0, 1, 2))(p, a, x))
    results = {}
    for name, convs in (("xla", 2), ("im2col", 0), ("taps", 2)):
        with forced_conv(name):
            assert _conv_ops(apply, params, lora, x) == convs
            assert ("custom_vjp_call" in str(jax.make_jaxpr(apply)(params, lora, x))) == (name == "taps")
            results[name] = jax.jit(output_and_grads)(params, lora, x)
    flat = {name: jax.tree.leaves(results[name]) for name in results}
    assert len(flat["xla"]) == 1 + 5 + 1  # output; kernel, bias, down, up, scale; x
    for name in ("im2col", "taps"):
        for ours, ref in zip(flat[name], flat["xla"]):
            assert rel_err(ours, ref) <= 1e-6


@pytest.mark.slow  # ~15 s; the default run has the layer test (values and gradients) and `jaxsd sample` on im2col vs diffusers
@pytest.mark.torch
def test_tiny_unet_on_im2col_matches_diffusers_and_the_xla_path(tmp_path):
    """The sd1-family tiny UNet of test_unet.py with every k×k conv forced onto im2col: output within the
    whole-model tolerance of diffusers, and the input gradient of a fixed loss too (torch autograd); every
    param gradient equal to the XLA path's within fp32 rounding."""
    import torch

    from jaxsd.convert.unet import load_unet
    from jaxsd.models.unet import UNet2DConditionModel
    from tests.models.test_unet import build_diffusers_unet, jax_args, make_inputs

    torch_model = build_diffusers_unet("sd1")
    torch_model.save_pretrained(tmp_path)
    config, params = load_unet(tmp_path)
    inputs = make_inputs("sd1", config, batch=1)
    sample, t, context, added = jax_args(inputs)
    weights = np.random.default_rng(2).standard_normal(sample.shape[:-1] + (config.out_channels,)).astype(np.float32)

    model = UNet2DConditionModel(config)
    output_and_loss = lambda p, s: (jnp.sum((out := model.apply({"params": p}, s, t, context, added)) * weights), out)
    out, grads = {}, {}
    for name in ("xla", "im2col"):
        with forced_conv(name):  # one program each: the output and the gradients of the fixed loss
            grads[name], out[name] = jax.jit(jax.grad(output_and_loss, argnums=(0, 1), has_aux=True))(params, sample)

    sample_t = torch.from_numpy(inputs["sample"]).requires_grad_(True)
    ref = torch_model(sample_t, torch.from_numpy(inputs["timesteps"]), torch.from_numpy(inputs["context"])).sample
    (ref * torch.from_numpy(weights.transpose(0, 3, 1, 2))).sum().backward()
    ref_out, ref_grad = ref.detach().numpy().transpose(0, 2, 3, 1), sample_t.grad.numpy().transpose(0, 2, 3, 1)

    assert rel_err(out["im2col"], ref_out) <= 1e-4
    assert rel_err(out["im2col"], out["xla"]) <= 1e-5
    assert rel_err(grads["im2col"][1], ref_grad) <= 1e-4
    flat = [np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads[name][0])]) for name in ("xla", "im2col")]
    assert np.abs(flat[0]).max() > 0
    assert rel_err(flat[1], flat[0]) <= 1e-5
