"""Exponential moving average of the trainable params (sharded like them; exported with `--ema`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxsd.config import EMAConfig


def ema_decay(cfg: EMAConfig, num_updates: jax.Array) -> jax.Array:
    """Decay of the `num_updates`-th EMA update (1-based): min(decay, (1+n)/(10+n)) with warmup."""
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(cfg.decay, (1.0 + n) / (10.0 + n)) if cfg.warmup else jnp.asarray(cfg.decay, jnp.float32)


def update_ema(ema: Any, params: Any, step: jax.Array, cfg: EMAConfig) -> Any:
    """EMA after optimizer step `step` (1-based): updated on steps divisible by `cfg.every`, else unchanged."""
    do = (step % cfg.every) == 0
    d = ema_decay(cfg, step // cfg.every)
    return jax.tree.map(lambda e, p: jnp.where(do, d * e + (1.0 - d) * p.astype(e.dtype), e), ema, params)
