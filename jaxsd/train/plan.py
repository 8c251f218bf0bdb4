"""What the train state of a config looks like, before any array exists.

`plan_state(cfg, mesh)` builds the model and optimizer of `cfg` and the sharded abstract
`TrainState` (ShapeDtypeStructs carrying their shardings): what the loop initialises or
restores into, what a resume compares against the checkpoint's own config, and what
`jaxsd export` restores from. `plan_train_step(cfg, plan, mesh)` is the pure step function
`jaxsd train` jits over that state (also what `jaxsd bench train-step` measures), and
`compiled_train_steps` that step jitted and compiled as the loop runs it (also what `jaxsd bench
host-overhead` times back to back).

With a token-id cache the text encoders run in the step (`jaxsd.train.text`): the state's frozen
tree is keyed by component, {"unet": ..., "text_encoder": ..., ...}, and so is its trainable tree
when the text encoders train (adapters: `lora.text_encoder`; `train.text_encoder: full`). `unet_parts` / `text_parts` take
those trees apart; everything that needs the UNet alone goes through them. With `loss.perceptual` on, the frozen
tree is keyed by component too: {"unet": ..., "perceptual": ...} (`jaxsd.train.perceptual`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import Config
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import ConfigError
from jaxsd.models.lora import adapter_logical_axes
from jaxsd.text.encode import PROJECTION_NAME
from jaxsd.train.adapters import AdapterPlan, adapter_plan, initial_adapters
from jaxsd.train.compile import CompiledSteps
from jaxsd.train.fused_update import fused_update_hook
from jaxsd.train.lora_init import adapters_from_file
from jaxsd.train.model import build_unet, describe, make_apply_fn, param_shapes, unet_config
from jaxsd.train.optimizers import make_optimizer, scaled_groups, streams_updates
from jaxsd.train.perceptual import PERCEPTUAL, StepPerceptual, load_perceptual, step_perceptual
from jaxsd.train.projection import (
    StepProjection,
    load_projection,
    projected_conditioning,
    step_projection,
)
from jaxsd.train.sharding import micro_batch_sharding, param_shardings, train_state_shardings
from jaxsd.train.step import TrainState, init_state, make_train_step
from jaxsd.train.text import (
    StepText,
    check_fits_unet,
    frozen_shapes,
    initial_text_adapters,
    load_text_params,
    step_text,
    text_conditioning,
    text_shardings,
    text_variables,
)
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
    text: StepText | None = None  # token-id caches: the text encoders the step runs
    projection: StepProjection | None = None  # raw T5 caches: the hybrid's text projection, trained
    perceptual: StepPerceptual | None = None  # loss.perceptual: the frozen VAE decoder and VGG16 the step runs

    @property
    def frozen_keyed(self) -> bool:
        """Whether the state's frozen tree is keyed by component ({"unet": ..., ...}) rather than the UNet's."""
        return self.text is not None or self.perceptual is not None

    def describe_trainable(self) -> str:
        """The run log's "trainable: X of Y" (X: the state's trained params; Y: the UNet's)."""
        lora = f" (LoRA adapters on {len(self.adapters.specs)} layers; the UNet is frozen)" if self.adapters else ""
        return f"{describe(self.abstract.params)} of {describe(self.param_shapes)}{lora}"

    def unet_parts(self, trainable: Any, frozen: Any) -> tuple[Any, Any]:
        """The UNet's (trainable, frozen) trees within the state's (or their shardings / abstract values)."""
        unet_frozen = frozen["unet"] if self.frozen_keyed else frozen
        if self.projection is not None:  # {"unet": ..., "text_projection": ...}
            return trainable["unet"], unet_frozen
        if self.text is None:
            return trainable, unet_frozen
        return (trainable["unet"] if self.text.trains else trainable), unet_frozen

    def conditioning(self, empty: Any = None) -> Callable | None:
        """`make_train_step(encode_text=...)`: token ids through the text side (`jaxsd.train.text`), or cached
        T5 states through the trained projection (`jaxsd.train.projection`); None: cached embeddings as they are.
        empty: the empty caption as the cache holds it (cond_dropout)."""
        if self.text is not None:
            return text_conditioning(self.text, self.text_parts, empty)
        if self.projection is not None:
            return projected_conditioning(self.projection, empty)
        return None

    def text_shardings(self) -> dict[str, Any]:
        """{component: shardings of all its params} of the text side, trained and frozen parts together."""
        sh = self.state_shardings
        trained = sh.params if self.text.trains else {}
        return {c: merge_params(trained.get(c, {}), sh.frozen.get(c, {})) if self.text.full is not None
                else sh.frozen[c] for c in self.text.components}

    def text_parts(self, trainable: Any, frozen: Any, draws: Any = None) -> tuple[dict, dict | None]:
        """The text side's (params, {"lora": ...} or None) within the state's trees (`encode_token_ids`' arguments);
        draws: the step's `model_draws` (LoRA dropout)."""
        return text_variables(self.text, trainable, frozen, draws)

    def variables(self, trainable: Any, frozen: Any, draws: Any = None) -> Any:
        """What the step's apply_fn takes: the full params, or (LoRA) {"params": base, "lora": adapters}
        (+ "lora_dropout" from the step's `model_draws`)."""
        trainable, frozen = self.unet_parts(trainable, frozen)
        if self.adapters is None:
            return merge_params(trainable, frozen)
        variables = {"params": frozen, "lora": self.adapters.variables(trainable)}
        if draws is not None:
            variables["lora_dropout"] = self.adapters.dropout_variables(draws)
        return variables

    def load_perceptual(self, cfg: Config) -> dict:
        """The frozen "perceptual" tree (loss.perceptual), read and placed with its shardings."""
        return load_perceptual(cfg, self.perceptual, self.base_dtype, self.state_shardings.frozen[PERCEPTUAL])

    @property
    def model_draws(self) -> Any:
        """The step's per-sample model randomness (`make_train_step(model_draws=)`): LoRA dropout, or None."""
        # the text encoders' adapters (lora.text_encoder) use the same draws: lora.dropout is one setting
        return self.adapters.draw_dropout if self.adapters is not None and self.adapters.dropout > 0 else None

    def merged(self, trainable: Any, frozen: Any) -> Any:
        """The full UNet params (LoRA: adapters folded in): what sample grids and exports use."""
        trainable, frozen = self.unet_parts(trainable, frozen)
        return merge_params(trainable, frozen) if self.adapters is None else self.adapters.merged(trainable, frozen)


def plan_state(cfg: Config, mesh) -> StatePlan:
    """Model, optimizer and the sharded abstract TrainState of `cfg` on `mesh` (no allocation)."""
    if cfg.model.kind == "vae":  # the autoencoder task: jaxsd/train/vae_plan.py
        from jaxsd.train.vae_plan import plan_vae_state
        return plan_vae_state(cfg, mesh)
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
    text = step_text(cfg)
    if text is not None:
        check_fits_unet(text, module.config)
        te_shard, adapter_shard = text_shardings(text, mesh, rules, jnp.dtype(cfg.model.param_dtype))
        trained_shapes, kept_shapes = text.split(frozen_shapes(text, base_dtype))  # train.text_encoder: full
        trained_shard, kept_shard = text.split(te_shard)
        f_shapes, f_shard = {"unet": f_shapes, **kept_shapes}, {"unet": f_shard, **kept_shard}
        if text.trains:
            t_shapes = {"unet": t_shapes, **{c: p.shapes(jnp.dtype(cfg.model.param_dtype))
                                             for c, p in text.adapters.items()}, **trained_shapes}
            t_shard = {"unet": t_shard, **adapter_shard, **trained_shard}
    projection = step_projection(cfg, module.config.context_dim)
    if projection is not None:  # the raw-T5 hybrid: its projection trains with the UNet
        p_dtype = jnp.dtype(cfg.model.param_dtype)
        t_shapes = {"unet": t_shapes, PROJECTION_NAME: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, p_dtype),
                                                                    projection.shapes)}
        t_shard = {"unet": t_shard, PROJECTION_NAME: param_shardings(projection.shapes, projection.logical, mesh,
                                                                     rules)}
    perceptual = step_perceptual(cfg)
    if perceptual is not None:  # frozen: {"unet": ..., [text encoders,] "perceptual": ...}
        base = f_shapes if text is not None else {"unet": f_shapes}
        base_shard = f_shard if text is not None else {"unet": f_shard}
        f_shapes = {**base, PERCEPTUAL: perceptual.stored_shapes(base_dtype)}
        f_shard = {**base_shard, PERCEPTUAL: perceptual.shardings(mesh, rules)}
    tx, lr_fn = make_optimizer(cfg.optimizer, cfg.train.steps)
    if text is not None and text.full is not None and cfg.train.text_encoder_lr is not None:
        ratio = cfg.train.text_encoder_lr / cfg.optimizer.learning_rate
        tx = scaled_groups(tx, {c: ratio for c in text.components})
    ema = cfg.train.ema.enabled
    abstract = jax.eval_shape(lambda t, f: init_state(t, f, tx, cfg.train.seed, ema), t_shapes, f_shapes)
    state_sharding = train_state_shardings(abstract, t_shard, f_shard, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    return StatePlan(module, shapes, shardings, tx, lr_fn, abstract, state_sharding, adapters, base_dtype, text,
                     projection, perceptual)


def fresh_state(cfg: Config, plan: StatePlan, params: Any) -> TrainState:
    """A new train state (fresh optimizer state, EMA = params) from full `params`, sharded as planned.
    LoRA: `params` are the frozen base; the adapters start fresh (up = 0: step 0 is the base), or
    from the file `lora.init_from` (step 0 is the base with that file applied).
    Text in the step: the text encoders are read from their folder (`jaxsd.train.text`).

    `params` are donated: the state takes over their buffers instead of holding a second copy.
    """
    if cfg.model.kind == "vae":
        from jaxsd.train.vae_plan import fresh_vae_state
        return fresh_vae_state(cfg, plan, params)
    t_shard, _ = plan.unet_parts(plan.state_shardings.params, plan.state_shardings.frozen)
    text_plans = plan.text.adapters if plan.text is not None else {}
    from_file = None
    if plan.adapters is not None and cfg.lora.init_from:
        from_file = adapters_from_file(cfg, {"unet": plan.adapters, **text_plans}, plan.module.config,
                                       plan.text.configs() if text_plans else {},
                                       {"unet": t_shard, **{c: plan.state_shardings.params[c] for c in text_plans}},
                                       base=params)
    if plan.adapters is not None:
        t_params = from_file["unet"] if from_file else initial_adapters(cfg, plan.adapters, plan.param_shapes, t_shard)
        f_params = params
    else:
        t_params, f_params = split_params(params, cfg.train.trainable, cfg.train.frozen)
    if plan.text is not None:
        trained, kept = plan.text.split(load_text_params(plan.text, plan.base_dtype, plan.text_shardings()))
        f_params = {"unet": f_params, **kept}
        if text_plans:
            text_adapters = ({c: from_file[c] for c in text_plans} if from_file else
                             initial_text_adapters(cfg, plan.text, plan.state_shardings.params))
            t_params = {"unet": t_params, **text_adapters}
        elif plan.text.trains:  # train.text_encoder: full
            t_params = {"unet": t_params, **trained}
    if plan.perceptual is not None:
        f_params = {**(f_params if plan.text is not None else {"unet": f_params}),
                    PERCEPTUAL: plan.load_perceptual(cfg)}
    if plan.projection is not None:
        t_params = {"unet": t_params, PROJECTION_NAME: load_projection(
            plan.projection, jnp.dtype(cfg.model.param_dtype), plan.state_shardings.params[PROJECTION_NAME])}
    init = jax.jit(lambda t, f: init_state(t, f, plan.tx, cfg.train.seed, cfg.train.ema.enabled),
                   out_shardings=plan.state_shardings, donate_argnums=(0, 1))
    return init(t_params, f_params)


def plan_train_step(cfg: Config, plan: StatePlan, mesh, empty: Any = None) -> Callable:
    """The pure step `(state, batch) -> (state, metrics)` of `cfg` over `plan`'s state, as `jaxsd train`
    runs it. empty: the empty caption as the cache holds it — its embedding, or (text encoded in the
    step) its token ids; needed when loss.cond_dropout > 0."""
    if cfg.model.kind == "vae":
        from jaxsd.train.vae_plan import vae_train_step
        return vae_train_step(cfg, plan)
    schedule = NoiseSchedule.from_config(cfg.diffusion.to_scheduler_config())
    encode_text = plan.conditioning(empty)
    module = plan.module
    if cfg.model.segmented_backward:  # the collection that trains: the adapters of a LoRA run, else the weights
        module = module.clone(segmented_backward="lora" if plan.adapters is not None else "params")
    fused = functools.partial(fused_update_hook, cfg) if cfg.train.fused_update else None
    if fused is not None and (plan.projection is not None or plan.text is not None and plan.text.trains):
        raise ConfigError("train.fused_update: true updates the UNet's params only; this run also trains the text "
                          "side (a text encoder or the hybrid's text projection)")
    variables = plan.adapters is not None or fused is not None  # fused: {"params": ..., moments}
    return make_train_step(make_apply_fn(module, variables=variables), schedule, cfg.loss,
                           plan.tx, plan.lr_fn, combine=plan.variables, encode_text=encode_text,
                           model_draws=plan.model_draws, perceptual=plan.perceptual,
                           ema_cfg=cfg.train.ema, grad_accum_steps=cfg.train.grad_accum_steps,
                           empty_cond=None if empty is None or encode_text else jax.tree.map(jnp.asarray, empty),
                           micro_batch_sharding=micro_batch_sharding(mesh) if mesh.size > 1 else None,
                           streamed=streams_updates(cfg.optimizer), fused_update=fused)


def compiled_train_steps(cfg: Config, plan: StatePlan, mesh, empty: Any = None) -> CompiledSteps:
    """`plan_train_step` as the loop runs it: jitted over the sharded state (donated) with replicated
    metrics, `(state, batch) -> (state, metrics, flops)`, compiled once per batch shape on first sight."""
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(plan_train_step(cfg, plan, mesh, empty), in_shardings=(plan.state_shardings, None),
                     out_shardings=(plan.state_shardings, replicated), donate_argnums=(0,))
    return CompiledSteps(jitted, mesh=mesh)
