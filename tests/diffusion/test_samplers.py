"""Sampler parity with diffusers' PyTorch schedulers.

The same deterministic stand-in model (a smooth function of the scaled input and
the timestep) drives one diffusers scheduler and our jitted loop; the latents after
every step must agree to 1e-5 relative (fp32). One compiled loop per
(sampler, steps, prediction type) is reused across every schedule config.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion.samplers import (
    denoise,
    img2img_start,
    make_sampler,
    noise_to_start,
)
from jaxsd.diffusion.schedule import NoiseSchedule
from tests.diffusion.parity import (
    BASE,
    QUEUE,
    SHAPE,
    diffusers_run,
    diffusers_scheduler,
    model_np,
    ours_run,
    used_noise,
)
from tests.helpers import rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("replay_noise")]

# the samplers of the first round; the newer families have their own matrix (test_sampler_families.py)
FIRST_ROUND = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")

CASES = []
for name, steps, pred, spacing, zsnr in itertools.product(
        FIRST_ROUND, (10, 25), ("epsilon", "v_prediction"), ("leading", "trailing", "linspace"), (False, True)):
    if zsnr and pred == "epsilon":
        continue  # zero terminal SNR is only meaningful for v-prediction (eps has no signal at t=T)
    CASES.append((name, steps, pred, spacing, zsnr))


@pytest.mark.parametrize("name,steps,pred,spacing,zsnr", CASES,
                         ids=[f"{n}-{s}-{p[:3]}-{sp}{'-zsnr' if z else ''}" for n, s, p, sp, z in CASES])
def test_sampler_matches_diffusers(name, steps, pred, spacing, zsnr):
    config = {**BASE, "prediction_type": pred, "timestep_spacing": spacing, "rescale_betas_zero_snr": zsnr}
    rng = np.random.default_rng(steps)
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    eta = 0.5 if name == "ddim" and spacing == "trailing" else 0.0
    if name == "dpmpp_2m_karras" and zsnr and steps == 25:
        # diffusers' Karras timesteps collide at t=999 here and its step-index lookup runs off the end
        with pytest.raises(IndexError):
            diffusers_run(name, config, steps, x_init, noises, eta)
        pytest.skip("diffusers itself fails (IndexError) for Karras sigmas + zero-SNR at 25 steps")
    ref, sched = diffusers_run(name, config, steps, x_init, noises, eta)
    ours, tables = ours_run(name, config, steps, x_init, noises, eta)
    np.testing.assert_allclose(tables["timesteps"], sched.timesteps.numpy().astype(np.float32), rtol=0, atol=0)
    assert np.isfinite(ref).all()
    errs = [rel_err(ours[i], ref[i]) for i in range(steps)]
    assert max(errs) <= 1e-5, f"per-step relative errors: {np.array(errs)}"


OPTION_CASES = [
    ("ddim", {"set_alpha_to_one": True, "clip_sample": True, "steps_offset": 0, "beta_schedule": "linear",
              "beta_start": 0.0001, "beta_end": 0.02}),
    ("ddpm", {"clip_sample": True, "beta_schedule": "squaredcos_cap_v2"}),
    ("euler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False, "timestep_spacing": "trailing"}),
    ("dpmpp_2m_karras", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("dpmpp_2m", {"lambda_min_clipped": -2.5, "timestep_spacing": "linspace"}),
    ("unipc", {"solver_type": "bh1", "timestep_spacing": "trailing"}),
    ("unipc_karras", {}),
    ("euler", {"use_karras_sigmas": True}),  # the name decides: plain euler drops the folder's Karras flag
]


@pytest.mark.parametrize("name,extra", OPTION_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTION_CASES)])
def test_scheduler_options_match_diffusers(name, extra):
    config = {**BASE, "prediction_type": "epsilon", **extra}
    rng = np.random.default_rng(0)
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((10,) + SHAPE).astype(np.float32)
    ref, _ = diffusers_run(name, config, 10, x_init, noises, 0.0)
    ours, _ = ours_run(name, config, 10, x_init, noises, 0.0)
    assert max(rel_err(ours[i], ref[i]) for i in range(10)) <= 1e-5


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "unipc", "pndm", "heun", "lms", "dpmpp_sde",
                                  "dpmpp_3m_sde", "lcm"])
def test_img2img_partial_schedule_matches_diffusers(name):
    """Starting at step 4 of 10 (strength 0.6) from noised clean latents, as diffusers' img2img does
    (call 4 × order: the second-order samplers list two calls per step); stochastic ones with the same noise."""
    steps, start = 10, 4
    config = {**BASE, "prediction_type": "epsilon", "timestep_spacing": "leading"}
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    sampler, tables = make_sampler(name, NoiseSchedule.from_config(config), steps)
    noises = rng.standard_normal((len(tables["timesteps"]),) + SHAPE).astype(np.float32)
    used = used_noise(tables, noises)
    sched = diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    call = start * sched.order
    if name == "dpmpp_sde":
        sched.noise_sampler = lambda sigma, sigma_next: torch.from_numpy(QUEUE.pop(0))
    timesteps = sched.timesteps[call:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(call)
    x = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
    refs = [x.numpy().copy()]
    for j, t in enumerate(timesteps):
        m = model_np(sched.scale_model_input(x, t), t.to(torch.float32), torch)
        QUEUE[:] = [used[call + j]]
        kwargs = {"variance_noise": torch.from_numpy(used[call + j])} if name == "dpmpp_3m_sde" else {}
        x = sched.step(m, t, x, **kwargs).prev_sample
    refs.append(x.numpy())

    assert img2img_start(steps, 0.6) == start and sampler.order == sched.order
    x_start = noise_to_start(tables, jnp.asarray(x0), jnp.asarray(noise), jnp.int32(call))
    assert rel_err(x_start, refs[0]) <= 1e-6
    fn = jax.jit(lambda tb, x, s, nz: denoise(sampler, tb, lambda x_in, t: model_np(x_in, t, jnp), x, start=s,
                                              noises=nz))
    assert rel_err(fn(tables, x_start, jnp.int32(call), jnp.asarray(noises)), refs[1]) <= 1e-5


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'heunn'; valid samplers: ddim, ddpm, pndm, lms, "
                                         "lms_karras, heun, .*unipc_karras, lcm"):
        make_sampler("heunn", NoiseSchedule.from_config(BASE), 10)


def test_unsupported_option_is_refused():
    with pytest.raises(ValueError, match="thresholding"):
        make_sampler("dpmpp_2m", NoiseSchedule.from_config({**BASE, "thresholding": True}), 10)
    with pytest.raises(ValueError, match="euler: scheduler option interpolation_type='log_linear' is not supported"):
        make_sampler("euler", NoiseSchedule.from_config({**BASE, "interpolation_type": "log_linear"}), 10)
    with pytest.raises(ValueError, match="steps must be in"):
        make_sampler("euler", NoiseSchedule.from_config(BASE), 0)
