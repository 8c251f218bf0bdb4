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
