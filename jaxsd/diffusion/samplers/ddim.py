"""DDIM (with eta) and DDPM: the samplers that step in ᾱ (alphas_cumprod) space.

Both predict x0 from the model output, optionally clip it (`clip_sample`), and
move to the previous timestep; they differ in which "previous" timestep
(DDIM: t - T//n whatever the spacing; DDPM: the next entry of the schedule) and in
the noise they add. Coefficients mirror diffusers' DDIMScheduler / DDPMScheduler.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers.base import (
    Sampler,
    State,
    Tables,
    as_f32,
    by_prediction,
    refuse_unsupported,
)
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.diffusion.timesteps import spaced_timesteps
from jaxsd.errors import InputError

_SUPPORTED_VARIANCE = ("fixed_small", "fixed_large")


def _x0_and_eps(tables: Tables, i, x, m):
    """(predicted x0, predicted epsilon) in diffusers' operation order."""
    sqrt_a, sqrt_b = tables["sqrt_a"][i], tables["sqrt_b"][i]
    x0 = by_prediction(tables, (x - sqrt_b * m) / sqrt_a, sqrt_a * x - sqrt_b * m, m)
    eps = by_prediction(tables, m, sqrt_a * m + sqrt_b * x, (x - sqrt_a * m) / sqrt_b)
    return x0, eps


def _ac_tables(schedule: NoiseSchedule, t: np.ndarray) -> dict[str, np.ndarray]:
    ac = schedule.alphas_cumprod
    sqrt_a, sqrt_b = as_f32(np.sqrt(ac[t]), np.sqrt(np.float32(1) - ac[t]))
    return {"timesteps": t.astype(np.float32), "init_sigma": np.float32(1.0), "noise_a": sqrt_a, "noise_s": sqrt_b,
            "sqrt_a": sqrt_a, "sqrt_b": sqrt_b}


def _clip_range(schedule: NoiseSchedule) -> np.float32:
    # inf disables clipping without changing the compiled program.
    if schedule.option("clip_sample", True):
        return np.float32(schedule.option("clip_sample_range", 1.0))
    return np.float32(np.inf)


@dataclasses.dataclass(frozen=True)
class DDIM(Sampler):
    """DDIM; eta (0 = deterministic, 1 ≈ DDPM) is a table value, so changing it does not recompile."""

    name = "ddim"
    stochastic = True  # the eta noise; multiplied by 0 when eta == 0, which leaves x bit-identical

    def tables(self, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0) -> Tables:
        refuse_unsupported(schedule, self.name, {"thresholding": False})
        T = schedule.num_train_timesteps
        t = spaced_timesteps(schedule.option("timestep_spacing", "leading"), num_steps, T,
                             schedule.option("steps_offset", 0))
        ac = schedule.alphas_cumprod
        final = np.float32(1.0) if schedule.option("set_alpha_to_one", True) else ac[0]
        prev = t - T // num_steps
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
        b_t, b_prev = np.float32(1) - a_t, np.float32(1) - a_prev
        variance = (b_prev / b_t) * (np.float32(1) - a_t / a_prev)
        std = np.float32(eta) * variance ** np.float32(0.5)
        tab = _ac_tables(schedule, t)
        tab.update(sqrt_a_prev=a_prev ** np.float32(0.5), dir_coef=(np.float32(1) - a_prev - std ** 2) ** np.float32(0.5),
                   std=std.astype(np.float32), clip=_clip_range(schedule))
        return tab

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x = state["x"]
        x0, eps = _x0_and_eps(tables, i, x, m)
        x0 = jnp.clip(x0, -tables["clip"], tables["clip"])
        prev = tables["sqrt_a_prev"][i] * x0 + tables["dir_coef"][i] * eps
        return {"x": prev + tables["std"][i] * noise}


@dataclasses.dataclass(frozen=True)
class DDPM(Sampler):
    """Ancestral DDPM sampling over a subsequence of timesteps (variance_type fixed_small or fixed_large)."""

    name = "ddpm"
    stochastic = True

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, {"thresholding": False})
        variance_type = schedule.option("variance_type", "fixed_small")
        if variance_type not in _SUPPORTED_VARIANCE:
            raise InputError(f"ddpm: variance_type {variance_type!r} is not supported; use one of "
                             f"{', '.join(_SUPPORTED_VARIANCE)}")
        T = schedule.num_train_timesteps
        t = spaced_timesteps(schedule.option("timestep_spacing", "leading"), num_steps, T,
                             schedule.option("steps_offset", 0))
        ac = schedule.alphas_cumprod
        prev = np.concatenate([t[1:], [-1]])
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], np.float32(1.0)).astype(np.float32)
        b_t, b_prev = np.float32(1) - a_t, np.float32(1) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = np.float32(1) - cur_alpha
        variance = np.maximum((np.float32(1) - a_prev) / (np.float32(1) - a_t) * cur_beta, np.float32(1e-20))
        if variance_type == "fixed_large":
            variance = cur_beta
        std = np.where(t > 0, variance ** np.float32(0.5), np.float32(0)).astype(np.float32)
        tab = _ac_tables(schedule, t)
        tab.update(x0_coef=(a_prev ** np.float32(0.5) * cur_beta) / b_t,
                   x_coef=cur_alpha ** np.float32(0.5) * b_prev / b_t, std=std, clip=_clip_range(schedule))
        return tab

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x = state["x"]
        x0, _ = _x0_and_eps(tables, i, x, m)
        x0 = jnp.clip(x0, -tables["clip"], tables["clip"])
        prev = tables["x0_coef"][i] * x0 + tables["x_coef"][i] * x
        return {"x": prev + tables["std"][i] * noise}
