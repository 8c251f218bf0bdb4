"""`model.segmented_backward`: each UNet block finishes its weight gradients in its own backward pass.

The gradients are the plain ones (fp32, full remat, weights and LoRA adapters), the cotangent a block hands
on really depends on its weight gradients (what keeps XLA from computing them late), and `jaxsd train`
runs with the key. What it saves is measured by `jaxsd bench memory` (docs/benchmarks.md).
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models.lora import init_adapters
from jaxsd.models.segmented_backward import call_segmented
from jaxsd.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers import jaxsd_command, rel_err

TINY = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=8,
                  cross_attention_dim=32, norm_num_groups=8)


def _inputs(batch: int = 2, size: int = 8):
    k = jax.random.split(jax.random.key(1), 3)
    return (jax.random.normal(k[0], (batch, size, size, 4)), jnp.array([10, 700]),
            jax.random.normal(k[1], (batch, 6, 32)), jax.random.normal(k[2], (batch, size, size, 4)))


def _grads(segmented: str | None, variables: dict, wrt: str):
    model = UNet2DConditionModel(TINY, remat_policy="full", segmented_backward=segmented)
    sample, t, context, target = _inputs()

    def loss(trained, sample, context):
        out = model.apply({**variables, wrt: trained}, sample, t, context)
        return jnp.mean((out - target) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(variables[wrt], sample, context)


@pytest.mark.slow  # two compiles of a UNet's backward pass (~20 s); the default run keeps the CLI run and the dependency check
def test_unet_gradients_are_the_plain_ones():
    sample, t, context, _ = _inputs()
    params = nn.meta.unbox(UNet2DConditionModel(TINY).init(jax.random.key(0), sample, t, context)["params"])
    plain, segmented = _grads(None, {"params": params}, "params"), _grads("params", {"params": params}, "params")
    assert len(jax.tree.leaves(plain[0])) > 100
    for a, b in zip(jax.tree.leaves(segmented), jax.tree.leaves(plain), strict=True):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.slow
def test_lora_gradients_are_the_plain_ones():
    """A LoRA run differentiates the adapters ("lora"), and ResNet blocks without adapters have none."""
    sample, t, context, _ = _inputs()
    params = nn.meta.unbox(UNet2DConditionModel(TINY).init(jax.random.key(0), sample, t, context)["params"])
    adapters = init_adapters(params, "attn", 4, 4, jax.random.key(2))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # up ≠ 0: the base's gradients reach the downs
    variables = {"params": params, "lora": adapters}
    plain, segmented = _grads(None, variables, "lora"), _grads("lora", variables, "lora")
    for a, b in zip(jax.tree.leaves(segmented), jax.tree.leaves(plain), strict=True):
        assert rel_err(a, b) <= 1e-6


@jax.custom_vjp
def _nan_gradient(p):
    return p * 0.0


_nan_gradient.defvjp(lambda p: (p * 0.0, None), lambda _, g: (jnp.full_like(g, jnp.nan),))


class _Block(nn.Module):
    """x + w·x, plus a param whose gradient is NaN while the input's is not."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, ())
        odd = self.param("odd", nn.initializers.ones, ())
        return x + w * x + _nan_gradient(odd)


def test_the_input_cotangent_waits_for_the_block_weight_gradients():
    """The dependency is real data flow (XLA:CPU drops optimization barriers): a block whose weight
    gradient is NaN hands on a NaN input cotangent, so the earlier block's gradients are NaN too."""

    class Two(nn.Module):
        segmented: bool

        @nn.compact
        def __call__(self, x):
            first = nn.Dense(3, name="first")(x)
            second = _Block(name="second")
            return second(first) if not self.segmented else call_segmented(second, first)

    x = jnp.ones((2, 3))
    params = Two(False).init(jax.random.key(0), x)["params"]
    for segmented in (False, True):
        model = Two(segmented)
        grads = jax.grad(lambda p, model=model: jnp.sum(model.apply({"params": p}, x)))(params)
        assert np.isnan(grads["second"]["odd"])
        # segmented: the block's gradients also wait for each other (below), so w's is NaN too
        assert np.isnan(grads["second"]["w"]) == segmented, segmented
        assert np.all(np.isnan(grads["first"]["kernel"])) == segmented, segmented


def test_the_weight_gradients_wait_for_the_input_cotangent():
    """A block whose input cotangent is NaN while its weight gradient is not: segmented, the weight gradient
    is NaN too — it really depends on the cotangent (which reads the weight), so the update comes after it."""

    class Poisoned(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.ones, ())
            return w * x + _nan_gradient(x)

    class One(nn.Module):
        segmented: bool

        @nn.compact
        def __call__(self, x):
            block = Poisoned(name="block")
            return call_segmented(block, x) if self.segmented else block(x)

    x = jnp.ones((2, 3))
    params = One(False).init(jax.random.key(0), x)["params"]
    for segmented in (False, True):
        model = One(segmented)
        g = jax.grad(lambda p, model=model: jnp.sum(model.apply({"params": p}, x)))(params)
        assert np.isnan(g["block"]["w"]) == segmented, segmented


def test_an_in_place_update_keeps_no_weight_copies():
    """The donated weights of segmented blocks are updated in place, with no copy kept from the forward pass
    (XLA's compiled program). Nested as the UNet's transformer blocks in its spatial transformers: the outer
    block's recomputed forward reads the inner weights and feeds only proj_out's gradient and a residual."""

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = call_segmented(nn.Dense(16, name="inner"), nn.Dense(16, name="proj_in")(x))
            return nn.Dense(16, name="proj_out")(h) + x

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return call_segmented(Outer(name="outer"), call_segmented(nn.Dense(16, name="b"), nn.Dense(16, name="a")(x)))

    x = jnp.ones((4, 16))
    params = Model().init(jax.random.key(0), x)["params"]

    def step(p, x):
        g = jax.grad(lambda p: jnp.sum(Model().apply({"params": p}, x) ** 2))(p)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    hlo = jax.jit(step, donate_argnums=0).lower(params, x).compile().as_text()
    assert not re.findall(r"= f32\[16,16\]\S* copy\(", hlo)


@pytest.mark.parametrize("fused", [False, True], ids=["segmented", "fused_update"])
def test_jaxsd_train_with_segmented_backward(tmp_path, fused):
    """The CLI run; with train.fused_update each block's AdamW update runs in its backward pass (numerics:
    tests/train/test_fused_update.py, slow)."""
    run_dir = tmp_path / "run"
    fused_args = ["train.fused_update=true", "optimizer.clip_grad_norm=null"] if fused else []
    # one level (its CrossAttn blocks and the mid block's ResNets and transformer): a quarter less to compile
    jaxsd_command("train", "tiny", f"train.run_dir={run_dir}", "model.segmented_backward=true",
                  "model.unet.block_out_channels=[32]", "model.unet.down_block_types=[CrossAttnDownBlock2D]",
                  "model.unet.up_block_types=[CrossAttnUpBlock2D]", "model.remat_policy=full", "train.steps=1", "logging.every=1", "logging.progress_bar=false",
                  "checkpoint.every=1000", *fused_args)
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(record["loss"]) and record["skipped"] == 0
    if fused:  # no gradient norm exists in a fused step: the updated params are checked instead
        assert record["params_finite"] == 1 and "grad_norm" not in record, record
        assert "fused_update: true" in (run_dir / "config.yaml").read_text()
    else:
        assert record["grad_norm"] > 0
    assert "segmented_backward: true" in (run_dir / "config.yaml").read_text()
