"""Samplers by name: `make_sampler(name, schedule, num_steps) -> (sampler, tables)`.

Names match `jaxsd sample --scheduler` and the diffusers scheduler each reproduces:

  ddim             DDIMScheduler (eta via tables(eta=...))
  ddpm             DDPMScheduler
  euler            EulerDiscreteScheduler
  euler_a          EulerAncestralDiscreteScheduler
  dpmpp_2m         DPMSolverMultistepScheduler (dpmsolver++, order 2)
  dpmpp_2m_karras  the same with use_karras_sigmas=True
  unipc            UniPCMultistepScheduler

Betas, prediction type, spacing, offsets and zero-SNR rescale come from the
folder's scheduler config, as `Scheduler.from_config(pipe.scheduler.config)` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsd.diffusion import SAMPLER_NAMES
from jaxsd.diffusion.samplers.base import (
    PREDICTION_CODES,
    Sampler,
    Tables,
    denoise,
    img2img_start,
    noise_to_start,
)
from jaxsd.diffusion.samplers.ddim import DDIM, DDPM
from jaxsd.diffusion.samplers.dpm import DPMSolverPP2M
from jaxsd.diffusion.samplers.euler import Euler, EulerAncestral
from jaxsd.diffusion.samplers.unipc import UniPC
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError

# diffusers class each name reproduces, and the config overrides it implies
DIFFUSERS_EQUIVALENT: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                                 "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                                        "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_sampler_name(name: str) -> str:
    if name not in SAMPLER_NAMES:
        raise InputError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return name


def get_sampler(name: str, schedule: NoiseSchedule) -> Sampler:
    """The static sampler object for `name` configured from `schedule`."""
    check_sampler_name(name)
    if name == "ddim":
        return DDIM.from_schedule(schedule)
    if name == "ddpm":
        return DDPM.from_schedule(schedule)
    if name == "euler":
        return Euler.from_schedule(schedule)
    if name == "euler_a":
        return EulerAncestral.from_schedule(schedule)
    if name == "unipc":
        return UniPC.from_schedule(schedule)
    # The name fixes the algorithm (DPM-Solver++, 2nd-order multistep, midpoint) whatever the folder's
    # DPM scheduler config says about algorithm_type / solver_type, like DIFFUSERS_EQUIVALENT's overrides.
    return DPMSolverPP2M(karras=name == "dpmpp_2m_karras")


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, **options: Any) -> tuple[Sampler, Tables]:
    """(sampler, per-step tables) for `num_steps` steps; options: eta for ddim."""
    sampler = get_sampler(name, schedule)
    tables = sampler.tables(schedule, num_steps, **options)
    tables["zero"] = np.float32(0.0)  # see base.rounded
    tables["prediction"] = np.int32(PREDICTION_CODES[schedule.prediction_type])  # see base.by_prediction
    return sampler, tables


__all__ = [
    "DIFFUSERS_EQUIVALENT",
    "SAMPLER_NAMES",
    "Sampler",
    "Tables",
    "check_sampler_name",
    "denoise",
    "get_sampler",
    "img2img_start",
    "make_sampler",
    "noise_to_start",
]
