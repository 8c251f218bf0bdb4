"""LoRA / LoCon runs (`lora.rank > 0` or `lora.conv_rank > 0`): the adapters train, the base UNet is frozen.

The train state's trainable params are the adapters' `down` / `up` matrices, one pair per adapted
layer (`jaxsd.models.lora`), selected by `lora.targets` and then by `train.trainable` /
`train.frozen` (matched against 'module/path/down'). Their `scale` = alpha / rank is a constant of
the run, not a param: `AdapterPlan.variables` puts it back in. The frozen params are the whole base
UNet, stored in `lora.base_dtype` — never in a checkpoint (`jaxsd.train.base`). The step applies
both unmerged: `module.apply({"params": base, "lora": adapters})`; sample grids and
`jaxsd export --merge-lora` fold them into the kernels (`merged`). With `lora.dropout` the step
also gives the model per-sample dropout keys ("lora_dropout", `draw_dropout` / `dropout_variables`);
sampling and export never do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsd.config import Config
from jaxsd.errors import ConfigError
from jaxsd.models.lora import (
    AdapterSpec,
    dropout_keys,
    dropout_variables,
    fold_adapters,
    fold_dropout_keys,
    init_adapters,
    plan_adapters,
)
from jaxsd.train.trainable import is_trainable

ModulePath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """Which layers of the UNet train an adapter, with what rank and alpha."""

    specs: dict[ModulePath, AdapterSpec]
    dropout: float = 0.0  # lora.dropout: on the adapters' input, in the train step only

    def shapes(self, dtype) -> dict:
        """Abstract trainable tree {module...: {"down": [in, r] | [kh, kw, in, r], "up": [r, out] | [1, 1, r, out]}}."""
        flat = {}
        for module, spec in self.specs.items():
            flat[module + ("down",)] = jax.ShapeDtypeStruct(spec.down_shape(), dtype)
            flat[module + ("up",)] = jax.ShapeDtypeStruct(spec.up_shape(), dtype)
        return traverse_util.unflatten_dict(flat)

    def scales(self) -> dict:
        """{module...: {"scale": f32 [r]}}: alpha / rank per rank column (a constant of the run)."""
        return traverse_util.unflatten_dict({
            module + ("scale",): jnp.full((spec.rank,), spec.alpha / spec.rank, jnp.float32)
            for module, spec in self.specs.items()})

    def variables(self, trained: Any) -> dict:
        """The "lora" variables of `trained` (down/up) with their scales."""
        flat = traverse_util.flatten_dict(dict(trained))
        flat.update(traverse_util.flatten_dict(self.scales()))
        return traverse_util.unflatten_dict(flat)

    def draw_dropout(self, key: jax.Array, batch_size: int) -> dict:
        """The step's `model_draws`: {"lora_dropout": uint32 [B, 2]}, one key per sample. Per sample,
        not one key for the batch, so that the micro-batches of gradient accumulation (rows of the
        batch) get exactly the masks the whole batch would: the accumulated step stays exact."""
        return {"lora_dropout": dropout_keys(key, batch_size)}

    def dropout_variables(self, draws: dict, model: int = 0) -> dict:
        """The "lora_dropout" collection of one (micro-)batch's `draw_dropout` draws; model > 0: the keys
        folded with it (each text encoder its own masks: `jaxsd.train.text`)."""
        keys = draws["lora_dropout"]
        return dropout_variables(list(self.specs), fold_dropout_keys(keys, model) if model else keys, self.dropout)

    def merged(self, trained: Any, base: Any) -> dict:
        """The base UNet params with the adapters folded into their kernels (W + down · scale · up)."""
        return fold_adapters(base, self.variables(trained))


def adapter_plan(cfg: Config, base_shapes: Any) -> AdapterPlan:
    """`lora.targets` (and LoCon's convs), narrowed by `train.trainable` / `train.frozen`."""
    lc = cfg.lora
    specs = plan_adapters(base_shapes, lc.targets, lc.rank, lc.alpha, conv_rank=lc.conv_rank, conv_alpha=lc.conv_alpha)
    kept = {m: s for m, s in specs.items()
            if is_trainable("/".join((*m, "down")), cfg.train.trainable, cfg.train.frozen)}
    if not kept:
        raise ConfigError(f"train.trainable={list(cfg.train.trainable)} / train.frozen={list(cfg.train.frozen)} leave "
                          f"none of the {len(specs)} adapters of lora.targets={lc.targets!r} to train")
    return AdapterPlan(kept, lc.dropout)


def initial_adapters(cfg: Config, plan: AdapterPlan, base_shapes: Any, shardings: Any) -> Any:
    """Fresh adapters (up = 0: step 0 computes exactly the base), created in their sharded layout."""
    lc = cfg.lora

    def init(key):
        tree = init_adapters(base_shapes, lc.targets, lc.rank, lc.alpha, key, conv_rank=lc.conv_rank,
                             conv_alpha=lc.conv_alpha, init=lc.init, dtype=jnp.dtype(cfg.model.param_dtype))
        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict({p: v for p, v in flat.items()
                                             if p[:-1] in plan.specs and p[-1] != "scale"})

    return jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.train.seed + 1))

