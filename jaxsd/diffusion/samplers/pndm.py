"""PLMS — pseudo linear multistep, diffusers' PNDMScheduler with `skip_prk_steps` (SD1.5's shipped default).

diffusers runs n + 1 model calls for n steps: timesteps [t_{n-1}, t_{n-2}, t_{n-2}, ..., t_0] (the
second repeated). Call 0 takes a provisional Euler-like step; call 1 goes back to call 0's sample
and redoes that step with the mean of both outputs; later calls combine the stored outputs with
Adams-Bashforth weights of order 2, 3, then 4. The combined ε goes through PNDM's formula (9)
from t to t - T/n. Which variant a call is depends on how many calls this run has made (the
state's count), as in diffusers, so img2img's late start begins with call 0's rule.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers.base import Sampler, State, Tables, by_prediction, refuse_unsupported
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.diffusion.timesteps import spaced_timesteps
from jaxsd.errors import InputError


def _prev_coeffs(schedule: NoiseSchedule, t: np.ndarray, t_prev: np.ndarray) -> dict[str, np.ndarray]:
    """float32 coefficients of PNDM's x_{t_prev} = sc·x - dc·ε / den (and ε from v: sa·v + sb·x)."""
    ac = schedule.alphas_cumprod
    final = np.float32(1.0) if schedule.option("set_alpha_to_one", False) else ac[0]
    a = ac[t]
    ap = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], final).astype(np.float32)
    one, half = np.float32(1), np.float32(0.5)
    b, bp = one - a, one - ap
    return {"sc": (ap / a) ** half, "dc": ap - a, "den": a * bp ** half + (a * b * ap) ** half,
            "sa": a ** half, "sb": b ** half}


@dataclasses.dataclass(frozen=True)
class PNDM(Sampler):
    """PLMS steps (PNDMScheduler, skip_prk_steps=True)."""

    name = "pndm"

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, {"rescale_betas_zero_snr": False})
        if schedule.prediction_type == "sample":
            raise InputError("pndm: prediction_type 'sample' is not supported (PNDMScheduler takes epsilon or "
                             "v_prediction)")
        T = schedule.num_train_timesteps
        ts = spaced_timesteps(schedule.option("timestep_spacing", "leading"), num_steps, T,
                              schedule.option("steps_offset", 0))[::-1]  # ascending, as PNDM's _timesteps
        calls = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int64)  # [n + 1]
        r = T // num_steps
        normal = _prev_coeffs(schedule, calls, calls - r)
        # the second call steps from t + T/n to t (never used at call 0, whose t + T/n may be past T - 1)
        redo = _prev_coeffs(schedule, np.minimum(calls + r, T - 1), calls)
        ac = schedule.alphas_cumprod[calls]
        tab = {"timesteps": calls.astype(np.float32), "init_sigma": np.float32(1.0),
               "noise_a": ac ** np.float32(0.5), "noise_s": (np.float32(1) - ac) ** np.float32(0.5)}
        tab.update(normal)
        tab.update({f"{k}_1": v for k, v in redo.items()})
        return tab

    def progress_steps(self, num_calls: int) -> np.ndarray:
        return np.maximum(np.arange(num_calls, dtype=np.int32) - 1, 0)  # calls 0 and 1 make step 0

    def init_state(self, x):
        z = jnp.zeros_like(x)
        return {"x": x, "cur": z, "p1": z, "p2": z, "p3": z, "count": jnp.zeros((), jnp.int32)}

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        count, p1, p2, p3 = state["count"], state["p1"], state["p2"], state["p3"]
        redo = count == 1
        # diffusers' weights, in its operation order
        eps = jnp.where(count == 0, m,
              jnp.where(redo, (m + p1) / 2,
              jnp.where(count == 2, (3 * m - p1) / 2,
              jnp.where(count == 3, (23 * m - 16 * p1 + 5 * p2) / 12,
                        (1 / 24) * (55 * m - 59 * p1 + 37 * p2 - 9 * p3)))))
        x = jnp.where(redo, state["cur"], state["x"])

        def coeff(key):
            return jnp.where(redo, tables[f"{key}_1"][i], tables[key][i])

        eps = by_prediction(tables, eps, coeff("sa") * eps + coeff("sb") * x, eps)
        x_prev = coeff("sc") * x - coeff("dc") * eps / coeff("den")
        keep = redo  # the redo call's output is not stored
        return {"x": x_prev, "cur": jnp.where(count == 0, state["x"], state["cur"]),
                "p1": jnp.where(keep, p1, m), "p2": jnp.where(keep, p2, p1), "p3": jnp.where(keep, p3, p2),
                "count": jnp.minimum(count + 1, 4)}
