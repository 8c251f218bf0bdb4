"""Optimizers and learning-rate schedules from the `optimizer:` config section.

Every optimizer is `clip_by_global_norm → <optimizer with decoupled weight decay>`.
Weight decay applies only to params with two or more dimensions (dense/conv
kernels, embeddings): never to norm scales or biases, which are all 1-D.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxsd.config import OptimizerConfig
from jaxsd.train.adamw8bit import adamw_8bit


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant / linear / cosine decay to lr·min_lr_ratio
    at `total_steps`."""
    lr, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, floor, decay_steps)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        raise ValueError(f"optimizer.schedule {cfg.schedule!r} unknown; use constant, linear or cosine")
    if cfg.warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps), main], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for params that get weight decay: ≥2-D (kernels, embeddings); False for norms and biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, lr schedule). The optimizer expects `params` in `update` (weight decay needs them)."""
    lr = learning_rate_schedule(cfg, total_steps)
    wd = cfg.weight_decay
    if cfg.name == "adamw":
        base = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    elif cfg.name == "adamw8bit":
        base = adamw_8bit(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask,
                          block_size=cfg.block_size)
    elif cfg.name == "adafactor":
        base = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    elif cfg.name == "lion":
        base = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
    elif cfg.name == "sgd":
        base = optax.chain(optax.add_decayed_weights(wd, decay_mask), optax.sgd(lr, momentum=cfg.momentum))
    else:
        raise ValueError(f"optimizer.name {cfg.name!r} unknown; use adamw, adamw8bit, adafactor, lion or sgd")
    if cfg.clip_grad_norm is not None:
        base = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), base)
    return base, lr
