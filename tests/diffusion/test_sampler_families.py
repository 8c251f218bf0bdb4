"""Per-call parity of the second round of samplers with diffusers: PNDM (PLMS), LMS, Heun, Euler /
UniPC with Karras sigmas, DPM++ 2M/3M SDE, DPM++ SDE and LCM; the latents after every model call
must agree to 1e-5 relative (fp32), stochastic ones fed the same noise; model-call counts and
timesteps must be diffusers' own."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxsd.diffusion.samplers import make_sampler, resolve_sampler_name
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError
from tests.diffusion.parity import BASE, diffusers_run, draws, ours_run
from tests.helpers import rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("replay_noise")]

NEW = ("pndm", "lms", "lms_karras", "heun", "heun_karras", "euler_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras",
       "dpmpp_3m_sde", "dpmpp_3m_sde_karras", "dpmpp_sde", "dpmpp_sde_karras", "unipc_karras", "lcm")
NO_ZERO_SNR = ("pndm", "lms", "lms_karras", "heun", "heun_karras", "dpmpp_sde", "dpmpp_sde_karras")

# default run: three configs per sampler at 10 steps (both prediction types, every spacing; 10 steps
# already reach PLMS/LMS order 4), and 25 steps where the step count changes the algorithm (multistep
# DPM-Solver's lower-order end below 15 steps); the rest of the product is @slow (each new
# (sampler, steps) is a compile)
DEFAULT = {(10, "epsilon", "leading"), (10, "v_prediction", "trailing"), (10, "epsilon", "linspace")}


def _default(name, steps, pred, spacing):
    return (steps, pred, spacing) in DEFAULT or (
        name in ("dpmpp_2m_sde", "dpmpp_3m_sde") and (steps, pred, spacing) == (25, "v_prediction", "leading"))


CASES = [pytest.param(n, s, p, sp, False, id=f"{n}-{s}-{p[:3]}-{sp}",
                      marks=() if _default(n, s, p, sp) else pytest.mark.slow)
         for n, s, p, sp in itertools.product(NEW, (10, 25), ("epsilon", "v_prediction"),
                                              ("leading", "trailing", "linspace"))]
CASES += [pytest.param(n, 10, "v_prediction", "trailing", True, id=f"{n}-10-v_p-trailing-zsnr")
          for n in ("dpmpp_2m_sde", "dpmpp_3m_sde", "lcm")]


def _check(name, config, steps, seed):
    sampler, tables = make_sampler(name, NoiseSchedule.from_config(config), steps)
    calls = len(tables["timesteps"])
    x_init, noises = draws(seed, calls)
    ref, sched = diffusers_run(name, config, steps, x_init, noises, tables=tables)
    ours, _ = ours_run(name, config, steps, x_init, noises)
    # same model calls at the same timesteps (Heun / DPM++ SDE: 2n - 1; PNDM: n + 1)
    ref_t = sched.timesteps.numpy().astype(np.float32)
    # Karras and midpoint timesteps are fractional (sigma_to_t). Our training sigmas are correctly rounded
    # float32 square roots; torch's float32 `** 0.5` is 1 ulp off in 190 of SD's 1000, which moves those
    # timesteps by a few float32 ulps (< 1e-6 relative, far below what the model output feels). Integer ones: exact.
    fractional = ref_t != np.round(ref_t)
    np.testing.assert_array_equal(tables["timesteps"][~fractional], ref_t[~fractional])
    np.testing.assert_allclose(tables["timesteps"][fractional], ref_t[fractional], rtol=1e-6, atol=0)
    assert sampler.order == sched.order
    assert np.isfinite(ref).all()
    errs = [rel_err(ours[i], ref[i]) for i in range(calls)]
    assert max(errs) <= 1e-5, f"per-call relative errors: {np.array(errs)}"


@pytest.mark.parametrize("name,steps,pred,spacing,zsnr", CASES)
def test_sampler_matches_diffusers(name, steps, pred, spacing, zsnr):
    config = {**BASE, "prediction_type": pred, "timestep_spacing": spacing, "rescale_betas_zero_snr": zsnr}
    _check(name, config, steps, steps)


OPTION_CASES = [
    ("pndm", {"set_alpha_to_one": True, "steps_offset": 0, "beta_schedule": "linear", "beta_start": 0.0001,
              "beta_end": 0.02}),
    ("pndm", {"skip_prk_steps": False}),  # the name implies skip_prk_steps=True, whatever the folder says
    ("heun", {"beta_schedule": "squaredcos_cap_v2"}),
    ("dpmpp_2m_sde", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_3m_sde", {"lambda_min_clipped": -2.5, "timestep_spacing": "linspace"}),
    ("lcm", {"original_inference_steps": 20, "timestep_scaling": 5.0}),
]


@pytest.mark.parametrize("name,extra", OPTION_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTION_CASES)])
def test_scheduler_options_match_diffusers(name, extra):
    _check(name, {**BASE, "prediction_type": "epsilon", **extra}, 10, 0)


@pytest.mark.parametrize("name", NO_ZERO_SNR)
def test_zero_snr_is_refused_where_diffusers_has_no_rescale(name):
    """These diffusers classes ignore rescale_betas_zero_snr; a zero-SNR folder would silently sample
    another schedule, so we refuse it by name."""
    schedule = NoiseSchedule.from_config({**BASE, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    with pytest.raises(InputError, match=f"{name.removesuffix('_karras')}: scheduler option "
                                         "rescale_betas_zero_snr=True is not supported"):
        make_sampler(name, schedule, 10)


def test_dpmpp_sde_noise_is_a_brownian_increment():
    """A step's second call adds ρ·n₁ + √(1-ρ²)·n₂: unit variance, correlated with the first call's
    noise as Brownian increments over [σ, σ_mid] and [σ, σ_next] are."""
    _, tables = make_sampler("dpmpp_sde", NoiseSchedule.from_config(BASE), 10)
    rho, rho_c = tables["rho"], tables["rho_c"]
    assert np.all(rho[0::2] == 0) and np.all((rho[1::2] > 0.5) & (rho[1::2] < 1))
    np.testing.assert_allclose(rho ** 2 + rho_c ** 2, 1.0, rtol=1e-6)


A1111 = [("Euler a", "euler_a"), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"), ("DPM++ SDE", "dpmpp_sde"),
         ("LMS Karras", "lms_karras"), ("PLMS", "pndm"), ("UniPC", "unipc"), ("DPM++ 3M SDE", "dpmpp_3m_sde"),
         ("dpmpp_2m", "dpmpp_2m"), ("LCM", "lcm"), ("Heun", "heun")]


@pytest.mark.parametrize("display,ours", A1111)
def test_a1111_display_names(display, ours):
    assert resolve_sampler_name(display, {}) == ours


AUTO = [({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, "pndm"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "euler_karras"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_order": 3,
          "use_karras_sigmas": True}, "dpmpp_3m_sde_karras"),
        ({"_class_name": "DPMSolverSDEScheduler"}, "dpmpp_sde"),
        ({"_class_name": "LCMScheduler"}, "lcm"), ({"_class_name": "DDIMScheduler"}, "ddim")]


@pytest.mark.parametrize("config,ours", AUTO, ids=[o for _, o in AUTO])
def test_auto_maps_the_folder_scheduler(config, ours):
    assert resolve_sampler_name("auto", config) == ours


def test_auto_refuses_what_it_cannot_reproduce():
    with pytest.raises(InputError, match="scheduler class KDPM2DiscreteScheduler is not implemented in jaxsd; "
                                         "pass --scheduler explicitly, one of: ddim, ddpm, pndm"):
        resolve_sampler_name("auto", {"_class_name": "KDPM2DiscreteScheduler"})
    with pytest.raises(InputError, match="PNDMScheduler has skip_prk_steps=False, which no jaxsd sampler "
                                         "reproduces"):
        resolve_sampler_name("auto", {"_class_name": "PNDMScheduler"})
    with pytest.raises(InputError, match="solver_type='heun'"):
        resolve_sampler_name("auto", {"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"})
