"""Linear multistep (k-diffusion's `sample_lms`, order 4), as diffusers' LMSDiscreteScheduler.

The Adams-Bashforth coefficients integrate the Lagrange basis over [sigma_i, sigma_{i+1}];
they depend only on the sigmas, so they are host tables [n, 4] (diffusers integrates them
numerically; the basis is a polynomial, integrated here exactly). As in diffusers the order
at step i is min(i + 1, 4) by index; derivatives not seen yet (img2img's late start) are zero.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from numpy.polynomial import Polynomial

from jaxsd.diffusion.samplers.base import Sampler, State, Tables, refuse_unsupported
from jaxsd.diffusion.samplers.euler import init_noise_sigma, k_sigmas
from jaxsd.diffusion.samplers.heun import NO_ZERO_SNR, x0_at
from jaxsd.diffusion.schedule import NoiseSchedule

LMS_ORDER = 4  # diffusers' step(order=4) default, what its pipelines use


def lms_coefficients(sigmas: np.ndarray, order: int = LMS_ORDER) -> np.ndarray:
    """float32 [n, order]: coefficient k of step i multiplies the derivative of step i - k."""
    s = sigmas.astype(np.float64)
    n = len(sigmas) - 1
    out = np.zeros((n, order), np.float64)
    for i in range(n):
        o = min(i + 1, order)
        for k in range(o):
            others = [s[i - j] for j in range(o) if j != k]
            basis = Polynomial.fromroots(others) / np.prod([s[i - k] - r for r in others]) if others else Polynomial([1.0])
            integral = basis.integ()
            out[i, k] = integral(s[i + 1]) - integral(s[i])
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LMS(Sampler):
    """Fourth-order linear multistep on the diffusers sigmas, or Karras sigmas (lms_karras)."""

    name = "lms"

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, NO_ZERO_SNR)
        t, sigmas = k_sigmas(schedule, num_steps)
        s = sigmas[:-1]
        return {"timesteps": t, "init_sigma": init_noise_sigma(schedule, sigmas), "noise_a": np.ones_like(s),
                "noise_s": s, "sigma": s, "in_scale": (s ** 2 + np.float32(1)) ** np.float32(0.5),
                "coeffs": lms_coefficients(sigmas)}

    def init_state(self, x):
        z = jnp.zeros_like(x)
        return {"x": x, "d1": z, "d2": z, "d3": z}

    def model_input(self, tables: Tables, i, x):
        return x / tables["in_scale"][i]

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x, sigma, c = state["x"], tables["sigma"][i], tables["coeffs"][i]
        d0 = (x - x0_at(tables, x, m, sigma)) / sigma
        acc = c[0] * d0 + c[1] * state["d1"] + c[2] * state["d2"] + c[3] * state["d3"]
        return {"x": x + acc, "d1": d0, "d2": state["d1"], "d3": state["d2"]}
