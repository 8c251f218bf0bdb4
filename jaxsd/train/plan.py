"""What the train state of a config looks like, before any array exists.

`plan_state(cfg, mesh)` builds the model and optimizer of `cfg` and the sharded abstract
`TrainState` (ShapeDtypeStructs carrying their shardings): what the loop initialises or
restores into, what a resume compares against the checkpoint's own config, and what
`jaxsd export` restores from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxsd.config import Config
from jaxsd.train.model import build_unet, param_shapes, unet_config
from jaxsd.train.optimizers import make_optimizer
from jaxsd.train.sharding import param_shardings, train_state_shardings
from jaxsd.train.step import TrainState, init_state
from jaxsd.train.trainable import split_params


@dataclasses.dataclass
class StatePlan:
    """The model, optimizer and abstract train state of one config on one mesh."""

    module: Any
    param_shapes: Any
    param_shardings: Any
    tx: Any
    lr_fn: Any
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState


def plan_state(cfg: Config, mesh) -> StatePlan:
    """Model, optimizer and the sharded abstract TrainState of `cfg` on `mesh` (no allocation)."""
    module = build_unet(cfg.model, unet_config(cfg.model))
    shapes, logical = param_shapes(module)
    shardings = param_shardings(shapes, logical, mesh, dict(cfg.sharding.rules))
    t_shapes, f_shapes = split_params(shapes, cfg.train.trainable, cfg.train.frozen)
    t_shard, f_shard = split_params(shardings, cfg.train.trainable, cfg.train.frozen)
    tx, lr_fn = make_optimizer(cfg.optimizer, cfg.train.steps)
    ema = cfg.train.ema.enabled
    abstract = jax.eval_shape(lambda t, f: init_state(t, f, tx, cfg.train.seed, ema), t_shapes, f_shapes)
    state_sharding = train_state_shardings(abstract, t_shard, f_shard, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    return StatePlan(module, shapes, shardings, tx, lr_fn, abstract, state_sharding)


def fresh_state(cfg: Config, plan: StatePlan, params: Any) -> TrainState:
    """A new train state (fresh optimizer state, EMA = params) from full `params`, sharded as planned.

    `params` are donated: the state takes over their buffers instead of holding a second copy.
    """
    t_params, f_params = split_params(params, cfg.train.trainable, cfg.train.frozen)
    init = jax.jit(lambda t, f: init_state(t, f, plan.tx, cfg.train.seed, cfg.train.ema.enabled),
                   out_shardings=plan.state_shardings, donate_argnums=(0, 1))
    return init(t_params, f_params)
