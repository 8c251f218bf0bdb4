"""Step-by-step sampler parity with diffusers' schedulers: the shared stand-in model and runners.

The same deterministic stand-in model (a smooth function of the scaled input and the
timestep) drives one diffusers scheduler and our jitted loop; stochastic samplers get the
same per-call noise on both sides (diffusers' randn replaced, or `variance_noise`, or its
noise sampler). One compiled loop per static sampler is reused across schedule configs.
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers import DIFFUSERS_EQUIVALENT, denoise, make_sampler
from jaxsd.diffusion.schedule import NoiseSchedule

SHAPE = (2, 4, 6, 6)  # NCHW for diffusers; we run the same array as is (the stand-in model is elementwise)
BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}

# diffusers' randn_tensor stand-in hands out these, in order (see `replay_randn_tensor`)
QUEUE: list[np.ndarray] = []


def model_np(x, t, lib):
    """Stand-in denoiser: depends on x and t smoothly, outputs O(1) like a real eps/v model."""
    return 0.9 * x + 0.3 * lib.sin(2.0 * x + t / 150.0) - 0.05 * lib.cos(t / 90.0)


def replay_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
    """Stands in for diffusers' randn_tensor: hands out the test's pre-drawn noise, in order."""
    import torch
    return torch.from_numpy(QUEUE.pop(0)).to(dtype or torch.float32)


def diffusers_scheduler(name: str, config: dict):
    """diffusers' scheduler for our sampler `name`: `Class.from_config(config, **overrides)`."""
    import diffusers
    cls_name, overrides = DIFFUSERS_EQUIVALENT[name]
    if cls_name == "DPMSolverSDEScheduler":
        return dpmsolver_sde_class().from_config(config, **overrides)
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def dpmsolver_sde_class():
    """diffusers' DPMSolverSDEScheduler, also where torchsde is not installed (it is not here, and PyPI's
    wheel would have to go into the shared venv): the module imports torchsde only for its Brownian-tree
    noise sampler, which `diffusers_run` replaces with our noise, so an empty stand-in module suffices."""
    try:
        import torchsde  # noqa: F401
    except ImportError:
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler
    return DPMSolverSDEScheduler


def used_noise(tables: dict, noises: np.ndarray) -> np.ndarray:
    """The noise each call of our loop adds (dpmpp_sde correlates a step's two draws; others: as drawn)."""
    if "rho" not in tables:
        return noises
    out, prev = np.zeros_like(noises), np.zeros_like(noises[0])
    for i in range(len(noises)):
        prev = tables["rho"][i] * prev + tables["rho_c"][i] * noises[i]
        out[i] = prev
    return out


def diffusers_run(name, config, steps, x_init, noises, eta=0.0, tables=None):
    """Latents after every diffusers scheduler call [calls, *SHAPE], and the scheduler.

    noises [calls, *SHAPE]: this run's per-call noise; `tables` (ours) for samplers that combine draws."""
    import torch
    sched = diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    noise = used_noise(tables, noises) if tables is not None else noises
    if name.startswith("dpmpp_sde"):
        sched.noise_sampler = lambda sigma, sigma_next: torch.from_numpy(QUEUE.pop(0))
    x = torch.from_numpy(x_init) * sched.init_noise_sigma
    out = []
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        m = model_np(x_in, t.to(torch.float32), torch)
        kwargs = {}
        if name == "ddim":
            kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noise[i])} if eta > 0 else {"eta": 0.0}
        elif "_sde" in name and name.startswith("dpmpp_") and not name.startswith("dpmpp_sde"):
            kwargs = {"variance_noise": torch.from_numpy(noise[i])}
        QUEUE[:] = [noise[i]]
        x = sched.step(m, t, x, **kwargs).prev_sample
        out.append(x.numpy().copy())
    return np.stack(out), sched


@functools.cache
def compiled_loop(sampler):
    """One jitted loop per static sampler (name + prediction type); tables are traced arguments."""
    def run(tables, x_init, noises):
        x = x_init * tables["init_sigma"]
        return denoise(sampler, tables, lambda x_in, t: model_np(x_in, t, jnp), x, noises=noises, record=True)[1]
    return jax.jit(run)


def ours_run(name, config, steps, x_init, noises, eta=0.0):
    """Our latents after every call [calls, *SHAPE], and the tables."""
    schedule = NoiseSchedule.from_config(config)
    opts = {"eta": eta} if name == "ddim" else {}
    sampler, tables = make_sampler(name, schedule, steps, **opts)
    return np.asarray(compiled_loop(sampler)(tables, jnp.asarray(x_init), jnp.asarray(noises))), tables


def draws(seed: int, calls: int) -> tuple[np.ndarray, np.ndarray]:
    """(initial latents [*SHAPE], per-call noise [calls, *SHAPE]) of one test case."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal((calls,) + SHAPE).astype(np.float32)
