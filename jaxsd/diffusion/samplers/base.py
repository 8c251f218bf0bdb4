"""The sampler contract and the one denoising loop every sampler runs in.

A sampler is split in two:
  * `tables(schedule, num_steps)` — host-side numpy, once per (schedule, steps):
    every per-step scalar (timesteps, sigmas, solver coefficients) precomputed
    with diffusers' own float32 arithmetic, so the jitted step only combines arrays.
  * `step(state, model_output, tables, i, noise)` — pure jnp over a small state
    pytree (`{"x": latents, ...}` plus what multistep solvers remember).

Tables are jit *arguments* (not constants), so spacing, offsets, eta or another
checkpoint's betas never recompile; only (sampler, steps, shapes) do. `denoise`
runs the whole loop as one `lax.fori_loop` with a traced start index, which is
how img2img's `strength` skips the first steps without recompiling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError

Tables = dict[str, Any]
State = dict[str, Any]
# model_fn(x_in [B,...], t scalar float32) -> model output [B,...]
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


PREDICTION_CODES = {"epsilon": 0, "v_prediction": 1, "sample": 2}


def by_prediction(tables: Tables, epsilon, v_prediction, sample):
    """Select the branch of the schedule's prediction type (`tables["prediction"]`, traced).

    Each branch keeps diffusers' operation order, and `where` selects bit-exactly, so
    epsilon and v-prediction models (SD1 and SD2) share one compiled program.
    """
    p = tables["prediction"]
    return jnp.where(p == 0, epsilon, jnp.where(p == 1, v_prediction, sample))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static description of one sampler; hashable so it can be a jit static argument.

    Subclasses set `name`, `stochastic` and implement `tables`, `step` (and
    `init_state` / `model_input` when they need more than the defaults). What the
    model predicts is not part of it: that is the traced `tables["prediction"]`.
    """

    name = "base"
    stochastic = False  # True: `step` consumes a fresh standard-normal `noise` every step
    # diffusers' `scheduler.order`: model calls per step of the second-order samplers (Heun, DPM++ SDE),
    # whose tables have one entry per model call; img2img starts at call `start_step * order`.
    order = 1

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule) -> Sampler:
        return cls()

    def tables(self, schedule: NoiseSchedule, num_steps: int) -> Tables:
        """Per-step arrays. Always has "timesteps" [n] (model input t), "init_sigma" [] (scale of the
        initial noise), and "noise_a", "noise_s" [n]: the img2img start x = noise_a[i]·x0 + noise_s[i]·noise."""
        raise NotImplementedError

    def progress_steps(self, num_calls: int) -> np.ndarray:
        """int32 [num_calls]: the index of the last step finished after each model call (the progress bar)."""
        return np.arange(num_calls, dtype=np.int32) // self.order

    def init_state(self, x: jnp.ndarray) -> State:
        return {"x": x}

    def model_input(self, tables: Tables, i: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
        return x

    def step(self, state: State, model_output: jnp.ndarray, tables: Tables, i: jnp.ndarray,
             noise: jnp.ndarray | None) -> State:
        raise NotImplementedError


def rounded(product: jnp.ndarray, tables: Tables) -> jnp.ndarray:
    """`product`, rounded to float32 before whatever adds it.

    XLA:CPU contracts `a + b*c` into one fused multiply-add (one rounding instead of
    two). That is more accurate, but where diffusers' float32 update cancels badly
    (zero-SNR Euler starts at sigma = 4096) the difference is 1e-5 relative. Adding
    the runtime zero `tables["zero"]` turns the multiply into fma(b, c, 0) — exactly
    PyTorch's rounded product — and XLA cannot fold it away because it is an input.
    """
    return product + tables["zero"]


def refuse_unsupported(schedule: NoiseSchedule, name: str, options: dict[str, Any]) -> None:
    """Error for a scheduler option this sampler does not implement (never silently ignored).
    options: option name -> the only value supported (compared with the config's, default applied)."""
    for key, ok in options.items():
        value = schedule.option(key, ok)
        if value != ok:
            raise InputError(f"{name}: scheduler option {key}={value!r} is not supported (only {ok!r})")


def as_f32(*values: Any) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(v, dtype=np.float32) for v in values)


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first step img2img runs (diffusers' get_timesteps): strength 1 → 0, strength 0 → num_steps."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength}")
    init = min(int(num_steps * strength), num_steps)
    return max(num_steps - init, 0)


def noise_to_start(tables: Tables, x0: jnp.ndarray, noise: jnp.ndarray, start: jnp.ndarray) -> jnp.ndarray:
    """img2img: noise clean latents x0 to the level of step `start` (the sampler's own add_noise).

    start == n (strength 0) runs no step: x0 comes back unchanged."""
    a = jnp.concatenate([jnp.asarray(tables["noise_a"]), jnp.ones((1,), jnp.float32)])[start]
    s = jnp.concatenate([jnp.asarray(tables["noise_s"]), jnp.zeros((1,), jnp.float32)])[start]
    return a * x0 + s * noise


def denoise(sampler: Sampler, tables: Tables, model_fn: ModelFn, x: jnp.ndarray, *,
            start: jnp.ndarray | int = 0, key: jax.Array | None = None, noises: jnp.ndarray | None = None,
            record: bool = False, progress: Callable[[Any], None] | None = None):
    """Run model calls start..n-1 of `sampler` from latents `x` (already at the noise level of call `start`).

    n = len(tables["timesteps"]): one entry per model call (steps × `sampler.order`, give or take
    diffusers' own first/last-step conventions).

    key: PRNG key for stochastic samplers (per-step noise = normal(fold_in(key, i))).
    noises: [n, *x.shape] explicit per-step noise instead (to reproduce another implementation's draws).
    record: also return the latents after every step, [n, *x.shape] (zeros for skipped steps).
    progress: host callback called after each model call (via jax.debug.callback) with the index of the
      last finished step (`tables["progress_step"]`, as `make_sampler` builds it; else the call index).
    Returns x, or (x, trajectory) when record.
    """
    n = tables["timesteps"].shape[0]
    if sampler.stochastic and key is None and noises is None:
        raise ValueError(f"sampler {sampler.name!r} is stochastic: pass a PRNG key (or explicit noises)")
    timesteps = jnp.asarray(tables["timesteps"])
    state = sampler.init_state(x)
    traj = jnp.zeros((n,) + x.shape, x.dtype) if record else None

    def body(i, carry):
        state, traj = carry
        x_in = sampler.model_input(tables, i, state["x"])
        out = model_fn(x_in, timesteps[i]).astype(jnp.float32)
        noise = None
        if sampler.stochastic:
            noise = noises[i] if noises is not None else jax.random.normal(
                jax.random.fold_in(key, i), x.shape, jnp.float32)
        state = sampler.step(state, out, tables, i, noise)
        if record:
            traj = jax.lax.dynamic_update_index_in_dim(traj, state["x"], i, 0)
        if progress is not None:
            jax.debug.callback(progress, tables["progress_step"][i] if "progress_step" in tables else i)
        return state, traj

    state, traj = jax.lax.fori_loop(start, n, body, (state, traj))
    return (state["x"], traj) if record else state["x"]
