"""`lora.init_from: FILE`: a LoRA run's adapters start from an existing LoRA file, not a fresh init.

The file (PEFT/diffusers or kohya, read by `jaxsd.convert.lora`) must hold exactly the adapters the
run trains: the same layers (`lora.targets` and LoCon's convs, narrowed by `train.trainable` /
`train.frozen`), each with the run's rank and alpha (`lora.rank`/`alpha` for linear layers,
`conv_rank`/`conv_alpha` for LoCon convs). The run's scale alpha / rank is then the file's, so step 0
computes what `jaxsd sample --lora FILE` computes (scale 1.0) and training continues that function.
Anything else is one ConfigError naming what differs and the first layers concerned.

With `lora.text_encoder: true` the text encoders' adapters (`jaxsd.train.text`) come from the same
file (PEFT `text_encoder.` / `text_encoder_2.`, kohya `lora_te_` / `lora_te1_` / `lora_te2_` keys) and
must fit the same way; without it a file holding text-encoder adapters is refused, never half-read.

Read on a fresh start only; a resumed run continues from its checkpoint (`jaxsd.train.resume` logs
that the file is not read).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd.config import Config
from jaxsd.convert.lora import (
    LoraLayer,
    LoraModel,
    LoraWeights,
    lora_file_components,
    read_lora,
    warn_if_other_base,
)
from jaxsd.convert.lora_metadata import BASE_HASH_KEY
from jaxsd.errors import ConfigError
from jaxsd.models.lora import CONV_TARGETS, AdapterSpec
from jaxsd.models.names import ModulePath, torch_module_name
from jaxsd.models.params import fingerprint_params
from jaxsd.models.unet import UNetConfig
from jaxsd.pipelines.loading import detect_family
from jaxsd.train.adapters import AdapterPlan

log = logging.getLogger("jaxsd.train")

_SHOWN = 5  # layers named per kind of mismatch


def _family(cfg: Config) -> str:
    """The base's family for reading the file's names (a bare UNet folder has none to detect)."""
    folder = Path(cfg.model.pretrained)
    return detect_family(folder) if (folder / "model_index.json").is_file() else "unet"


def read_init_from(cfg: Config, model: LoraModel) -> LoraWeights:
    """The file of `lora.init_from`, read against `model`; text-encoder adapters need lora.text_encoder."""
    path = cfg.lora.init_from
    if not Path(path).is_file():
        raise ConfigError(f"lora.init_from={path}: no such file (a LoRA .safetensors file to continue from)")
    text = {c: keys for c, keys in lora_file_components(path).items() if c != "unet"}
    if text and not cfg.lora.text_encoder:
        found = ", ".join(f"{c} ({len(keys)} tensors, e.g. {keys[0]})" for c, keys in sorted(text.items()))
        raise ConfigError(f"lora.init_from={path} holds text-encoder adapters: {found}; this run trains the UNet's "
                          "adapters only (lora.text_encoder=false) and would drop them. Continue from a UNet-only "
                          "file (e.g. `jaxsd export RUN --lora` of a UNet run), or train the text encoders too "
                          "(lora.text_encoder=true)")
    return read_lora(path, model)


def _fmt(alpha: float) -> str:
    return f"{alpha:g}"


def _file_summary(layers: Mapping[ModulePath, LoraLayer]) -> str:
    """The file's rank/alpha sets, for the layers lora.rank/alpha set and for LoCon's (conv_rank/conv_alpha)."""
    parts = []
    for kind, conv in (("linear and 1x1 layers", False), ("LoCon convs", True)):
        own = [lay for m, lay in layers.items() if _is_locon(m, lay) == conv]
        if own:
            ranks = sorted({lay.rank for lay in own})
            alphas = sorted({lay.alpha for lay in own})
            parts.append(f"{kind}: rank {'/'.join(map(str, ranks))}, "
                         f"alpha {'/'.join(map(_fmt, alphas))} ({len(own)} layers)")
    return "; ".join(parts) or "no layers"


def _components_summary(weights: LoraWeights) -> str:
    """`_file_summary` of each component of the file (named when it is not the UNet alone)."""
    if set(weights.layers) <= {"unet"}:
        return _file_summary(weights.layers.get("unet", {}))
    return "; ".join(f"{c}: {_file_summary(layers)}" for c, layers in weights.layers.items())


def _is_locon(module: ModulePath, layer: LoraLayer) -> bool:
    """Whether `plan_adapters` would give this layer the conv rank (a conv among `CONV_TARGETS`)."""
    return layer.down.ndim == 4 and any(re.search(p, torch_module_name(module)) for p in CONV_TARGETS)


def fit_problems(layers: Mapping[ModulePath, LoraLayer], specs: Mapping[ModulePath, AdapterSpec]) -> list[str]:
    """Why a file's layers are not the adapters `specs` describes; [] when they are.

    Per layer the rank must be equal and the scale alpha / rank equal as the float32 the model
    applies (then the run computes exactly what the file does).
    """
    name = torch_module_name
    rank = [f"{name(m)} (file {lay.rank}, run {specs[m].rank})" for m, lay in layers.items()
            if m in specs and lay.rank != specs[m].rank]
    alpha = [f"{name(m)} (file {_fmt(lay.alpha)}, run {_fmt(specs[m].alpha)})" for m, lay in layers.items()
             if m in specs and lay.rank == specs[m].rank
             and np.float32(lay.alpha / lay.rank) != np.float32(specs[m].alpha / specs[m].rank)]
    extra = [name(m) for m in layers if m not in specs]
    missing = [name(m) for m in specs if m not in layers]
    out = []
    for what, items in (("rank differs", rank), ("alpha differs", alpha),
                        ("in the file, not adapted by this run", extra),
                        ("adapted by this run, not in the file", missing)):
        if items:
            shown = sorted(items)[:_SHOWN]
            out.append(f"{what} on {len(items)} layers: {', '.join(shown)}{' ...' if len(items) > _SHOWN else ''}")
    return out


def adapters_from_file(cfg: Config, plans: Mapping[str, AdapterPlan], unet_config: UNetConfig,
                       text_configs: Mapping[str, Any], shardings: Mapping[str, Any], base: Any = None) -> dict[str, Any]:
    """{component: trainable adapters {module...: {"down", "up"}}} of `lora.init_from`, in model.param_dtype,
    placed with `shardings` ({component: the plan's trainable shardings}).

    plans: {"unet": AdapterPlan[, "text_encoder": ..., "text_encoder_2": ...]}: the run's adapters.
    text_configs: {component: CLIPTextConfig} of the CLIP text encoders ({} without lora.text_encoder).
    base: the frozen UNet params, for the file's base-UNet fingerprint (a different base warns).
    Raises ConfigError when the file does not fit the run's `lora:` settings.
    """
    lc = cfg.lora
    weights = read_init_from(cfg, LoraModel(_family(cfg), unet_config, text_configs))
    problems = []
    for component in dict.fromkeys([*plans, *weights.layers]):
        found = fit_problems(weights.layers.get(component, {}), plans[component].specs if component in plans else {})
        problems += [f"{component}: {p}" if len(plans) > 1 or component != "unet" else p for p in found]
    if problems:
        targets = lc.targets if isinstance(lc.targets, str) else list(lc.targets)
        summary = _components_summary(weights)
        raise ConfigError(
            f"lora.init_from={lc.init_from} does not fit this run's adapters (lora.rank={lc.rank}, "
            f"alpha={_fmt(lc.alpha)}, conv_rank={lc.conv_rank}, conv_alpha={_fmt(lc.conv_alpha)}, "
            f"targets={targets!r}, text_encoder={lc.text_encoder}, with train.trainable/train.frozen; "
            "alpha 0 = rank):\n  " + "\n  ".join(problems)
            + f"\n  the file has {summary}: set lora.rank/alpha/conv_rank/conv_alpha/targets to "
            "match it, or start the adapters fresh (lora.init_from=null)")
    if base is not None and weights.metadata.get(BASE_HASH_KEY):
        warn_if_other_base(weights, fingerprint_params(base))
    dtype = jnp.dtype(cfg.model.param_dtype)
    out = {}
    for component in plans:
        flat = {}
        for module, layer in weights.layers[component].items():
            flat[module + ("down",)] = np.asarray(layer.down, dtype)
            flat[module + ("up",)] = np.asarray(layer.up, dtype)
        out[component] = jax.device_put(traverse_util.unflatten_dict(flat), shardings[component])
    log.info("LoRA adapters: from lora.init_from=%s (%s layout; %s)", lc.init_from, weights.layout,
             _components_summary(weights))
    return out
