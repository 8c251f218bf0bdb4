"""The text encoders in the train step: runs whose cache holds token ids (`data.cache.text_mode: tokens`).

Which encoders: those of `data.cache.text_encoder` — the pipeline folder whose tokenizers made the cache
(the loader checks their fingerprints) and whose encoders an embeddings cache of the same data would be
made with, so switching `text_mode` moves where the text is encoded, not what it encodes to. In the usual
fine-tune (and in diffusers' training scripts) that is the `model.pretrained` pipeline; a from-scratch
run (the T5 hybrid) has only this folder. Weights variant: `data.cache.variant`, as the cache.

In the train state the text encoders (SDXL: both, the hybrid: T5 and its text projection) are frozen
params beside the UNet's: `frozen = {"unet": ..., "text_encoder": ..., "text_encoder_2": ...,
"text_projection": ...}`, stored in the base dtype (`lora.base_dtype` or `model.param_dtype`), sharded by
the same `sharding.rules` as the UNet, never checkpointed (reloaded on resume and export, their files
part of the base fingerprint, `jaxsd.train.base`). They compute in `model.dtype`.

`lora.text_encoder: true` adds adapters on the CLIP encoders' self_attn q/k/v/out_proj and mlp fc1/fc2
(`lora.rank`, `lora.alpha`, `lora.init`; `train.trainable`/`train.frozen` match them as
"text_encoder/text_model/.../q_proj/down"). They train beside the UNet's adapters, in one optimizer:
`trainable = {"unet": unet adapters, "text_encoder": ..., "text_encoder_2": ...}`. T5 takes none.

`train.text_encoder: full` fine-tunes the text side itself (every component: the CLIP encoders, or the T5
and its projection), its params narrowed by train.trainable / train.frozen as the UNet's (paths like
"text_encoder/text_model/encoder/layers_0/mlp/fc1/kernel"): the trained part moves from `frozen` to
`trainable` = {"unet": ..., "text_encoder": ..., ...}, in `model.param_dtype`, checkpointed, EMA'd and
updated by the one optimizer at `train.text_encoder_lr` (`jaxsd.train.optimizers.scaled_groups`).

The step's conditioning (`text_conditioning`) is `jaxsd.text.encode.encode_token_ids` — the function
caching and sampling use — with no clip-skip, as the embeddings cache. A sample dropped by
`loss.cond_dropout` is encoded from the empty caption's cached token ids: what the embeddings cache's
substitution of the empty caption's embedding gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd.config import Config
from jaxsd.errors import ConfigError
from jaxsd.models.clip import CLIPTextModel
from jaxsd.models.clip import example_inputs as clip_inputs
from jaxsd.models.lora import adapter_logical_axes, init_adapters, plan_adapters
from jaxsd.models.params import abstract_params
from jaxsd.models.t5 import example_inputs as t5_inputs
from jaxsd.models.text_projection import example_inputs as projection_inputs
from jaxsd.text.encode import (
    ENCODER_NAMES,
    PROJECTION_NAME,
    TextEncoders,
    encode_token_ids,
    token_keys,
)
from jaxsd.text.prompts import PromptEncoder
from jaxsd.train.adapters import AdapterPlan
from jaxsd.train.sharding import param_shardings
from jaxsd.train.trainable import is_trainable, merge_params, split_params

TEXT_TARGETS = "text_encoder"  # the jaxsd.models.lora preset: CLIP q/k/v/out_proj, fc1/fc2


@dataclasses.dataclass(frozen=True)
class StepText:
    """The text side of a token-cache run, before any weight is read.

    encoders: the modules (static). shapes / logical: {component: abstract param tree / logical
    PartitionSpecs}. adapters: {component: AdapterPlan} of `lora.text_encoder` ({} without it).
    """

    folder: Path
    kind: str
    encoders: TextEncoders
    shapes: dict[str, Any]
    logical: dict[str, Any]
    adapters: dict[str, AdapterPlan]
    variant: str | None
    max_length: int | None  # T5: the cache's token length; CLIP: None (77)
    full: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # train.text_encoder full: (trainable, frozen) regexes

    @property
    def trains(self) -> bool:
        """Whether the text side has params in the state's trainable tree (adapters or full fine-tuning)."""
        return bool(self.adapters) or self.full is not None

    def split(self, tree: Mapping[str, Any]) -> tuple[dict, dict]:
        """({component: trained part}, {component: frozen part}) of a {component: tree} of the text side
        (params, shapes or shardings): all frozen unless `full`."""
        if self.full is None:
            return {}, dict(tree)
        return split_params(dict(tree), *self.full)

    @property
    def components(self) -> tuple[str, ...]:
        """Params keys of the text side: text_encoder[, text_encoder_2][, text_projection]."""
        names = ENCODER_NAMES[:len(self.encoders.encoders)]
        return names + ((PROJECTION_NAME,) if self.encoders.projection is not None else ())

    def configs(self, clip_only: bool = True) -> dict[str, Any]:
        """{component: config} of the CLIP encoders (what LoRA files are read against / written for);
        clip_only=False: of every component (T5Config, TextProjectionConfig too)."""
        out = {name: model.config for name, model in zip(ENCODER_NAMES, self.encoders.encoders)
               if not clip_only or isinstance(model, CLIPTextModel)}
        if not clip_only and self.encoders.projection is not None:
            out[PROJECTION_NAME] = self.encoders.projection.config
        return out

    def prompt_encoder(self) -> PromptEncoder:
        """A `PromptEncoder` of these encoders and tokenizers, without weights: the caller sets its params
        (the train state's)."""
        model = self.encoders.encoders[0]
        return PromptEncoder.from_pipeline(self.folder, self.kind, dtype=model.dtype, max_length=self.max_length,
                                           variant=self.variant, attention_impl=model.implementation, weights=False)


def check_fits_unet(text: StepText, unet: Any) -> None:
    """Refuse (ConfigError) text encoders whose conditioning the UNet (a `UNetConfig`) cannot take: another
    embedding width than its cross_attention_dim, or no pooled embedding for an SDXL (text_time) UNet."""
    encoders = text.encoders
    width = (encoders.projection.config.out_features if encoders.projection is not None else
             sum(getattr(m.config, "hidden_size", None) or m.config.d_model for m in encoders.encoders))
    where = f"data.cache.text_encoder={str(text.folder)!r} read as text family {text.kind!r}"
    if width != unet.context_dim:
        raise ConfigError(f"{where} gives {width}-wide text embeddings, but the UNet has cross_attention_dim="
                          f"{unet.context_dim}: use the pipeline folder of this UNet, and its family "
                          "(data.cache.text: tokens reads it from the folder; sdxl needs text_encoder_2/)")
    if unet.addition_embed_type == "text_time" and text.kind != "sdxl":
        raise ConfigError(f"{where}: the UNet is an SDXL one (addition_embed_type text_time) and needs the pooled "
                          "embedding of SDXL's second text encoder: set data.cache.text: sdxl (or tokens, to read "
                          "the family from the folder)")


def _example_inputs(model) -> tuple:
    return clip_inputs(model.config) if isinstance(model, CLIPTextModel) else t5_inputs(model.config)


def encodes_text(cfg: Config) -> bool:
    """Whether `cfg`'s train step encodes the text: its batches come from a token-id cache."""
    return cfg.train.data_source == "cache" and cfg.data.cache.tokens


def step_text(cfg: Config) -> StepText | None:
    """The text encoders `cfg`'s train step runs; None when its batches hold cached embeddings (or are synthetic)."""
    if not encodes_text(cfg):
        return None
    from jaxsd.data.model_encoders import max_length, text_family, text_root

    if not cfg.data.cache.text_encoder:
        raise ConfigError("data.cache.text_mode=tokens: the train step runs the text encoders of "
                          "data.cache.text_encoder, which is not set; point it at the pipeline folder the cache was "
                          "made with (usually model.pretrained)")
    kind = text_family(cfg.data)
    pe = PromptEncoder.from_pipeline(text_root(cfg.data), kind, dtype=jnp.dtype(cfg.model.dtype),
                                     max_length=max_length(cfg.data) if kind.startswith("t5") else None,
                                     variant=cfg.data.cache.variant or None, attention_impl=cfg.model.attention_impl,
                                     weights=False)
    shapes, logical = {}, {}
    for name, model in zip(ENCODER_NAMES, pe.encoders.encoders):
        shapes[name], logical[name] = abstract_params(model, *_example_inputs(model))
    if pe.encoders.projection is not None:
        proj = pe.encoders.projection
        shapes[PROJECTION_NAME], logical[PROJECTION_NAME] = abstract_params(proj, *projection_inputs(proj.config))
    full = (tuple(cfg.train.trainable), tuple(cfg.train.frozen)) if cfg.train.text_encoder == "full" else None
    return StepText(text_root(cfg.data), kind, pe.encoders, shapes, logical,
                    _text_adapters(cfg, kind, shapes), cfg.data.cache.variant or None, pe.max_length, full)


def _text_adapters(cfg: Config, kind: str, shapes: Mapping[str, Any]) -> dict[str, AdapterPlan]:
    """{component: AdapterPlan} for `lora.text_encoder`, narrowed by train.trainable / train.frozen."""
    lc = cfg.lora
    if not (lc.enabled and lc.text_encoder):
        return {}
    if kind.startswith("t5"):
        raise ConfigError(f"lora.text_encoder: the {kind} text encoder is a T5, and jaxsd trains (and writes LoRA "
                          "files for) CLIP text-encoder adapters only; set lora.text_encoder=false (the T5 stays "
                          "frozen, its adapters would load in no other tool either)")
    if lc.rank <= 0:
        raise ConfigError("lora.text_encoder: the text encoders' adapters take lora.rank (and lora.alpha); "
                          f"lora.rank is {lc.rank}")
    plans, total = {}, 0
    for name in ENCODER_NAMES:
        if name not in shapes:
            continue
        specs = plan_adapters(shapes[name], TEXT_TARGETS, lc.rank, lc.alpha)
        total += len(specs)
        kept = {m: s for m, s in specs.items()
                if is_trainable("/".join((name, *m, "down")), cfg.train.trainable, cfg.train.frozen)}
        if kept:
            plans[name] = AdapterPlan(kept, lc.dropout)
    if not plans:
        raise ConfigError(f"lora.text_encoder: train.trainable={list(cfg.train.trainable)} / train.frozen="
                          f"{list(cfg.train.frozen)} leave none of the text encoders' {total} adapters to train "
                          "(their paths look like 'text_encoder/text_model/encoder/layers_0/self_attn/q_proj/down'; "
                          "add 'text_encoder' to train.trainable)")
    return plans


def frozen_shapes(text: StepText, dtype: Any) -> dict[str, Any]:
    """{component: ShapeDtypeStruct tree} of the frozen text params, stored in `dtype`."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), text.shapes)


def text_shardings(text: StepText, mesh: Any, rules: Mapping[str, Any], adapter_dtype: Any) -> tuple[dict, dict]:
    """({component: shardings of its frozen params}, {component: shardings of its adapters}), by `rules`
    as the UNet's (adapters sharded like the layers they adapt)."""
    frozen = {c: param_shardings(text.shapes[c], text.logical[c], mesh, dict(rules)) for c in text.components}
    adapters = {}
    for c, plan in text.adapters.items():
        shapes = plan.shapes(adapter_dtype)
        adapters[c] = param_shardings(shapes, adapter_logical_axes(text.logical[c], shapes), mesh, dict(rules))
    return frozen, adapters


def load_text_params(text: StepText, dtype: Any, shardings: Mapping[str, Any]) -> dict[str, Any]:
    """{component: params} of the text side, read from `text.folder` in `dtype` and placed with `shardings`
    ({component: shardings of all its params}: `text_shardings`' first value). `text.split` them into the
    trained and frozen parts."""
    params = PromptEncoder.from_pipeline(text.folder, text.kind, param_dtype=dtype, max_length=text.max_length,
                                         variant=text.variant).params
    return {c: jax.device_put(params[c], shardings[c]) for c in text.components}


def initial_text_adapters(cfg: Config, text: StepText, shardings: Mapping[str, Any]) -> dict[str, Any]:
    """Fresh adapters of each adapted text encoder (up = 0: step 0 encodes exactly as the base), created
    in their sharded layout; component i draws from key(train.seed + 1) folded with i + 1 (the UNet's
    adapters use key(train.seed + 1) itself)."""
    lc = cfg.lora
    out = {}
    for i, name in enumerate(ENCODER_NAMES):
        if name not in text.adapters:
            continue
        plan = text.adapters[name]

        def init(key, name=name, plan=plan):
            tree = init_adapters(text.shapes[name], TEXT_TARGETS, lc.rank, lc.alpha, key, init=lc.init,
                                 dtype=jnp.dtype(cfg.model.param_dtype))
            return traverse_util.unflatten_dict({p: v for p, v in traverse_util.flatten_dict(tree).items()
                                                 if p[:-1] in plan.specs and p[-1] != "scale"})

        key = jax.random.fold_in(jax.random.key(cfg.train.seed + 1), i + 1)
        out[name] = jax.jit(init, out_shardings=shardings[name])(key)
    return out


def text_variables(text: StepText, trainable: Mapping[str, Any], frozen: Mapping[str, Any],
                   draws: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(params, variables) `encode_token_ids` takes, from the train state's trees: the frozen text params,
    and {"lora": {component: adapters with their scales}} when the text encoders train adapters (else None).
    draws: the step's `model_draws` (lora.dropout): adds {"lora_dropout": {component: ...}}, encoder i's
    per-sample keys folded with i + 1 (the UNet's are not folded)."""
    if text.full is not None:
        params = {c: merge_params(trainable.get(c, {}), frozen.get(c, {})) for c in text.components}
    else:
        params = {c: frozen[c] for c in text.components}
    lora = {c: plan.variables(trainable[c]) for c, plan in text.adapters.items()}
    if not lora:
        return params, None
    variables = {"lora": lora}
    if draws is not None:
        variables["lora_dropout"] = {c: plan.dropout_variables(draws, ENCODER_NAMES.index(c) + 1)
                                     for c, plan in text.adapters.items()}
    return params, variables


def text_conditioning(text: StepText, parts: Callable[[Any, Any], tuple[dict, dict | None]],
                      empty: Mapping[str, np.ndarray] | None) -> Callable:
    """The step's batch → conditioning function: `encode(trainable, frozen, batch, drop)` returns the batch
    with its token ids replaced by "encoder_hidden_states" [B, L, D] (SDXL: and "pooled" [B, P]).

    parts(trainable, frozen[, model_draws]) -> (params, variables) of `encode_token_ids` (`StatePlan.text_parts`);
      `encode`'s model_draws: the step's (lora.dropout), passed on.
    empty: the empty caption's token ids {"input_ids": [L], ...} (the cache's); the rows where `drop` [B]
      is True are encoded from them. Needed when loss.cond_dropout > 0.
    """
    keys = [k for i in range(len(text.encoders.encoders)) for k in token_keys(i)]
    empty_ids = None if empty is None else {k: jnp.asarray(empty[k]) for k in keys if k in empty}

    def encode(trainable: Any, frozen: Any, batch: Mapping[str, jax.Array], drop: jax.Array,
               model_draws: Any = None) -> dict[str, jax.Array]:
        tokens = {k: batch[k] for k in keys if k in batch}
        if empty_ids is not None:
            tokens = {k: jnp.where(drop[:, None], empty_ids[k][None].astype(v.dtype), v) for k, v in tokens.items()}
        params, variables = parts(trainable, frozen) if model_draws is None else parts(trainable, frozen, model_draws)
        out = encode_token_ids(text.encoders, params, tokens, variables=variables)
        return {**{k: v for k, v in batch.items() if k not in tokens}, **out}

    return encode


def text_folders(cfg: Config) -> list[Path]:
    """The component folders whose weights the step's frozen text side is made of ([] without text in the
    step): what the base fingerprint covers besides the UNet."""
    if not encodes_text(cfg) or not cfg.data.cache.text_encoder:
        return []
    from jaxsd.data.model_encoders import TEXT_COMPONENTS, text_family, text_root

    root = text_root(cfg.data)
    return [root / name for name in TEXT_COMPONENTS[text_family(cfg.data)] if not name.startswith("tokenizer")]


__all__ = ["StepText", "check_fits_unet", "encodes_text", "frozen_shapes", "initial_text_adapters", "load_text_params", "step_text", "text_conditioning",
           "text_folders", "text_shardings", "text_variables"]
