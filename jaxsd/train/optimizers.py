"""Optimizers and learning-rate schedules from the `optimizer:` config section.

Every optimizer is global-norm clipping → <optimizer with decoupled weight decay>, with the
train step's NaN skip built in (see `make_optimizer`).
Weight decay applies only to params with two or more dimensions (dense/conv
kernels, embeddings): never to norm scales or biases, which are all 1-D.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxsd.config import OptimizerConfig
from jaxsd.train.fused_adamw import adamw_8bit, fused_adamw


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


def decays(param: Any) -> bool:
    """Whether a param gets weight decay: ≥2-D (kernels, embeddings), not norms and biases."""
    return param.ndim >= 2


def decay_mask(params: Any) -> Any:
    """`decays` of every param, as a tree of bools."""
    return jax.tree.map(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformationExtraArgs,
                                                                    optax.Schedule]:
    """(optimizer, lr schedule). The optimizer expects `params` in `update` (weight decay needs them).

    Its `update(grads, state, params, *, grad_norm=None, apply=None)` also takes the global
    gradient norm the train step already has (for clipping) and `apply` (bool scalar; False
    = skip: updates exactly 0, state unchanged). AdamW and 8-bit AdamW do this in one fused
    pass (`fused_adamw`); the others through the generic `guarded` wrapper.
    """
    lr = learning_rate_schedule(cfg, total_steps)
    wd, clip = cfg.weight_decay, cfg.clip_grad_norm
    if cfg.name == "adamw":
        return fused_adamw(lr, cfg.b1, cfg.b2, cfg.eps, wd, decay_mask, clip), lr
    if cfg.name == "adamw8bit":
        return adamw_8bit(lr, cfg.b1, cfg.b2, cfg.eps, wd, decay_mask, cfg.block_size, clip_grad_norm=clip), lr
    if cfg.name == "adafactor":
        base = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    elif cfg.name == "lion":
        base = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
    elif cfg.name == "sgd":
        base = optax.chain(optax.add_decayed_weights(wd, decay_mask), optax.sgd(lr, momentum=cfg.momentum))
    else:
        raise ValueError(f"optimizer.name {cfg.name!r} unknown; use adamw, adamw8bit, adafactor, lion or sgd")
    return guarded(in_float32(base), clip), lr


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` run on fp32 views of the params and gradients: optax keeps statistics (Adafactor's factored
    second moments, Lion's momentum) in the param dtype, and bfloat16 statistics lose what they average;
    the updates come out fp32 for `jaxsd.train.rounding` to round into bfloat16 params. fp32 params: `tx`."""
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    return optax.GradientTransformationExtraArgs(
        lambda params: tx.init(f32(params)),
        lambda grads, state, params=None, **extra: tx.update(f32(grads), state, None if params is None else f32(params),
                                                             **extra))


def applied_updates(opt_state: Any) -> jax.Array:
    """int32 []: the updates the optimizer has applied (skipped steps do not count) — the position its
    learning-rate schedule is at. Read from the state's `count` (every optimizer here has one)."""
    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
              if path and getattr(path[-1], "name", None) == "count"]
    if not counts:
        raise ValueError("optimizer state has no `count`: cannot tell which learning rate was applied")
    return counts[0]


def streams_updates(cfg: OptimizerConfig) -> bool:
    """Whether the train step streams its update (`make_train_step(streamed=True)`): only without
    global-norm clipping, which needs every gradient before the first update, and not for 8-bit
    AdamW, whose chunked updates XLA:CPU defers instead of streaming them (SD1.5, docs/benchmarks.md:
    more temporaries and a slower step than the guarded step). The guarded step also checks the
    gradient, not only the loss, for NaN/inf before it updates."""
    return cfg.clip_grad_norm is None and cfg.name != "adamw8bit"


def scaled_groups(tx: optax.GradientTransformationExtraArgs, scales: dict[str, float],
                  ) -> optax.GradientTransformationExtraArgs:
    """`tx` with the updates of params[key] multiplied by scales[key] (params: a dict keyed by component,
    {"unet": ..., "text_encoder": ...}): a learning rate of lr·scale with lr's schedule for that group.

    Exact for every optimizer here, whose update is linear in the learning rate (AdamW's decoupled weight
    decay too: -lr·(m̂/(√v̂+ε) + wd·p)); the optimizer state, 8-bit moment groups included, is untouched."""
    def update_fn(grads, state, params=None, **extra):
        updates, state = tx.update(grads, state, params, **extra)
        return {k: jax.tree.map(lambda u, s=scales[k]: u * jnp.asarray(s, u.dtype), v) if k in scales else v
                for k, v in updates.items()}, state

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def guarded(tx: optax.GradientTransformation, clip_grad_norm: float | None = None,
            ) -> optax.GradientTransformationExtraArgs:
    """Any optax optimizer behind the `grad_norm=` / `apply=` interface of `make_optimizer`.

    Clipping scales the gradients; a skipped step zeroes them first (so nothing non-finite
    flows) and then selects the old state and zero updates. Correct for any optimizer, but
    the selects cost XLA a whole-state temporary that `fused_adamw` avoids.
    """
    def update_fn(grads, state, params=None, *, grad_norm=None, apply=None, **_):
        ok = jnp.asarray(True if apply is None else apply)
        if clip_grad_norm is not None:
            norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
            scale = jnp.where(norm < clip_grad_norm, 1.0, clip_grad_norm / norm)  # as optax.clip_by_global_norm
            grads = jax.tree.map(lambda g: g * jnp.where(ok, scale, 0.0).astype(g.dtype), grads)
        if apply is None:
            return tx.update(grads, state, params)
        grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
        updates, new_state = tx.update(grads, state, params)
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        return updates, jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
