"""bfloat16 params (`model.param_dtype: bfloat16`, kohya's "full bf16"): updates rounded stochastically.

Stochastic rounding is unbiased (the mean of many roundings is the exact value); a regression
with bf16 params trains as fp32 does where round-to-nearest stalls; the real train step with bf16
params and Adafactor lowers the loss; and `jaxsd train` runs it from a cache made by `jaxsd cache`
(the shared tiny run's, tests/train/tiny_run.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import DiffusionConfig, LossConfig, OptimizerConfig
from jaxsd.convert.safetensors_io import SafetensorsFile
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train.optimizers import make_optimizer
from jaxsd.train.rounding import apply_updates, stochastic_round_bf16
from jaxsd.train.step import init_state, make_train_step
from tests.helpers import jaxsd_command
from tests.train.cli_runs import ENV, records
from tests.train.toy import batch, toy


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    between = np.asarray([1.0 + 0.1 * ulp, 1.0 + 0.5 * ulp, 1.0 + 0.93 * ulp, -(1.5 + 0.25 * ulp), 3e-6], np.float32)
    exact = np.asarray([1.0, -2.0, np.inf], np.float32)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: stochastic_round_bf16(jnp.asarray(np.concatenate([between, exact])),
                                                                       k)))(keys), np.float64)
    bits = between.view(np.uint32)
    toward_zero = (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    away = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32).astype(np.float64)
    for j, v in enumerate(between.astype(np.float64)):
        got = draws[:, j]
        assert set(np.unique(got)) == {toward_zero[j], away[j]}, (v, np.unique(got))  # the two neighbours only
        p_away = (abs(v) - abs(toward_zero[j])) / (abs(away[j]) - abs(toward_zero[j]))
        std_err = abs(away[j] - toward_zero[j]) * np.sqrt(p_away * (1 - p_away) / n)
        assert abs(got.mean() - v) <= 5 * std_err, (v, got.mean(), std_err)  # unbiased
    np.testing.assert_array_equal(draws[:, len(between):], np.broadcast_to(exact, (n, 3)))  # bf16 values stay


def test_bf16_params_train_like_fp32_where_nearest_rounding_stalls():
    # regression y = X W* with small steps (lr 1e-3 on weights ~1: an update is ~1/8 of a bf16 ulp)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
    w_true = jnp.asarray(rng.uniform(1.0, 2.0, (32, 16)), jnp.float32)
    y = x @ w_true
    tx, _ = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.0, clip_grad_norm=None),
                           10)

    def run(dtype, stochastic):
        params = {"w": jnp.full((32, 16), 1.5, dtype)}
        loss = lambda p: jnp.mean(jnp.square(x @ p["w"].astype(jnp.float32) - y))

        def body(carry, key):
            p, s = carry
            l, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (apply_updates(p, u, key if stochastic else None), s), l

        keys = jax.random.split(jax.random.key(1), 400)
        (_, _), losses = jax.lax.scan(body, (params, tx.init(params)), keys)
        return losses

    fp32, sr, nearest = (np.asarray(jax.jit(lambda d=d, s=s: run(d, s))())
                         for d, s in ((jnp.float32, False), (jnp.bfloat16, True), (jnp.bfloat16, False)))
    assert fp32[-1] < 0.2 * fp32[0]
    assert sr[-1] < 1.5 * fp32[-1], (sr[-1], fp32[-1])
    assert nearest[-1] > 0.9 * nearest[0], nearest[-1]  # every update below half an ulp: nothing moves


@pytest.mark.parametrize("name", ["adafactor", "adamw8bit"])
def test_train_step_with_bf16_params_lowers_the_loss(name):
    _, params, apply_fn, _ = toy()
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tx, lr = make_optimizer(OptimizerConfig(name=name, learning_rate=3e-3, clip_grad_norm=None), 30)
    sched = NoiseSchedule.from_config(DiffusionConfig().to_scheduler_config())
    step = jax.jit(make_train_step(apply_fn, sched, LossConfig(), tx, lr, streamed=True))
    state = init_state(params, {}, tx, seed=0, ema=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.dtype.kind == "f")
    fixed = batch(8)
    losses = []
    for _ in range(30):
        state, m = step(state, fixed)
        losses.append(float(m["loss"]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_jaxsd_train_with_bf16_params_and_adafactor(tiny_run, tmp_path):
    # the shared tiny run's pipeline and cache (tests/train/tiny_run.py), trained again with bf16 params
    run_dir = tmp_path / "bf16"
    jaxsd_command("train", tiny_run.yaml, f"train.run_dir={run_dir}", "model.param_dtype=bfloat16",
                  "optimizer.name=adafactor", "optimizer.learning_rate=1e-3", "optimizer.clip_grad_norm=null",
                  "train.ema.enabled=false", "logging.sample_every=0", env=ENV)
    logged = records(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in logged), logged
    jaxsd_command("export", run_dir, "--out", tmp_path / "export")
    base = SafetensorsFile(tiny_run.pipe / "unet" / "diffusion_pytorch_model.safetensors")
    trained = SafetensorsFile(tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    # Adafactor's steps here are ~1e-3 of each weight, below half a bf16 ulp (2^-9): round-to-nearest
    # would leave most weights where they were; stochastic rounding moves them
    moved = [np.mean(trained[k].astype(np.float32) != base[k].astype(np.float32)) for k in base if base[k].size > 1000]
    assert np.mean(moved) > 0.2, moved
