"""Host-side (numpy) inference discretisations: timestep spacings, sigma tables, Karras sigmas.

These run once per (schedule, steps) outside jit and reproduce diffusers'
`set_timesteps` arithmetic, including its quirks (which of the three spacings
reserves an extra step, where rounding happens, float32 vs float64), because the
exact timesteps fed to the model decide whether images match.
"""

from __future__ import annotations

import numpy as np

from jaxsd.diffusion.schedule import TIMESTEP_SPACINGS
from jaxsd.errors import InputError


def spaced_timesteps(spacing: str, num_steps: int, num_train: int, steps_offset: int = 0, *,
                     extra_step: bool = False, last_timestep: int | None = None) -> np.ndarray:
    """Descending int64 timesteps [num_steps] for a diffusers timestep_spacing.

    extra_step: the multistep solvers (DPM-Solver, UniPC) space num_steps + 1 points
      for linspace/leading and drop the last, as diffusers does.
    last_timestep: DPM-Solver's lambda_min_clipped bound (defaults to num_train).
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise InputError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(TIMESTEP_SPACINGS)}")
    if num_steps < 1 or num_steps > num_train:
        raise InputError(f"number of inference steps must be in [1, {num_train}] (num_train_timesteps), got {num_steps}")
    last = num_train if last_timestep is None else last_timestep
    if not extra_step:
        if spacing == "linspace":
            return np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
        if spacing == "leading":
            ratio = num_train // num_steps
            return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
        ratio = num_train / num_steps
        return np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (num_steps + 1)
        return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    ratio = num_train / num_steps
    return np.arange(last, 0, -ratio).round().astype(np.int64) - 1


def float_timesteps(spacing: str, num_steps: int, num_train: int, steps_offset: int = 0) -> np.ndarray:
    """The Euler schedulers' float32 timesteps (linspace is not rounded there)."""
    ints = spaced_timesteps(spacing, num_steps, num_train, steps_offset)  # also validates the arguments
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    return ints.astype(np.float32)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t) per training timestep, ascending in t."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps, linear in t, float64 (diffusers' np.interp)."""
    return np.interp(np.asarray(timesteps, np.float64), np.arange(len(sigmas)), sigmas.astype(np.float64))


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas: uniform in sigma^(1/rho) from sigma_max down to sigma_min, float64."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose sigma is `sigma`, interpolating linearly in log-sigma."""
    sigma = np.asarray(sigma, np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def final_sigma(kind: str, sigmas_train: np.ndarray) -> float:
    """The sigma appended after the last step: 0 ("zero") or the smallest training sigma ("sigma_min")."""
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(sigmas_train[0])
    raise InputError(f"scheduler config: final_sigmas_type {kind!r} is not supported; use 'zero' or 'sigma_min'")
