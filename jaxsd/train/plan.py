"""What the train state of a config looks like, before any array exists.

`plan_state(cfg, mesh)` builds the model and optimizer of `cfg` and the sharded abstract
`TrainState` (ShapeDtypeStructs carrying their shardings): what the loop initialises or
restores into, what a resume compares against the checkpoint's own config, and what
`jaxsd export` restores from. `plan_train_step(cfg, plan, mesh)` is the pure step function
`jaxsd train` jits over that state (also what `jaxsd bench train-step` measures).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxsd.config import Config
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.models.lora import adapter_logical_axes
from jaxsd.train.adapters import AdapterPlan, adapter_plan, initial_adapters
from jaxsd.train.model import build_unet, make_apply_fn, param_shapes, unet_config
from jaxsd.train.optimizers import make_optimizer, streams_updates
from jaxsd.train.sharding import micro_batch_sharding, param_shardings, train_state_shardings
from jaxsd.train.step import TrainState, init_state, make_train_step
from jaxsd.train.trainable import merge_params, split_params


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
    adapters: AdapterPlan | None = None  # LoRA runs: the adapters train, the whole UNet is frozen
    base_dtype: Any = None  # dtype of the frozen params as loaded

    def variables(self, trainable: Any, frozen: Any) -> Any:
        """What the step's apply_fn takes: the full params, or (LoRA) {"params": base, "lora": adapters}."""
        if self.adapters is None:
            return merge_params(trainable, frozen)
        return {"params": frozen, "lora": self.adapters.variables(trainable)}

    def merged(self, trainable: Any, frozen: Any) -> Any:
        """The full UNet params (LoRA: adapters folded in): what sample grids and exports use."""
        return merge_params(trainable, frozen) if self.adapters is None else self.adapters.merged(trainable, frozen)


def plan_state(cfg: Config, mesh) -> StatePlan:
    """Model, optimizer and the sharded abstract TrainState of `cfg` on `mesh` (no allocation)."""
    module = build_unet(cfg.model, unet_config(cfg.model))
    shapes, logical = param_shapes(module)
    shardings = param_shardings(shapes, logical, mesh, dict(cfg.sharding.rules))
    rules = dict(cfg.sharding.rules)
    adapters, base_dtype = None, jnp.dtype(cfg.model.param_dtype)
    if cfg.lora.enabled:
        adapters = adapter_plan(cfg, shapes)
        base_dtype = jnp.dtype(cfg.lora.base_dtype or cfg.model.param_dtype)
        t_shapes = adapters.shapes(jnp.dtype(cfg.model.param_dtype))
        t_shard = param_shardings(t_shapes, adapter_logical_axes(logical, t_shapes), mesh, rules)
        f_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype), shapes)
        f_shard = shardings
    else:
        t_shapes, f_shapes = split_params(shapes, cfg.train.trainable, cfg.train.frozen)
        t_shard, f_shard = split_params(shardings, cfg.train.trainable, cfg.train.frozen)
    tx, lr_fn = make_optimizer(cfg.optimizer, cfg.train.steps)
    ema = cfg.train.ema.enabled
    abstract = jax.eval_shape(lambda t, f: init_state(t, f, tx, cfg.train.seed, ema), t_shapes, f_shapes)
    state_sharding = train_state_shardings(abstract, t_shard, f_shard, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    return StatePlan(module, shapes, shardings, tx, lr_fn, abstract, state_sharding, adapters, base_dtype)


def fresh_state(cfg: Config, plan: StatePlan, params: Any) -> TrainState:
    """A new train state (fresh optimizer state, EMA = params) from full `params`, sharded as planned.
    LoRA: `params` are the frozen base; the adapters start fresh (up = 0: step 0 is the base).

    `params` are donated: the state takes over their buffers instead of holding a second copy.
    """
    if plan.adapters is not None:
        t_params = initial_adapters(cfg, plan.adapters, plan.param_shapes, plan.state_shardings.params)
        f_params = params
    else:
        t_params, f_params = split_params(params, cfg.train.trainable, cfg.train.frozen)
    init = jax.jit(lambda t, f: init_state(t, f, plan.tx, cfg.train.seed, cfg.train.ema.enabled),
                   out_shardings=plan.state_shardings, donate_argnums=(0, 1))
    return init(t_params, f_params)


def plan_train_step(cfg: Config, plan: StatePlan, mesh, empty_cond: Any = None) -> Callable:
    """The pure step `(state, batch) -> (state, metrics)` of `cfg` over `plan`'s state, as `jaxsd train`
    runs it. empty_cond: the empty prompt's cached embedding (needed when loss.cond_dropout > 0)."""
    schedule = NoiseSchedule.from_config(cfg.diffusion.to_scheduler_config())
    return make_train_step(make_apply_fn(plan.module, variables=plan.adapters is not None), schedule, cfg.loss,
                           plan.tx, plan.lr_fn, combine=plan.variables,
                           ema_cfg=cfg.train.ema, grad_accum_steps=cfg.train.grad_accum_steps,
                           empty_cond=None if empty_cond is None else jax.tree.map(jnp.asarray, empty_cond),
                           micro_batch_sharding=micro_batch_sharding(mesh) if mesh.size > 1 else None,
                           streamed=streams_updates(cfg.optimizer))
