"""The noise schedule of a diffusers `scheduler_config.json`, and the training helpers built on it.

A `NoiseSchedule` holds the training-time discretisation (betas, alphas_cumprod
over `num_train_timesteps`) and the raw scheduler options. Samplers
(`jaxsd.diffusion.samplers`) read the options they understand with their own
diffusers defaults — as `SomeScheduler.from_config(pipe.scheduler.config)` does —
so one folder config drives every sampler.

Numerics follow diffusers' PyTorch code: betas and alphas_cumprod are float32,
with the cumulative product accumulated in float64 and rounded once (PyTorch's CPU
cumprod does the same), so per-timestep values agree to the last bit or one ulp.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxsd.errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas discretising alpha_bar(t) = cos²((t + 0.008)/1.008 · π/2) (Nichol & Dhariwal)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has SNR exactly 0 (arXiv 2305.08891, Alg. 1)."""
    alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    sqrt_ac = np.sqrt(alphas_cumprod)
    first, last = sqrt_ac[0].copy(), sqrt_ac[-1].copy()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac ** 2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return (1.0 - alphas).astype(np.float32)


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 `torch.linspace(start, end, n)` as PyTorch's CPU kernel computes it: a float32 step,
    the first half counted up from `start` and the second down from `end`, each value rounded once
    (a fused multiply-add). numpy's float64 linspace rounded to float32 differs in a third of SD's
    betas by one ulp, which shifts fractional (Karras) timesteps by a few ulps."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    up = np.float64(start32) + step * i
    down = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, up, down).astype(np.float32)


def make_betas(config: dict[str, Any]) -> np.ndarray:
    """float32 betas [num_train_timesteps] from a diffusers scheduler config."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float32)
        if betas.shape != (n,):
            raise InputError(f"scheduler config: trained_betas has {betas.size} values but num_train_timesteps is {n}")
    elif kind == "linear":
        betas = linspace_f32(start, end, n)
    elif kind == "scaled_linear":
        # Linear in sqrt(beta), squared in float32 as diffusers does.
        betas = linspace_f32(start ** 0.5, end ** 0.5, n) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise InputError(f"scheduler config: beta_schedule {kind!r} is not supported; "
                         f"use one of {', '.join(BETA_SCHEDULES)} or give trained_betas")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Training discretisation + scheduler options of one diffusers scheduler config.

    Attributes:
      betas, alphas_cumprod: float32 numpy arrays [num_train_timesteps].
      prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample".
      config: the raw scheduler config dict (samplers read their options from it).
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    prediction_type: str
    config: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> NoiseSchedule:
        """Build from a diffusers `scheduler_config.json` dict (keys such as `_class_name` are ignored).

        `overrides` replace config keys, like `from_config(config, prediction_type=...)` in diffusers.
        """
        config = {**config, **overrides}
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"scheduler config: prediction_type {prediction_type!r} is not supported; "
                             f"use one of {', '.join(PREDICTION_TYPES)}")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in TIMESTEP_SPACINGS:
            raise InputError(f"scheduler config: timestep_spacing {spacing!r} is not supported; "
                             f"use one of {', '.join(TIMESTEP_SPACINGS)}")
        betas = make_betas(config)
        alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
        return cls(betas=betas, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type, config=config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def option(self, name: str, default: Any) -> Any:
        """A scheduler option, or the sampler's own diffusers default when the config lacks it."""
        value = self.config.get(name, default)
        return default if value is None and default is not None else value

    # ---- training helpers (jit-friendly; t is an int array [B]) ----

    def _coeffs(self, t: jnp.ndarray, ndim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        ac = jnp.asarray(self.alphas_cumprod)[t]
        shape = ac.shape + (1,) * (ndim - ac.ndim)
        return jnp.sqrt(ac).reshape(shape), jnp.sqrt(1.0 - ac).reshape(shape)

    def add_noise(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise.  x0, noise: [B, ...]; t: int [B]."""
        a, s = self._coeffs(t, x0.ndim)
        return (a * x0 + s * noise).astype(x0.dtype)

    def velocity(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """v-prediction target v_t = sqrt(ᾱ_t)·noise - sqrt(1-ᾱ_t)·x0.  Shapes as `add_noise`."""
        a, s = self._coeffs(t, x0.ndim)
        return (a * noise - s * x0).astype(x0.dtype)

    def target(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """What the model should predict for this schedule's prediction_type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def predict_x0(self, noisy: jnp.ndarray, model_output: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """The clean sample a model output implies at x_t = `noisy`, for this schedule's prediction_type:
        ε: (x_t − sqrt(1-ᾱ_t)·ε̂) / sqrt(ᾱ_t);  v: sqrt(ᾱ_t)·x_t − sqrt(1-ᾱ_t)·v̂;  sample: the output itself.
        Shapes as `add_noise`; computed in fp32. At ᾱ_t = 0 (a zero-terminal-SNR schedule's last step) an ε
        prediction says nothing of x0: there the division by sqrt(ᾱ_t) is left out, so values and gradients stay
        finite (the result is meaningless there; callers leave such steps out)."""
        noisy, model_output = noisy.astype(jnp.float32), model_output.astype(jnp.float32)
        if self.prediction_type == "sample":
            return model_output
        a, s = self._coeffs(t, noisy.ndim)
        if self.prediction_type == "v_prediction":
            return a * noisy - s * model_output
        return (noisy - s * model_output) / jnp.where(a > 0, a, 1.0)

    def snr(self, t: jnp.ndarray) -> jnp.ndarray:
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t) per timestep; t: int [B] → float32 [B] (0 at a zero-SNR end)."""
        ac = jnp.asarray(self.alphas_cumprod)[t]
        return ac / (1.0 - ac)
