"""DPM-Solver++ 2M SDE and 3M SDE: diffusers' DPMSolverMultistepScheduler with
algorithm_type="sde-dpmsolver++" (midpoint), solver_order 2 or 3, Karras sigmas or not.

Every step adds fresh noise of size sigma_t·sqrt(1 - e^{-2h}); the noise is the loop's
per-step draw, so a test can hand diffusers the same noise (`step(variance_noise=...)`).
The order of each step follows diffusers: warm-up after the first steps (the state's count),
first order at the end (`lower_order_final` / final sigma zero), second order one before the
end for short schedules.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers.base import Sampler, State, Tables, as_f32, refuse_unsupported
from jaxsd.diffusion.samplers.dpm import (
    alpha_sigma_lambda,
    convert_to_x0,
    dpm_sigmas,
    first_order_final,
)
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError


@dataclasses.dataclass(frozen=True)
class DPMSolverPPSDE(Sampler):
    """SDE-DPM-Solver++ multistep of `solver_order` 2 (dpmpp_2m_sde[_karras]) or 3 (dpmpp_3m_sde[_karras])."""

    solver_order: int = 2

    stochastic = True

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"dpmpp_{self.solver_order}m_sde"

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule) -> DPMSolverPPSDE:
        order = schedule.option("solver_order", 2)
        if order not in (2, 3):
            raise InputError(f"sde-dpmsolver++: solver_order {order} is not supported (2 or 3)")
        return cls(solver_order=order)

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, {"solver_type": "midpoint"})
        t, sigmas = dpm_sigmas(schedule, num_steps, self.name)
        n = len(t)
        alpha, sig, lam = alpha_sigma_lambda(sigmas)
        f = np.float32
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam[1:] - lam[:-1]                                   # [n]
            e2h = np.exp(f(-2.0) * h)
            c_x = sig[1:] / sig[:-1] * np.exp(-h)
            c_d0 = alpha[1:] * (f(1) - e2h)
            c_noise = sig[1:] * np.sqrt(f(1) - e2h)
            # 3rd order: D1 and D2 weights (diffusers' sde-dpmsolver++ third-order update)
            c_d1_3 = alpha[1:] * ((f(1) - e2h) / (f(-2.0) * h) + f(1))
            c_d2_3 = alpha[1:] * ((f(1) - e2h - f(2.0) * h) / (f(2.0) * h) ** 2 - f(0.5))
            h0 = np.concatenate([[np.nan], lam[1:-1] - lam[:-2]])     # lambda_i - lambda_{i-1}
            h1 = np.concatenate([[np.nan, np.nan], lam[1:-2] - lam[:-3]])
            r0, r1 = h0 / h, h1 / h
        final = first_order_final(schedule, n)
        max_order = np.full(n, self.solver_order, np.int32)
        if final:
            max_order[-1] = 1
        if schedule.option("lower_order_final", True) and n < 15 and n >= 2:
            max_order[-2] = min(max_order[-2], 2)
        coeffs = {"c_x": c_x, "c_d0": c_d0, "c_noise": c_noise, "r0": r0, "r1": r1, "c_d1_3": c_d1_3,
                  "c_d2_3": c_d2_3}
        a_s, s_s = alpha[:-1], sig[:-1]
        tab = {"timesteps": t.astype(np.float32), "init_sigma": np.float32(1.0), "noise_a": a_s, "noise_s": s_s,
               "alpha": a_s, "sigma": s_s, "max_order": max_order}
        for k, v in coeffs.items():  # entries a step of that order never reads (warm-up, final sigma 0): 0
            tab[k] = as_f32(np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0))[0]
        return tab

    def init_state(self, x):
        z = jnp.zeros_like(x)
        return {"x": x, "m1": z, "m2": z, "count": jnp.zeros((), jnp.int32)}

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        tb = {k: v[i] for k, v in tables.items() if getattr(v, "ndim", 0) == 1}
        x, m1, m2, count = state["x"], state["m1"], state["m2"], state["count"]
        m0 = convert_to_x0(tables, x, m, tb["alpha"], tb["sigma"])
        order = jnp.minimum(jnp.minimum(count + 1, self.solver_order), tb["max_order"])
        base = tb["c_x"] * x + tb["c_d0"] * m0
        first = base + tb["c_noise"] * noise
        d1 = (1.0 / tb["r0"]) * (m0 - m1)
        second = base + 0.5 * tb["c_d0"] * d1 + tb["c_noise"] * noise
        out = jnp.where(order >= 2, second, first)
        if self.solver_order == 3:
            d1_0, d1_1 = d1, (1.0 / tb["r1"]) * (m1 - m2)
            d1_3 = d1_0 + (tb["r0"] / (tb["r0"] + tb["r1"])) * (d1_0 - d1_1)
            d2 = (1.0 / (tb["r0"] + tb["r1"])) * (d1_0 - d1_1)
            third = base + tb["c_d1_3"] * d1_3 + tb["c_d2_3"] * d2 + tb["c_noise"] * noise
            out = jnp.where(order >= 3, third, out)
        return {"x": out, "m1": m0, "m2": m1, "count": jnp.minimum(count + 1, self.solver_order)}
