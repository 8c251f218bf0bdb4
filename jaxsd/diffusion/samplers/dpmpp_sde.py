"""DPM++ SDE (k-diffusion's `sample_dpmpp_sde`, the single-step one), as diffusers' DPMSolverSDEScheduler.

Two model calls per step (Heun's layout: 2n - 1 calls, the last a plain Euler step to sigma 0):
an ancestral step to the log-sigma midpoint, then the full step from the stored sample with the
midpoint's model output. Every call but the last adds noise. diffusers draws it from a Brownian
tree over sigma (torchsde), so the second call's noise — the increment over the whole step — is
correlated with the first's (over its first half). We draw Gaussians per call and give the second
call ρ·n₁ + √(1-ρ²)·n₂ with ρ = √((σ - σ_mid) / (σ - σ_next)): the same joint distribution.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers.base import Sampler, State, Tables, refuse_unsupported
from jaxsd.diffusion.samplers.euler import init_noise_sigma, k_step_sigmas, sigma_space_train_sigmas
from jaxsd.diffusion.samplers.heun import NO_ZERO_SNR, interleave, x0_at
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.diffusion.timesteps import sigma_to_t
from jaxsd.errors import InputError


def _call_scalars(sig: np.ndarray, c: int) -> dict[str, np.float32]:
    """The float32 scalars of call c (even: first half, odd: second), in diffusers' operation order."""
    f = np.float32
    first = c % 2 == 0
    s, sn = (sig[c], sig[c + 1]) if first else (sig[c - 1], sig[c])
    t, tn = -np.log(s), -np.log(sn) if sn > 0 else f(np.inf)
    tp = t + (tn - t) * f(0.5)
    out = {"s_in": s if first else np.exp(-tp), "euler": f(sn == 0), "dt": sn - s, "s": s,
           "c_x": f(0), "c_0": f(0), "up": f(0), "rho": f(0), "rho_c": f(1)}
    if sn == 0:
        return out
    target = tp if first else tn
    sf, st = np.exp(-t), np.exp(-target)
    up = min(st, (st ** 2 * (sf ** 2 - st ** 2) / sf ** 2) ** f(0.5))
    down = (st ** 2 - up ** 2) ** f(0.5)
    at = -np.log(down)
    out.update(c_x=np.exp(-at) / np.exp(-t), c_0=np.expm1(t - at), up=up)
    if not first:  # Brownian increment over [σ, σ_next] given the one over [σ, σ_mid]
        rho = np.sqrt((s - np.exp(-tp)) / (s - sn))
        out.update(rho=rho, rho_c=np.sqrt(f(1) - rho * rho))
    return out


@dataclasses.dataclass(frozen=True)
class DPMSolverSDE(Sampler):
    """DPM++ SDE on the diffusers sigmas, or Karras sigmas with use_karras_sigmas (dpmpp_sde_karras)."""

    name = "dpmpp_sde"
    order = 2
    stochastic = True

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, NO_ZERO_SNR)
        if schedule.prediction_type == "sample":
            raise InputError("dpmpp_sde: prediction_type 'sample' is not supported (as in diffusers)")
        t, sig64 = k_step_sigmas(schedule, num_steps)
        sigmas = np.concatenate([sig64, [0.0]]).astype(np.float32)
        # the second calls' timesteps: the log-sigma midpoints, from the sigmas before float32 rounding
        lt = -np.log(sig64)
        mid = sigma_to_t(np.exp(-(lt[:-1] + np.diff(lt) * 0.5)), np.log(sigma_space_train_sigmas(schedule)))
        sig, t2 = interleave(sigmas, t)
        t2[1::2] = mid.astype(np.float32)
        per_call = [_call_scalars(sig, c) for c in range(len(t2))]
        tab = {k: np.asarray([p[k] for p in per_call], np.float32) for k in per_call[0]}
        s = sig[:-1]
        tab.update(timesteps=t2, init_sigma=init_noise_sigma(schedule, sigmas), noise_a=np.ones_like(s), noise_s=s,
                   in_scale=(tab["s_in"] ** 2 + np.float32(1)) ** np.float32(0.5))
        return tab

    def init_state(self, x):
        z = jnp.zeros_like(x)
        return {"x": x, "stored": z, "n_prev": z}

    def model_input(self, tables: Tables, i, x):
        return x / tables["in_scale"][i]

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x, tb = state["x"], {k: v[i] for k, v in tables.items() if getattr(v, "ndim", 0) == 1}
        x0 = x0_at(tables, x, m, tb["s_in"])
        second = (i % 2) == 1
        euler = x + ((x - x0) / tb["s"]) * tb["dt"]
        sample = jnp.where(second, state["stored"], x)
        used = tb["rho"] * state["n_prev"] + tb["rho_c"] * noise
        sde = tb["c_x"] * sample - tb["c_0"] * x0 + used * tb["up"]
        return {"x": jnp.where(tb["euler"] > 0, euler, sde), "stored": sample, "n_prev": used}

