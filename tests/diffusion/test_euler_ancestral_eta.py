"""euler_a's eta (k-diffusion's sample_euler_ancestral(eta=...)): eta = 1 is diffusers' scheduler
(test_samplers.py covers its parity), eta = 0 is the deterministic Euler sampler, other etas follow the
formula. Per-step latents must agree to 1e-5 relative (fp32), as in the other sampler parity tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion.samplers import make_sampler
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError
from tests.diffusion.parity import (
    BASE,
    compiled_loop,
    diffusers_run,
    diffusers_scheduler,
    draws,
    model_np,
)
from tests.helpers import rel_err

pytest.importorskip("torch")
pytest.importorskip("diffusers")

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("replay_noise")]

STEPS = 10
CONFIGS = {
    "eps-leading": {**BASE, "prediction_type": "epsilon", "timestep_spacing": "leading"},
    "v-trailing-zsnr": {**BASE, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                        "rescale_betas_zero_snr": True},
}


def euler_a_run(config: dict, eta: float | None, x_init, noises):
    """Our euler_a latents after every step [steps, *SHAPE] (eta None: the sampler's default), and the tables."""
    sampler, tables = make_sampler("euler_a", NoiseSchedule.from_config(config), STEPS,
                                   **({} if eta is None else {"eta": eta}))
    return np.asarray(compiled_loop(sampler)(tables, jnp.asarray(x_init), jnp.asarray(noises))), tables


def formula_run(config: dict, eta: float, x_init, noises) -> np.ndarray:
    """The ancestral Euler loop written out in float32 NumPy on diffusers' sigmas and timesteps:
    sigma_up = min(s_to, eta·sqrt(s_to²(s_from² − s_to²)/s_from²)), sigma_down = sqrt(s_to² − sigma_up²),
    x ← x + d·(sigma_down − s_from) + noise·sigma_up.

    float32 as the samplers run: the zero-SNR first step (sigma 4096) cancels about four digits, so
    diffusers' own fp32 steps differ from a float64 loop by 1.6e-5 there."""
    sched = diffusers_scheduler("euler_a", config)
    sched.set_timesteps(STEPS)
    sigmas, ts = sched.sigmas.numpy().astype(np.float32), sched.timesteps.numpy().astype(np.float32)
    x, one = x_init * np.float32(sched.init_noise_sigma), np.float32(1)
    out = []
    for i, t in enumerate(ts):
        s_from, s_to = sigmas[i], sigmas[i + 1]
        m = model_np(x / np.sqrt(s_from ** 2 + one), t, np).astype(np.float32)
        if config["prediction_type"] == "epsilon":
            x0 = x - s_from * m
        else:
            x0 = m * (-s_from / np.sqrt(s_from ** 2 + one)) + x / (s_from ** 2 + one)
        up = min(s_to, np.float32(eta) * np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2))
        down = np.sqrt(s_to ** 2 - up ** 2)
        x = x + (x - x0) / s_from * (down - s_from) + noises[i] * up
        out.append(x.copy())
    return np.stack(out)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_eta_zero_is_euler(case):
    """eta = 0 adds no noise and steps to sigma_next: diffusers' EulerDiscreteScheduler and our euler."""
    config = CONFIGS[case]
    x_init, noises = draws(3, STEPS)
    ours, tables = euler_a_run(config, 0.0, x_init, noises)
    assert not tables["sigma_up"].any()
    ref, _ = diffusers_run("euler", config, STEPS, x_init, noises)
    sampler, euler_tables = make_sampler("euler", NoiseSchedule.from_config(config), STEPS)
    euler = np.asarray(compiled_loop(sampler)(euler_tables, jnp.asarray(x_init), jnp.asarray(noises)))
    for name, other in (("diffusers EulerDiscreteScheduler", ref), ("jaxsd euler", euler)):
        errs = [rel_err(ours[i], other[i]) for i in range(STEPS)]
        assert max(errs) <= 1e-5, f"eta=0 vs {name}: per-step relative errors {np.array(errs)}"


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("eta", [0.5, 1.7])
def test_eta_matches_formula(case, eta):
    """An intermediate eta (and one > 1, where sigma_up is clamped to sigma_to) against the formula."""
    config = CONFIGS[case]
    x_init, noises = draws(4, STEPS)
    ours, _ = euler_a_run(config, eta, x_init, noises)
    ref = formula_run(config, eta, x_init, noises)
    assert np.isfinite(ours).all()
    errs = [rel_err(ours[i], ref[i]) for i in range(STEPS)]
    assert max(errs) <= 1e-5, f"eta={eta}: per-step relative errors {np.array(errs)}"


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_default_eta_is_bit_identical_to_plain_euler_a(case, steps):
    """The default (eta = 1) tables are exactly those of the formula without eta (diffusers' own), so
    outputs are unchanged bit for bit; the clamp min(sigma_to, ·) never bites at eta = 1."""
    schedule = NoiseSchedule.from_config(CONFIGS[case])
    _, default = make_sampler("euler_a", schedule, steps)
    _, explicit = make_sampler("euler_a", schedule, steps, eta=1.0)
    s_from, s_to = default["sigma"], default["sigma_next"]
    up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** np.float32(0.5)
    down = (s_to ** 2 - up ** 2) ** np.float32(0.5)
    for tables in (default, explicit):
        np.testing.assert_array_equal(tables["sigma_up"], up.astype(np.float32))
        np.testing.assert_array_equal(tables["dt"], (down - s_from).astype(np.float32))


def test_negative_eta_is_refused():
    with pytest.raises(InputError, match="euler_a: eta must be >= 0"):
        make_sampler("euler_a", NoiseSchedule.from_config(CONFIGS["eps-leading"]), STEPS, eta=-0.5)
