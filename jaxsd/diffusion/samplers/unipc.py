"""UniPC (bh1/bh2, predict_x0) of order 1 or 2: a multistep predictor plus a corrector that
reuses the next step's model output, as diffusers' UniPCMultistepScheduler.

All coefficients — including the corrector's 2x2 linear solve — depend only on
the sigmas, so they are host tables; the jitted step picks order 1 or 2 per step
from the state (warm-up after the first step, lower order at the end).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers.base import Sampler, State, Tables, refuse_unsupported
from jaxsd.diffusion.samplers.dpm import (
    alpha_sigma_lambda,
    convert_to_x0,
    multistep_sigmas,
)
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError


def _bh_coeffs(hh: np.float32, solver_type: str, order: int) -> tuple[np.float32, np.float32, np.ndarray]:
    """(h_phi_1, B_h, b[order]) of the UniPC B(h) polynomial system, in float32 like diffusers."""
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - np.float32(1)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(h_phi_k * np.float32(factorial) / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - np.float32(1) / np.float32(factorial)
    return np.float32(h_phi_1), np.float32(b_h), np.asarray(b, np.float32)


@dataclasses.dataclass(frozen=True)
class UniPC(Sampler):
    """UniPC-p/c with solver_order ≤ 2 and the bh1/bh2 B(h)."""

    solver_order: int = 2
    lower_order_final: bool = True

    name = "unipc"

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule) -> UniPC:
        order = schedule.option("solver_order", 2)
        if order not in (1, 2):
            raise InputError(f"unipc: solver_order {order} is not supported (1 or 2)")
        return cls(solver_order=order,
                   lower_order_final=bool(schedule.option("lower_order_final", True)))

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, {"thresholding": False, "predict_x0": True, "solver_p": None,
                                                 "use_exponential_sigmas": False, "use_beta_sigmas": False,
                                                 "use_flow_sigmas": False, "use_dynamic_shifting": False})
        solver_type = schedule.option("solver_type", "bh2")
        if solver_type not in ("bh1", "bh2"):
            # diffusers maps DPM-Solver's solver types (midpoint/heun/...) to bh2 on from_config
            solver_type = "bh2"
        t, sigmas = multistep_sigmas(schedule, num_steps, karras=bool(schedule.option("use_karras_sigmas", False)))
        n = len(t)
        alpha, sig, lam = alpha_sigma_lambda(sigmas)
        f = np.float32
        tab = {k: np.zeros(n, np.float32) for k in (
            "p_cx", "p_cm", "p_cb", "p_rk", "c_cx", "c_cm", "c_cb", "c_rk", "c1_rho", "c2_rho0", "c2_rho1")}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i in range(n):
                # predictor from sigma_i to sigma_{i+1}
                h = lam[i + 1] - lam[i]
                h_phi_1, b_h, _ = _bh_coeffs(f(-h), solver_type, 1)
                tab["p_cx"][i] = sig[i + 1] / sig[i]
                tab["p_cm"][i] = alpha[i + 1] * h_phi_1
                tab["p_cb"][i] = alpha[i + 1] * b_h
                if i >= 1:
                    tab["p_rk"][i] = (lam[i - 1] - lam[i]) / h
                # corrector from sigma_{i-1} to sigma_i (runs at the start of step i)
                if i >= 1:
                    hc = lam[i] - lam[i - 1]
                    h_phi_1, b_h, b = _bh_coeffs(f(-hc), solver_type, 2)
                    tab["c_cx"][i] = sig[i] / sig[i - 1]
                    tab["c_cm"][i] = alpha[i] * h_phi_1
                    tab["c_cb"][i] = alpha[i] * b_h
                    tab["c1_rho"][i] = 0.5
                    if i >= 2:
                        rk = f((lam[i - 2] - lam[i - 1]) / hc)
                        tab["c_rk"][i] = rk
                        rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b.astype(np.float64))
                        tab["c2_rho0"][i], tab["c2_rho1"][i] = rho
        disabled = set(schedule.option("disable_corrector", []) or [])
        corrector_on = np.array([0.0 if (i - 1) in disabled else 1.0 for i in range(n)], np.float32)
        for k, v in tab.items():
            tab[k] = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        a_s, s_s = alpha[:-1], sig[:-1]
        tab.update(timesteps=t.astype(np.float32), init_sigma=np.float32(1.0), noise_a=a_s, noise_s=s_s,
                   alpha=a_s, sigma=s_s, corrector_on=corrector_on)
        return tab

    def init_state(self, x):
        z = jnp.zeros_like(x)
        return {"x": x, "m1": z, "m2": z, "last": z, "count": jnp.zeros((), jnp.int32),
                "order": jnp.zeros((), jnp.int32)}

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        tb = {k: v[i] for k, v in tables.items() if getattr(v, "ndim", 0) == 1}
        x, m1, m2, count = state["x"], state["m1"], state["m2"], state["count"]
        mc = convert_to_x0(tables, x, m, tb["alpha"], tb["sigma"])

        # corrector: refine x with this step's model output (m0 = previous output)
        base = tb["c_cx"] * state["last"] - tb["c_cm"] * m1
        d1_t = mc - m1
        corr1 = base - tb["c_cb"] * (tb["c1_rho"] * d1_t)
        d1s = (m2 - m1) / tb["c_rk"]
        corr2 = base - tb["c_cb"] * (tb["c2_rho0"] * d1s + tb["c2_rho1"] * d1_t)
        corrected = jnp.where(state["order"] >= 2, corr2, corr1)
        x = jnp.where((count > 0) & (tb["corrector_on"] > 0), corrected, x)

        # predictor of order min(solver_order, steps left, warm-up)
        n = tables["timesteps"].shape[0]
        order = jnp.minimum(self.solver_order, count + 1)
        if self.lower_order_final:
            order = jnp.minimum(order, n - i)
        pred1 = tb["p_cx"] * x - tb["p_cm"] * mc
        d1 = (m1 - mc) / tb["p_rk"]
        pred2 = pred1 - tb["p_cb"] * (0.5 * d1)
        x_next = jnp.where(order >= 2, pred2, pred1)
        return {"x": x_next, "m1": mc, "m2": m1, "last": x, "count": jnp.minimum(count + 1, self.solver_order),
                "order": order}
