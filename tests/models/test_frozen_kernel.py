"""A frozen bf16 base on CPU (jaxsd/models/frozen_kernel.py): the custom backward computes autodiff's
gradients, and it is what frees the step's fp32 kernel copies (XLA's memory analysis)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models import frozen_kernel, layers
from jaxsd.models.conv_select import forced_conv
from jaxsd.models.frozen_kernel import use_frozen_kernel_op, widen_bf16
from jaxsd.models.layers import Conv, Dense
from jaxsd.train.compile import train_step_compiler_options


@pytest.mark.parametrize("platform, dtype, frozen, expected", [
    ("cpu", jnp.bfloat16, True, True),
    ("cpu", jnp.bfloat16, False, False),   # a trained kernel: full fine-tuning keeps autodiff's backward
    ("cpu", jnp.float32, True, False),     # no copy to free
    ("cpu", jnp.float16, True, False),     # widening by shift is bf16's
    ("gpu", jnp.bfloat16, True, False),    # computes in bf16, no copy
    ("tpu", jnp.bfloat16, True, False),
])
def test_decision_table(platform, dtype, frozen, expected):
    assert use_frozen_kernel_op(platform=platform, kernel_dtype=dtype, frozen=frozen) is expected


def test_widen_bf16_is_the_convert_bit_for_bit():
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -3e-39, 3.3895e38, 1.0, -2.5], np.float32)
    values = np.concatenate([special, np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100])
    k = jnp.asarray(values).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(widen_bf16(k)).view(np.uint32),
                                  np.asarray(k.astype(jnp.float32)).view(np.uint32))


class _Layers(nn.Module):
    """Dense -> 3x3 Conv -> Dense on NHWC input, in `dtype`."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Dense(16, dtype=self.dtype, name="a")(x)
        x = Conv(16, dtype=self.dtype, name="c")(jnp.tanh(x))
        return Dense(8, dtype=self.dtype, name="b")(jnp.tanh(x))


def _variables(model, x):
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init(jax.random.key(0), x)["params"])
    rng = np.random.default_rng(1)
    lora = {}
    for name, (kin, kout), conv in (("a", (8, 16), False), ("c", (16, 16), True), ("b", (16, 8), False)):
        down = rng.standard_normal(((3, 3) if conv else ()) + (kin, 4)).astype(np.float32) * 0.3
        up = rng.standard_normal(((1, 1) if conv else ()) + (4, kout)).astype(np.float32) * 0.3
        lora[name] = {"down": jnp.asarray(down), "up": jnp.asarray(up), "scale": jnp.full((4,), 0.5, jnp.float32)}
    return params, lora


@pytest.mark.parametrize("dtype, conv", [(jnp.float32, "xla"), (jnp.float32, "im2col"), (jnp.bfloat16, "xla")])
def test_outputs_and_gradients_equal_autodiffs(monkeypatch, dtype, conv):
    """bf16 base with adapters: the output, the adapters' and the input's gradients equal autodiff's
    (the plain path), and so does the base kernels' gradient, were anyone to take it. fp32 compute:
    within fp32 rounding; bf16 compute: within bf16 rounding (each side rounds its fp32 results to bf16
    at other points of the backward pass)."""
    model = _Layers(dtype)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 8)), jnp.float32)
    params, lora = _variables(model, x)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 6, 8)), jnp.float32)

    def loss(params, lora, x):
        out = model.apply({"params": params, "lora": lora}, x)
        return jnp.sum(out.astype(jnp.float32) * w), out

    results = {}
    for name, chosen in (("seam", frozen_kernel.use_frozen_kernel_op), ("plain", lambda **_: False)):
        monkeypatch.setattr(layers, "use_frozen_kernel_op", chosen)
        with forced_conv(conv):
            results[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, lora, x)
    (grads, out), (ref_grads, ref_out) = results["seam"], results["plain"]
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out, np.float32))
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.abs(r).max() > 0
        np.testing.assert_allclose(g, r, rtol=0, atol=tol * np.abs(r).max())


def test_the_backward_no_longer_keeps_every_fp32_copy(monkeypatch):
    """Eight frozen bf16 [512, 512] kernels, fp32 compute, adapters trained: autodiff's program holds an fp32
    copy (1 MiB) of every kernel at its peak; with the seam about one at a time (XLA's memory analysis). Compiled
    as the trainer compiles: XLA's default scheduler would run every widening early (worse than autodiff)."""
    n, d = 8, 512

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(n):
                x = jnp.tanh(Dense(d, name=f"l{i}")(x))
            return x

    model = Stack()
    x = jax.ShapeDtypeStruct((64, d), jnp.float32)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16),
                          jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    lora = {f"l{i}": {"down": jax.ShapeDtypeStruct((d, 4), jnp.float32), "up": jax.ShapeDtypeStruct((4, d), jnp.float32),
                      "scale": jax.ShapeDtypeStruct((4,), jnp.float32)} for i in range(n)}
    options, temp = train_step_compiler_options(), {}
    for name, chosen in (("seam", frozen_kernel.use_frozen_kernel_op), ("plain", lambda **_: False)):
        monkeypatch.setattr(layers, "use_frozen_kernel_op", chosen)
        # a new function each time: jit's cache would hand back the program traced with the other choice
        grad = jax.grad(lambda lora, params, x: jnp.sum(model.apply({"params": params, "lora": lora}, x)))
        temp[name] = jax.jit(grad).lower(lora, params, x).compile(options).memory_analysis().temp_size_in_bytes
    copy = d * d * 4
    assert temp["plain"] >= n * copy
    assert temp["seam"] <= temp["plain"] - (n - 3) * copy  # measured: 2.9 vs 8.1 MiB


@pytest.mark.slow  # two compiles of a tiny UNet's gradient; the default run has the layers' test above
def test_tiny_unet_lora_step_equals_autodiffs(monkeypatch):
    """A tiny SD UNet with a bf16 base, attention LoRA and LoCon, fp32 compute: the output and every adapter
    gradient of a fixed loss equal the plain path's within fp32 rounding (the whole-model tolerance's
    simple-layer bound, 1e-5 relative)."""
    from jaxsd.models.lora import init_adapters
    from jaxsd.models.unet import UNet2DConditionModel, example_inputs
    from tests.convert.lora_tiny import TINY_SD
    from tests.helpers import rel_err

    model = UNet2DConditionModel(TINY_SD)
    inputs = example_inputs(TINY_SD)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), nn.meta.unbox(model.init(jax.random.key(0), *inputs)["params"]))
    adapters = init_adapters(params, "attn", 4, 4, jax.random.key(1), conv_rank=2, conv_alpha=2)
    adapters = jax.tree_util.tree_map_with_path(  # nonzero up: every adapter's down gets a gradient
        lambda p, v: 0.1 * jax.random.normal(jax.random.key(len(str(p))), v.shape) if p[-1].key == "up" else v,
        adapters)

    def loss(adapters):
        out = model.apply({"params": params, "lora": adapters}, *inputs)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    results = {}
    for name, chosen in (("seam", frozen_kernel.use_frozen_kernel_op), ("plain", lambda **_: False)):
        monkeypatch.setattr(layers, "use_frozen_kernel_op", chosen)
        results[name] = jax.jit(jax.grad(lambda a: loss(a), has_aux=True))(adapters)  # a new function: no cache hit
    (grads, out), (ref_grads, ref_out) = results["seam"], results["plain"]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    flat = [np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads, ref_grads)]
    assert np.abs(flat[1]).max() > 0
    assert rel_err(flat[0], flat[1]) <= 1e-5
