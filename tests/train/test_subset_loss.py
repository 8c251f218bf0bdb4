"""The subsets' objective on one batch, against a hand computation: per-sample loss weights, and with
DreamBooth's prior half, loss = instance mean + prior_loss_weight x class mean (both as metrics)."""

import jax
import numpy as np

from jaxsd.config import DiffusionConfig, LossConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train import loss as L

SCHED = NoiseSchedule.from_config(DiffusionConfig().to_scheduler_config())
diffusion_loss = jax.jit(L.diffusion_loss, static_argnums=(0, 4, 5))


def _model(params, noisy, t, ehs, added):
    return noisy * params  # a model whose error is easy to compute by hand


def test_weighted_instance_plus_prior_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    b, plw = 4, 0.7
    batch = {"latents": rng.standard_normal((b, 2, 2, 4), np.float32),
             "encoder_hidden_states": rng.standard_normal((b, 3, 8), np.float32),
             "loss_weight": np.array([2.0, 1.0, plw, plw], np.float32),  # two instance subsets, then the classes
             "prior": np.array([0.0, 0.0, 1.0, 1.0], np.float32)}
    draws = {"noise": rng.standard_normal((b, 2, 2, 4)).astype(np.float32), "t": np.array([10, 200, 500, 900]),
             "drop": np.zeros(b, bool)}
    loss, metrics = diffusion_loss(_model, 0.5, batch, draws, SCHED, LossConfig())

    a = np.sqrt(np.asarray(SCHED.alphas_cumprod)[draws["t"]])[:, None, None, None]
    s = np.sqrt(1 - np.asarray(SCHED.alphas_cumprod)[draws["t"]])[:, None, None, None]
    noisy = a * batch["latents"] + s * draws["noise"]
    per_sample = ((0.5 * noisy - draws["noise"]) ** 2).reshape(b, -1).mean(1)  # epsilon target
    instance = (2.0 * per_sample[0] + per_sample[1]) / 2
    prior = per_sample[2:].mean()
    np.testing.assert_allclose(float(metrics["loss_instance"]), instance, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_prior"]), plw * prior, rtol=1e-5)
    np.testing.assert_allclose(float(loss), instance + plw * prior, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_raw"]), per_sample.mean(), rtol=1e-5)

    plain = {k: v for k, v in batch.items() if k not in ("prior",)}  # subsets without prior: weighted mean
    loss_w, metrics_w = diffusion_loss(_model, 0.5, plain, draws, SCHED, LossConfig())
    np.testing.assert_allclose(float(loss_w), (batch["loss_weight"] * per_sample).mean(), rtol=1e-5)
    assert set(metrics_w) == {"loss_raw"}


def test_gradient_accumulation_keeps_the_instance_and_prior_metrics():
    """k micro-batches each hold instance and class rows: their mean metrics are the whole batch's."""
    from jaxsd.config import OptimizerConfig
    from jaxsd.train.optimizers import make_optimizer
    from jaxsd.train.step import init_state, make_train_step

    rng = np.random.default_rng(1)
    batch = {"latents": rng.standard_normal((4, 2, 2, 4), np.float32),
             "encoder_hidden_states": rng.standard_normal((4, 3, 8), np.float32),
             "loss_weight": np.array([1.0, 1.0, 0.5, 0.5], np.float32),
             "prior": np.array([0.0, 0.0, 1.0, 1.0], np.float32)}
    tx, lr = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1e-1, weight_decay=0.0), 10)
    params = {"w": np.float32(0.5)}
    runs = []
    for k in (1, 2):
        step = jax.jit(make_train_step(lambda p, x, t, e, a: x * p["w"], SCHED, LossConfig(), tx, lr,
                                       grad_accum_steps=k))
        state = init_state(params, {}, tx, seed=0, ema=False)
        state, metrics = step(state, batch)
        runs.append((state, metrics))
    (s1, m1), (s2, m2) = runs
    assert {"loss", "loss_raw", "loss_instance", "loss_prior"} <= set(m1)
    for key in ("loss", "loss_raw", "loss_instance", "loss_prior"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["loss"]), float(m1["loss_instance"]) + float(m1["loss_prior"]), rtol=1e-6)
    np.testing.assert_allclose(float(s2.params["w"]), float(s1.params["w"]), rtol=1e-6)
