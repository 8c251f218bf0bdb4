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


def update_ema(ema: Any, params: Any, step: jax.Array, cfg: EMAConfig, apply: jax.Array | bool = True) -> Any:
    """EMA after optimizer step `step` (1-based): updated on steps divisible by `cfg.every` when
    `apply` (False: a skipped, non-finite step), else unchanged.

    Unchanged = decay 1: e·1 + p·0 rewrites e with itself, which XLA does in place; selecting
    between old and new EMA would cost a temporary the size of the model.
    """
    do = ((step % cfg.every) == 0) & apply
    d = jnp.where(do, ema_decay(cfg, step // cfg.every), 1.0)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(e.dtype), ema, params)
