"""Latent Consistency Model sampling, as diffusers' LCMScheduler (for LCM-distilled UNets / LCM-LoRA).

Each step maps x_t to the consistency function's estimate of x0 (the boundary-condition
mix c_skip·x + c_out·x̂0) and, except at the last step, re-noises it to the next timestep
with fresh noise. The timesteps are a subset of the `original_inference_steps` schedule
the model was distilled on.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers.base import Sampler, State, Tables, by_prediction, refuse_unsupported
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError

SIGMA_DATA = np.float32(0.5)


def lcm_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """int64 [num_steps]: evenly skipped entries of the distillation schedule, descending."""
    T = schedule.num_train_timesteps
    original = int(schedule.option("original_inference_steps", 50))
    if not 1 <= original <= T:
        raise InputError(f"lcm: scheduler option original_inference_steps={original} must be in [1, {T}]")
    if not 1 <= num_steps <= original:
        raise InputError(f"lcm: number of inference steps must be in [1, {original}] (the scheduler's "
                         f"original_inference_steps), got {num_steps}")
    origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]
    index = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[index].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class LCM(Sampler):
    """Multistep consistency sampling (LCMScheduler)."""

    name = "lcm"
    stochastic = True

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, {"thresholding": False, "clip_sample": False})
        t = lcm_timesteps(schedule, num_steps)
        prev = np.concatenate([t[1:], t[-1:]])
        ac = schedule.alphas_cumprod
        one, half = np.float32(1), np.float32(0.5)
        a, ap = ac[t], ac[prev]
        scaled = t.astype(np.float32) * np.float32(schedule.option("timestep_scaling", 10.0))
        last = np.zeros(num_steps, np.float32)
        last[-1] = 1.0
        return {"timesteps": t.astype(np.float32), "init_sigma": np.float32(1.0), "noise_a": a ** half,
                "noise_s": (one - a) ** half, "sa": a ** half, "sb": (one - a) ** half,
                "sap": ap ** half, "sbp": (one - ap) ** half, "last": last,
                "c_skip": SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2),
                "c_out": scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** half}

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x, sa, sb = state["x"], tables["sa"][i], tables["sb"][i]
        x0 = by_prediction(tables, (x - sb * m) / sa, sa * x - sb * m, m)
        denoised = tables["c_out"][i] * x0 + tables["c_skip"][i] * x
        renoised = tables["sap"][i] * denoised + tables["sbp"][i] * noise
        return {"x": jnp.where(tables["last"][i] > 0, denoised, renoised)}
