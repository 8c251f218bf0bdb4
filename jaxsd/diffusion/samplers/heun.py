"""Heun's second-order method (k-diffusion's `sample_heun`, s_churn = 0), as diffusers'
HeunDiscreteScheduler: two model calls per step, the last step a single Euler call.

diffusers lays the calls out as timesteps [t0, t1, t1, t2, t2, ..., t_{n-1}, t_{n-1}] (2n - 1 calls)
with the sigmas interleaved the same way; the tables follow that layout, so call `c` reads
sigma[c] and the state says whether it is a first (Euler) or a second (correction) call.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers.base import Sampler, State, Tables, by_prediction, refuse_unsupported
from jaxsd.diffusion.samplers.euler import init_noise_sigma, k_sigmas
from jaxsd.diffusion.schedule import NoiseSchedule

NO_ZERO_SNR = {"rescale_betas_zero_snr": False}  # the k-diffusion classes have no zero-SNR rescale


def interleave(sigmas: np.ndarray, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' second-order layout: sigmas [2n] = s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0 and
    timesteps [2n-1] = t0, t1, t1, ..., t_{n-1}, t_{n-1}."""
    sig = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    t = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
    return sig.astype(np.float32), t.astype(np.float32)


def x0_at(tables: Tables, x, m, sigma):
    """The k-diffusion denoised estimate for a model output `m` at noise level `sigma` (traced scalar)."""
    return by_prediction(tables, x - sigma * m, m * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1), m)


@dataclasses.dataclass(frozen=True)
class Heun(Sampler):
    """Heun steps on the diffusers sigmas, or on Karras sigmas with use_karras_sigmas (heun_karras)."""

    name = "heun"
    order = 2

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        refuse_unsupported(schedule, self.name, {**NO_ZERO_SNR, "clip_sample": False})
        t, sigmas = k_sigmas(schedule, num_steps)
        sig, t2 = interleave(sigmas, t)
        s = sig[:-1]
        return {"timesteps": t2, "init_sigma": init_noise_sigma(schedule, sigmas), "noise_a": np.ones_like(s),
                "noise_s": s, "sig": sig, "in_scale": (s ** 2 + np.float32(1)) ** np.float32(0.5)}

    def init_state(self, x):
        z = jnp.zeros_like(x)
        return {"x": x, "x_first": z, "d_first": z, "dt": jnp.zeros((), jnp.float32),
                "second": jnp.zeros((), jnp.bool_)}

    def model_input(self, tables: Tables, i, x):
        return x / tables["in_scale"][i]

    def step(self, state: State, m, tables: Tables, i, noise) -> State:
        x, second, sig = state["x"], state["second"], tables["sig"]
        # both calls evaluate at sig[i]: a first call's start, a second call's end (diffusers' sigma_next)
        d = (x - x0_at(tables, x, m, sig[i])) / sig[i]
        dt = sig[i + 1] - sig[i]
        x_first = x + d * dt
        x_second = state["x_first"] + ((state["d_first"] + d) / 2) * state["dt"]
        return {"x": jnp.where(second, x_second, x_first), "x_first": x, "d_first": d, "dt": dt,
                # the last call (to sigma 0) has no second half
                "second": ~second & (sig[i + 1] > 0)}
