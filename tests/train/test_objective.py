"""The diffusion objective: timesteps, targets, Min-SNR-γ, perturbations, dropout, loss types."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import DiffusionConfig, LossConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train import loss as L
from jaxsd.train.loss import conditioning, elementwise_loss, micro_conditioning, min_snr_weight

# jitted once per config: eager op-by-op dispatch is what makes small JAX tests slow
draw_randomness = jax.jit(L.draw_randomness, static_argnums=(2, 3))
diffusion_loss = jax.jit(L.diffusion_loss, static_argnums=(0, 4, 5))
sample_timesteps = jax.jit(L.sample_timesteps, static_argnums=(1, 2, 3))


@pytest.fixture(scope="module")
def big_draw():
    """One 1000-sample draw with dropout and noise offset, shared by the statistical checks."""
    return draw_randomness(jax.random.key(0), _batch(1000), LossConfig(cond_dropout=0.2, noise_offset=0.3), 1000)

SCHED = NoiseSchedule.from_config(DiffusionConfig().to_scheduler_config())


def _batch(b=6, pooled=False):
    # numpy, not jax.random: every new shape of an eager jax.random call is another slow XLA compile
    rng = np.random.default_rng(1)
    batch = {"latents": rng.standard_normal((b, 4, 4, 4), np.float32),
             "encoder_hidden_states": rng.standard_normal((b, 3, 8), np.float32)}
    if pooled:
        batch["pooled"] = jnp.ones((b, 5))
        batch["time_ids"] = jnp.tile(jnp.array([[512., 512, 0, 0, 512, 512]]), (b, 1))
    return batch


def test_timestep_sampling_ranges_and_logit_normal_bias():
    t = sample_timesteps(jax.random.key(0), 20000, LossConfig(min_timestep=100, max_timestep=300), 1000)
    assert int(t.min()) == 100 and int(t.max()) == 299
    u = jnp.asarray(np.random.default_rng(0).integers(0, 1000, 20000))
    ln = sample_timesteps(jax.random.key(0), 20000, LossConfig(timestep_sampling="logit_normal"), 1000)
    assert 0 <= int(ln.min()) and int(ln.max()) <= 999
    assert abs(float(ln.mean()) - 500) < 15 and float(ln.std()) < 0.8 * float(u.std())
    with pytest.raises(ValueError, match="min_timestep"):
        sample_timesteps(jax.random.key(0), 4, LossConfig(min_timestep=500, max_timestep=400), 1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error(prediction_type):
    # Whatever the model predicts, the Min-SNR-γ weighted loss must equal min(SNR, γ)·|x0 − x̂0|².
    gamma = 5.0
    sched = NoiseSchedule.from_config({**DiffusionConfig().to_scheduler_config(), "prediction_type": prediction_type})
    t = jnp.array([1, 50, 300, 999])
    x0, noise, err = (jnp.asarray(np.random.default_rng(i).standard_normal((4, 8)), jnp.float32) for i in range(3))
    x_t = sched.add_noise(x0, noise, t)
    a = jnp.sqrt(jnp.asarray(sched.alphas_cumprod)[t])[:, None]
    s = jnp.sqrt(1 - jnp.asarray(sched.alphas_cumprod)[t])[:, None]
    x0_hat = x0 + 0.01 * err
    eps_hat = (x_t - a * x0_hat) / s
    pred = {"epsilon": eps_hat, "v_prediction": a * eps_hat - s * x0_hat, "sample": x0_hat}[prediction_type]
    target = sched.target(x0, noise, t)
    snr = sched.snr(t)
    weighted = min_snr_weight(snr, gamma, prediction_type) * jnp.square(pred - target).mean(-1)
    expected = jnp.minimum(snr, gamma) * jnp.square(x0_hat - x0).mean(-1)
    np.testing.assert_allclose(weighted, expected, rtol=2e-3)


def test_zero_terminal_snr_weight_is_finite():
    sched = NoiseSchedule.from_config({**DiffusionConfig().to_scheduler_config(), "rescale_betas_zero_snr": True,
                                       "prediction_type": "v_prediction"})
    snr = sched.snr(jnp.array([0, 999]))
    assert float(snr[1]) == 0.0
    for pt in ("epsilon", "v_prediction"):
        w = min_snr_weight(snr, 5.0, pt)
        assert np.all(np.isfinite(w)) and float(w[1]) == (1.0 if pt == "epsilon" else 0.0)


def test_loss_types():
    p, t = jnp.array([0.0, 0.05, 2.0]), jnp.zeros(3)
    np.testing.assert_allclose(elementwise_loss(p, t, "l2", 0.1), [0, 0.0025, 4.0], rtol=1e-6)
    np.testing.assert_allclose(elementwise_loss(p, t, "l1", 0.1), [0, 0.05, 2.0], rtol=1e-6)
    np.testing.assert_allclose(elementwise_loss(p, t, "huber", 0.1), [0, 0.5 * 0.0025, 0.1 * (2.0 - 0.05)], rtol=1e-6)


def test_conditioning_dropout_uses_empty_prompt_and_keeps_time_ids(big_draw):
    batch = _batch(4, pooled=True)
    empty = {"encoder_hidden_states": jnp.full((3, 8), 7.0), "pooled": jnp.full((5,), -1.0)}
    drop = jnp.array([True, False, True, False])
    ehs, added = conditioning(batch, drop, empty)
    np.testing.assert_array_equal(ehs[0], empty["encoder_hidden_states"])
    np.testing.assert_array_equal(ehs[1], batch["encoder_hidden_states"][1])
    np.testing.assert_array_equal(added["text_embeds"][:, 0], [-1, 1, -1, 1])
    np.testing.assert_array_equal(added["time_ids"], batch["time_ids"])
    rate = float(big_draw["drop"].mean())
    assert 0.15 < rate < 0.25


def test_micro_conditioning_from_metadata():
    b = {**_batch(2), "pooled": jnp.ones((2, 5)), "original_size": jnp.array([[600, 800]] * 2),
         "crop_top_left": jnp.array([[10, 20]] * 2), "target_size": jnp.array([[512, 512]] * 2)}
    _, added = conditioning(b, jnp.zeros(2, bool), None)
    np.testing.assert_array_equal(added["time_ids"][0], [600, 800, 10, 20, 512, 512])
    np.testing.assert_array_equal(micro_conditioning(jnp.array([[1, 2]]), jnp.array([[3, 4]]), jnp.array([[5, 6]])),
                                  [[1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="time_ids"):
        conditioning({**_batch(2), "pooled": jnp.ones((2, 5))}, jnp.zeros(2, bool), None)


def test_input_perturbation_and_noise_offset_and_raw_loss(big_draw):
    batch = _batch()
    identity = lambda params, noisy, t, ehs, added: noisy
    cfg = LossConfig(input_perturbation=0.1, noise_offset=0.3)
    draws = draw_randomness(jax.random.key(3), batch, cfg, 1000)
    assert set(draws) >= {"noise", "perturb", "t", "drop"}
    # the model sees x_t built from noise+perturb; the target is the unperturbed noise
    loss, raw = diffusion_loss(identity, None, batch, draws, SCHED, cfg)
    x_t = SCHED.add_noise(batch["latents"], draws["noise"] + draws["perturb"], draws["t"])
    np.testing.assert_allclose(raw, jnp.square(x_t - draws["noise"]).mean(), rtol=1e-6)
    assert float(loss) == float(raw)  # no Min-SNR: weighted == raw
    loss_w, raw_w = diffusion_loss(identity, None, batch, draws, SCHED, LossConfig(min_snr_gamma=5.0, input_perturbation=0.1))
    assert float(raw_w) == float(raw) and float(loss_w) != float(raw_w)
    # noise offset: a per-sample, per-channel constant shift → the spatial mean of the noise varies much more
    # (without it the 4×4 spatial mean of N(0,1) noise has std 1/4; with it sqrt(1/16 + 0.09) ≈ 0.39)
    offset = big_draw["noise"]
    assert 0.36 < float(offset.mean(axis=(1, 2)).std()) < 0.42


def test_latent_distribution_batches_draw_a_fresh_sample():
    b = {"latent_mean": jnp.zeros((3, 2, 2, 4)), "latent_logvar": jnp.full((3, 2, 2, 4), np.log(0.25)),
         "encoder_hidden_states": jnp.zeros((3, 1, 8))}
    draws = draw_randomness(jax.random.key(0), b, LossConfig(), 1000)
    echo_x0 = lambda params, noisy, t, ehs, added: jnp.zeros_like(noisy)
    cfg = LossConfig()
    sched = NoiseSchedule.from_config({**DiffusionConfig().to_scheduler_config(), "prediction_type": "sample"})
    _, raw = diffusion_loss(echo_x0, None, b, draws, sched, cfg)
    np.testing.assert_allclose(raw, jnp.square(0.5 * draws["latent_eps"]).mean(), rtol=1e-6)
