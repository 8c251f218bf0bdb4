"""NoiseSchedule: betas/alphas_cumprod and the training helpers against diffusers' DDPMScheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion.schedule import NoiseSchedule
from tests.helpers import rel_err

CONFIGS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "zero_snr": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "rescale_betas_zero_snr": True},
    "trained": {"trained_betas": np.linspace(1e-4, 2e-2, 100).tolist(), "num_train_timesteps": 100},
}


@pytest.mark.torch
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_alphas_cumprod_and_training_helpers_match_diffusers(kind):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(**CONFIGS[kind])
    ours = NoiseSchedule.from_config(dict(ref.config))
    assert rel_err(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) <= 1e-6
    assert ours.num_train_timesteps == ref.config.num_train_timesteps

    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(2))
    t = np.array([0, ours.num_train_timesteps // 2, ours.num_train_timesteps - 1])
    tx0, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    add = jax.jit(ours.add_noise)(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert rel_err(add, ref.add_noise(tx0, tn, tt).numpy()) <= 1e-6
    vel = jax.jit(ours.velocity)(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert rel_err(vel, ref.get_velocity(tx0, tn, tt).numpy()) <= 1e-6
    ac = ref.alphas_cumprod.numpy().astype(np.float64)[t]
    np.testing.assert_allclose(np.asarray(ours.snr(jnp.asarray(t))), ac / (1 - ac), rtol=1e-5)


def test_target_follows_prediction_type():
    x0, noise, t = jnp.ones((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 2.0), jnp.array([10])
    eps = NoiseSchedule.from_config({"prediction_type": "epsilon"})
    v = NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    smp = NoiseSchedule.from_config({"prediction_type": "sample"})
    assert np.array_equal(eps.target(x0, noise, t), noise)
    assert np.array_equal(v.target(x0, noise, t), v.velocity(x0, noise, t))
    assert np.array_equal(smp.target(x0, noise, t), x0)


def test_zero_snr_ends_at_zero_snr():
    s = NoiseSchedule.from_config(CONFIGS["zero_snr"])
    assert float(s.snr(jnp.array([999]))[0]) == 0.0 and float(s.snr(jnp.array([0]))[0]) > 100


@pytest.mark.parametrize("config,match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' is not supported"),
    ({"prediction_type": "flow"}, "prediction_type 'flow' is not supported"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing 'uniform' is not supported"),
    ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, "trained_betas has 2 values"),
])
def test_bad_config_is_a_clear_error(config, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config(config)
