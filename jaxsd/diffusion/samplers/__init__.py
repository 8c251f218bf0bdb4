"""Samplers by name: `make_sampler(name, schedule, num_steps) -> (sampler, tables)`.

Each name (`jaxsd.diffusion.names.DIFFUSERS_EQUIVALENT`, the table in docs/sampling.md) is a
diffusers scheduler class plus config overrides; the sampler reads the folder's scheduler config
with those overrides applied, as `Scheduler.from_config(pipe.scheduler.config, **overrides)` does:
betas, prediction type, spacing, offsets and zero-SNR rescale come from the folder, the name picks
the algorithm (and Karras sigmas, SDE variant, solver order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsd.diffusion.names import (
    DIFFUSERS_EQUIVALENT,
    SAMPLER_NAMES,
    auto_sampler_name,
    canonical_sampler_name,
)
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
from jaxsd.diffusion.samplers.dpm_sde import DPMSolverPPSDE
from jaxsd.diffusion.samplers.dpmpp_sde import DPMSolverSDE
from jaxsd.diffusion.samplers.euler import Euler, EulerAncestral
from jaxsd.diffusion.samplers.heun import Heun
from jaxsd.diffusion.samplers.lcm import LCM
from jaxsd.diffusion.samplers.lms import LMS
from jaxsd.diffusion.samplers.pndm import PNDM
from jaxsd.diffusion.samplers.unipc import UniPC
from jaxsd.diffusion.schedule import NoiseSchedule

# the sampler class of each diffusers class (DPMSolverMultistepScheduler: by algorithm_type)
_CLASSES: dict[str, type[Sampler]] = {
    "DDIMScheduler": DDIM, "DDPMScheduler": DDPM, "PNDMScheduler": PNDM, "LMSDiscreteScheduler": LMS,
    "HeunDiscreteScheduler": Heun, "EulerDiscreteScheduler": Euler,
    "EulerAncestralDiscreteScheduler": EulerAncestral, "DPMSolverSDEScheduler": DPMSolverSDE,
    "UniPCMultistepScheduler": UniPC, "LCMScheduler": LCM,
}


def check_sampler_name(name: str) -> str:
    """Our name for `name` (ours or an A1111 display name; not `auto`, which needs a folder)."""
    return canonical_sampler_name(name, allow_auto=False)


def resolve_sampler_name(name: str, scheduler_config: dict[str, Any]) -> str:
    """Our name for `name`, with `auto` resolved from the folder's scheduler config (`_class_name`)."""
    name = canonical_sampler_name(name)
    return auto_sampler_name(scheduler_config) if name == "auto" else name


def named_schedule(name: str, schedule: NoiseSchedule) -> NoiseSchedule:
    """The folder's schedule with the overrides `name` implies (diffusers' from_config(config, **overrides))."""
    overrides = DIFFUSERS_EQUIVALENT[check_sampler_name(name)][1]
    return NoiseSchedule.from_config(schedule.config, **overrides) if overrides else schedule


def get_sampler(name: str, schedule: NoiseSchedule) -> Sampler:
    """The static sampler object for `name` configured from `schedule` (with `name`'s overrides applied)."""
    name = check_sampler_name(name)
    cls_name = DIFFUSERS_EQUIVALENT[name][0]
    schedule = named_schedule(name, schedule)
    if cls_name == "DPMSolverMultistepScheduler":
        algorithm = schedule.option("algorithm_type", "dpmsolver++")
        return (DPMSolverPPSDE if algorithm == "sde-dpmsolver++" else DPMSolverPP2M).from_schedule(schedule)
    return _CLASSES[cls_name].from_schedule(schedule)


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, **options: Any) -> tuple[Sampler, Tables]:
    """(sampler, per-model-call tables) for `num_steps` steps; options: eta for ddim and euler_a."""
    sampler = get_sampler(name, schedule)
    schedule = named_schedule(name, schedule)
    tables = sampler.tables(schedule, num_steps, **options)
    tables["progress_step"] = sampler.progress_steps(len(tables["timesteps"]))
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
    "resolve_sampler_name",
]
