"""DPM-Solver++ 2M (multistep, midpoint), on the diffusers timesteps or on Karras sigmas.

The state remembers the previous x0 prediction; the first step (and the last,
when `lower_order_final` applies or the final sigma is zero) is first order.
Steps counted in the state, not by index, so img2img's late start also begins
first order, like diffusers after `set_begin_index`.
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
from jaxsd.diffusion.samplers.euler import sigma_space_train_sigmas
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.diffusion.timesteps import (
    final_sigma,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
)
from jaxsd.errors import InputError


def multistep_sigmas(schedule: NoiseSchedule, num_steps: int, *, karras: bool, last_timestep: int | None = None,
                     round_karras: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(model timesteps [n] int64, sigmas [n+1] float32) as DPM-Solver / UniPC `set_timesteps` build them."""
    T = schedule.num_train_timesteps
    t = spaced_timesteps(schedule.option("timestep_spacing", "linspace"), num_steps, T,
                         schedule.option("steps_offset", 0), extra_step=True, last_timestep=last_timestep)
    train = sigma_space_train_sigmas(schedule)
    if karras:
        log_sigmas = np.log(train)
        sig = karras_sigmas(float(train[0]), float(train[-1]), num_steps)
        t = sigma_to_t(sig, log_sigmas)
        if round_karras:
            t = t.round()
        t = t.astype(np.int64)
    else:
        sig = interp_sigmas(t, train)
    sigmas = np.concatenate([sig, [final_sigma(schedule.option("final_sigmas_type", "zero"), train)]])
    return t, sigmas.astype(np.float32)


def alpha_sigma_lambda(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VP (alpha_t, sigma_t, lambda_t = log alpha - log sigma) from VE sigmas, float32 like diffusers."""
    with np.errstate(divide="ignore"):
        alpha = np.float32(1) / (sigmas ** 2 + np.float32(1)) ** np.float32(0.5)
        sig = sigmas * alpha
        lam = np.log(alpha) - np.log(sig)
    return alpha.astype(np.float32), sig.astype(np.float32), lam.astype(np.float32)


def convert_to_x0(tables: Tables, x, m, alpha_t, sigma_t):
    """The data prediction x0 (DPM-Solver++ / UniPC with predict_x0)."""
    return by_prediction(tables, (x - sigma_t * m) / alpha_t, alpha_t * x - sigma_t * m, m)


def dpm_sigmas(schedule: NoiseSchedule, num_steps: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler's (timesteps [n], sigmas [n+1]): lambda_min_clipped, Karras sigmas
    (`use_karras_sigmas`, rounded to integer timesteps except for the cosine schedule)."""
    refuse_unsupported(schedule, name, {"thresholding": False, "use_exponential_sigmas": False,
                                        "use_beta_sigmas": False, "use_lu_lambdas": False,
                                        "use_flow_sigmas": False, "variance_type": None})
    last_t = None
    clip = schedule.option("lambda_min_clipped", -float("inf"))
    if clip != -float("inf"):
        _, _, lam_train = alpha_sigma_lambda(sigma_space_train_sigmas(schedule))
        # diffusers: searchsorted over the flipped training lambdas
        last_t = schedule.num_train_timesteps - int(np.searchsorted(lam_train[::-1], clip))
    return multistep_sigmas(schedule, num_steps, karras=bool(schedule.option("use_karras_sigmas", False)),
                            last_timestep=last_t,
                            round_karras=schedule.option("beta_schedule", "linear") != "squaredcos_cap_v2")


def first_order_final(schedule: NoiseSchedule, n: int) -> bool:
    """Whether diffusers' multistep DPM-Solver takes its last step first order (`lower_order_final` etc.)."""
    return bool(schedule.option("euler_at_final", False) or (schedule.option("lower_order_final", True) and n < 15)
                or schedule.option("final_sigmas_type", "zero") == "zero")


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M), midpoint solver type; Karras sigmas with use_karras_sigmas (dpmpp_2m_karras)."""

    name = "dpmpp_2m"
    stochastic = False

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        order = schedule.option("solver_order", 2)
        if order not in (1, 2):
            raise InputError(f"{self.name}: solver_order {order} is not supported (1 or 2)")
        t, sigmas = dpm_sigmas(schedule, num_steps, self.name)
        n = len(t)
        alpha, sig, lam = alpha_sigma_lambda(sigmas)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = lam[1:] - lam[:-1]                              # [n] lambda_{i+1} - lambda_i
            c_x = sig[1:] / sig[:-1]
            c_d = alpha[1:] * (np.exp(-h) - np.float32(1))
            h_prev = np.concatenate([[np.float32(np.nan)], lam[1:-1] - lam[:-2]])  # lambda_i - lambda_{i-1}
            inv_r0 = np.float32(1) / (h_prev / h)
        first_only = np.zeros(n, np.float32)
        first_only[-1] = 1.0 if first_order_final(schedule, n) else 0.0
        if order == 1:
            first_only[:] = 1.0
        c_x, c_d, inv_r0 = as_f32(c_x, c_d, np.nan_to_num(inv_r0, nan=0.0, posinf=0.0, neginf=0.0))
        a_s, s_s = alpha[:-1], sig[:-1]
        return {"timesteps": t.astype(np.float32), "init_sigma": np.float32(1.0), "noise_a": a_s, "noise_s": s_s,
                "alpha": a_s, "sigma": s_s, "c_x": c_x, "c_d": c_d, "c_d_half": np.float32(0.5) * c_d,
                "inv_r0": inv_r0, "first_only": first_only}

    def init_state(self, x):
        return {"x": x, "m_prev": jnp.zeros_like(x), "count": jnp.zeros((), jnp.int32)}

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x, m1 = state["x"], state["m_prev"]
        m0 = convert_to_x0(tables, x, m, tables["alpha"][i], tables["sigma"][i])
        first = tables["c_x"][i] * x - tables["c_d"][i] * m0
        d1 = tables["inv_r0"][i] * (m0 - m1)
        second = tables["c_x"][i] * x - tables["c_d"][i] * m0 - tables["c_d_half"][i] * d1
        use_second = (state["count"] >= 1) & (tables["first_only"][i] == 0)
        return {"x": jnp.where(use_second, second, first), "m_prev": m0, "count": state["count"] + 1}
