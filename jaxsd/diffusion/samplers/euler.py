"""Euler and Euler-ancestral (k-diffusion style) samplers in sigma space.

Latents live at scale sqrt(1 + sigma²); the model sees x / sqrt(sigma² + 1).
Sigmas are the training sigmas interpolated at the spaced (float) timesteps, as
in diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler; with
zero-SNR rescaling ᾱ_T is clamped to 2⁻²⁴ so sigma_max stays finite (4096).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsd.diffusion.samplers.base import (
    Sampler,
    State,
    Tables,
    as_f32,
    by_prediction,
    refuse_unsupported,
    rounded,
)
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.diffusion.timesteps import (
    final_sigma,
    float_timesteps,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
)
from jaxsd.errors import InputError


def sigma_space_train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """Training sigmas [T] of the sigma-space samplers (Euler, DPM-Solver, UniPC).

    With zero-SNR rescaling diffusers clamps ᾱ_T to 2⁻²⁴ so sigma_T is finite:
    sqrt((1 - 2⁻²⁴) / 2⁻²⁴) = 4096 - 1.2e-4, which IEEE float32 rounds down but
    PyTorch's float32 pow gives as 4096.0. A zero-SNR Euler step from there cancels
    about four digits, so a 1-ulp difference would show as 2e-5: use diffusers' value.
    """
    ac = schedule.alphas_cumprod.copy()
    zero_snr = schedule.option("rescale_betas_zero_snr", False)
    if zero_snr:
        ac[-1] = np.float32(2.0 ** -24)
    sigmas = train_sigmas(ac)
    if zero_snr:
        sigmas[-1] = np.float32(4096.0)
    return sigmas


def k_step_sigmas(schedule: NoiseSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(model timesteps [n] float32, step sigmas [n] float64) of the k-diffusion style schedulers
    (Euler, LMS, Heun, DPM++ SDE): training sigmas interpolated at the spaced float timesteps, or with
    `use_karras_sigmas` Karras sigmas between the first and last of those, timesteps then fractional."""
    refuse_unsupported(schedule, "sigma schedule", {"use_exponential_sigmas": False, "use_beta_sigmas": False})
    t = float_timesteps(schedule.option("timestep_spacing", "linspace"), num_steps, schedule.num_train_timesteps,
                        schedule.option("steps_offset", 0))
    train = sigma_space_train_sigmas(schedule)
    sig = interp_sigmas(t, train)
    if schedule.option("use_karras_sigmas", False):
        sig = karras_sigmas(float(sig[-1]), float(sig[0]), num_steps)
        t = sigma_to_t(sig, np.log(train)).astype(np.float32)
    return t, sig


def k_sigmas(schedule: NoiseSchedule, num_steps: int, *, final: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """(model timesteps [n] float32, sigmas [n+1] float32): `k_step_sigmas` and the final sigma."""
    t, sig = k_step_sigmas(schedule, num_steps)
    return t, np.concatenate([sig, [final_sigma(final, sigma_space_train_sigmas(schedule))]]).astype(np.float32)


def init_noise_sigma(schedule: NoiseSchedule, sigmas: np.ndarray) -> np.float32:
    """diffusers' init_noise_sigma of the sigma-space schedulers (it depends on the spacing, not the sigmas' kind)."""
    smax = sigmas.max()
    spacing = schedule.option("timestep_spacing", "linspace")
    return np.float32(smax if spacing in ("linspace", "trailing") else (smax ** 2 + np.float32(1)) ** np.float32(0.5))


def _sigma_tables(schedule: NoiseSchedule, num_steps: int, name: str, *, final: str) -> Tables:
    refuse_unsupported(schedule, name, {"interpolation_type": "linear", "timestep_type": "discrete"})
    t, sigmas = k_sigmas(schedule, num_steps, final=final)
    s = sigmas[:-1]
    return {"timesteps": t, "init_sigma": init_noise_sigma(schedule, sigmas), "noise_a": np.ones_like(s),
            "noise_s": s, "sigma": s, "sigma_next": sigmas[1:], "in_scale": (s ** 2 + np.float32(1)) ** np.float32(0.5),
            "v_m": -s / (s ** 2 + np.float32(1)) ** np.float32(0.5), "v_x": s ** 2 + np.float32(1)}


def _x0(x, m, tables: Tables, i):
    return by_prediction(tables, x - rounded(tables["sigma"][i] * m, tables),
                         rounded(m * tables["v_m"][i], tables) + x / tables["v_x"][i], m)


@dataclasses.dataclass(frozen=True)
class Euler(Sampler):
    """First-order Euler steps of the probability-flow ODE (s_churn = 0); Karras sigmas with
    use_karras_sigmas (euler_karras)."""

    name = "euler"

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        tab = _sigma_tables(schedule, num_steps, self.name, final=schedule.option("final_sigmas_type", "zero"))
        tab["dt"] = tab["sigma_next"] - tab["sigma"]
        return tab

    def model_input(self, tables: Tables, i, x):
        return x / tables["in_scale"][i]

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x = state["x"]
        x0 = _x0(x, m, tables, i)
        derivative = (x - x0) / tables["sigma"][i]
        return {"x": x + rounded(derivative * tables["dt"][i], tables)}


def ancestral_sigmas(s_from: np.ndarray, s_to: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_up, sigma_down) [n] float32 of ancestral steps s_from → s_to, as k-diffusion's
    get_ancestral_step: sigma_up = min(s_to, eta · sqrt(s_to² (s_from² − s_to²) / s_from²)),
    sigma_down = sqrt(s_to² − sigma_up²). eta = 1 is diffusers' EulerAncestralDiscreteScheduler (its
    sigma_up never exceeds s_to, so the min leaves it bit-identical); eta = 0 is a plain Euler step.
    The final step (s_to = 0) has sigma_up = sigma_down = 0 whatever eta: diffusers draws noise there
    too but scales it by 0."""
    with np.errstate(invalid="ignore"):
        up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** np.float32(0.5)
        up = np.minimum(s_to, np.float32(eta) * up)
        down = (s_to ** 2 - up ** 2) ** np.float32(0.5)
    return as_f32(up, down)


@dataclasses.dataclass(frozen=True)
class EulerAncestral(Euler):
    """Euler step down to sigma_down (the inherited step, with dt = sigma_down - sigma), then fresh
    noise of size sigma_up; eta (1 = diffusers', 0 = plain Euler) is a table value, so changing it
    does not recompile."""

    name = "euler_a"
    stochastic = True

    def tables(self, schedule: NoiseSchedule, num_steps: int, eta: float = 1.0) -> Tables:
        if schedule.prediction_type == "sample":
            raise InputError("euler_a: prediction_type 'sample' is not supported (as in diffusers)")
        if not eta >= 0:
            raise InputError(f"euler_a: eta must be >= 0 (0 = plain Euler, 1 = the default), got {eta}")
        # EulerAncestralDiscreteScheduler has no use_karras_sigmas: from_config drops it
        schedule = NoiseSchedule.from_config(schedule.config, use_karras_sigmas=False)
        tab = _sigma_tables(schedule, num_steps, self.name, final="zero")
        up, down = ancestral_sigmas(tab["sigma"], tab["sigma_next"], eta)
        tab["sigma_up"], tab["dt"] = up, (down - tab["sigma"]).astype(np.float32)
        return tab

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        prev = super().step(state, m, tables, i, None)["x"]
        return {"x": prev + rounded(noise * tables["sigma_up"][i], tables)}
