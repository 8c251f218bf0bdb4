"""What a LoRA file records besides its tensors: rank/alpha per layer, and how it was made.

PEFT/diffusers files keep rank and alpha where diffusers reads them back: the safetensors
metadata key `lora_adapter_metadata`, a JSON object of `LoraConfig` arguments per component
(`{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {...}, "unet.alpha_pattern": {...},
"unet.target_modules": [...], "text_encoder.r": ...}`), which `pipe.load_lora_weights` passes to
`LoraConfig` as they are. Without it diffusers takes alpha = rank (scale 1). A layer's rank or
alpha comes from the first `rank_pattern`/`alpha_pattern` key `k` with
`re.match(rf"(.*\\.)?({k})$", module_name)`, else `r`/`lora_alpha` (PEFT's own rule).

kohya files keep alpha as a 0-d tensor `<name>.alpha` per layer (missing: alpha = rank) and
their training settings as `ss_*` metadata strings, which UIs display.

jaxsd adds `jaxsd.*` keys (`JAXSD_KEYS`) to both: base model family, rank, alpha, conv rank and
alpha, targets, steps and the base UNet's fingerprint (`jaxsd.models.params.fingerprint_params`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from jaxsd.errors import InputError

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
BASE_HASH_KEY = "jaxsd.base_unet_hash"
JAXSD_KEYS = ("jaxsd.format_version", "jaxsd.base_model", "jaxsd.rank", "jaxsd.alpha", "jaxsd.conv_rank",
              "jaxsd.conv_alpha", "jaxsd.targets", "jaxsd.text_encoder", "jaxsd.steps", BASE_HASH_KEY)
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "hybrid": "sd_v1"}
# PEFT LoraConfig defaults, used when the metadata names no value
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8
# LoraConfig options that change the math in ways jaxsd does not implement
_UNSUPPORTED_OPTIONS = {"use_rslora": "rank-stabilised scaling (use_rslora)", "use_dora": "DoRA (use_dora)",
                        "lora_bias": "a bias on lora_B (lora_bias)"}


@dataclass(frozen=True)
class LoraInfo:
    """How a LoRA was made, recorded in the file's metadata (all optional but the family)."""

    family: str
    rank: int | None = None
    alpha: float | None = None
    conv_rank: int = 0
    conv_alpha: float = 0
    targets: str | tuple[str, ...] | None = None
    text_encoder: bool | None = None
    steps: int | None = None
    base_unet_hash: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def metadata(self, layout: str) -> dict[str, str]:
        """The `jaxsd.*` keys, plus kohya's `ss_*` keys for the kohya layout."""
        out = {"jaxsd.format_version": "1", "jaxsd.base_model": self.family}
        values = {"jaxsd.rank": self.rank, "jaxsd.alpha": self.alpha, "jaxsd.conv_rank": self.conv_rank or None,
                  "jaxsd.conv_alpha": self.conv_alpha if self.conv_rank else None,
                  "jaxsd.targets": None if self.targets is None else json.dumps(
                      self.targets if isinstance(self.targets, str) else list(self.targets)),
                  "jaxsd.text_encoder": None if self.text_encoder is None else str(self.text_encoder).lower(),
                  "jaxsd.steps": self.steps, BASE_HASH_KEY: self.base_unet_hash}
        out.update({k: str(v) for k, v in values.items() if v is not None})
        if layout == "kohya":
            out["ss_network_module"] = "networks.lora"
            out["ss_base_model_version"] = KOHYA_BASE_VERSION.get(self.family, self.family)
            out["ss_v2"] = str(self.family == "sd2")
            if self.rank is not None:
                out["ss_network_dim"] = str(self.rank)
            if self.alpha is not None:
                out["ss_network_alpha"] = str(self.alpha)
            if self.conv_rank:
                out["ss_network_args"] = json.dumps({"conv_dim": str(self.conv_rank), "conv_alpha": str(self.conv_alpha)})
            if self.steps is not None:
                out["ss_steps"] = str(self.steps)
        out.update({str(k): str(v) for k, v in self.extra.items()})
        return out


def _pattern_value(patterns: Mapping, name: str):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def peft_component_config(metadata: Mapping[str, str], component: str, source: str) -> dict | None:
    """The `LoraConfig` arguments diffusers would use for `component`, or None without metadata."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        all_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: metadata {ADAPTER_METADATA_KEY!r} is not JSON ({e})") from None
    prefix = component + "."
    config = {k[len(prefix):]: v for k, v in all_config.items() if k.startswith(prefix)}
    if not config:
        return None
    bad = [why for key, why in _UNSUPPORTED_OPTIONS.items() if config.get(key)]
    if bad:
        raise InputError(f"{source}: the {component} adapter uses {', '.join(bad)}, which jaxsd does not support")
    return config


def peft_alpha(config: Mapping | None, name: str, rank: int, source: str) -> float:
    """alpha of layer `name` (PEFT module name) of rank `rank` (from its tensors), as diffusers reads it."""
    if config is None:
        return float(rank)  # diffusers: no metadata -> alpha = rank
    want_rank = _pattern_value(config.get("rank_pattern") or {}, name)
    want_rank = config.get("r", PEFT_DEFAULT_R) if want_rank is None else want_rank
    if int(want_rank) != rank:
        raise InputError(f"{source}: layer {name} has rank {rank} in its tensors but {want_rank} in the file's "
                         f"{ADAPTER_METADATA_KEY} (r / rank_pattern); the file is inconsistent")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name)
    return float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA) if alpha is None else alpha)


def peft_adapter_metadata(component: str, layers: Mapping[str, tuple[int, float]]) -> dict:
    """`LoraConfig` arguments for `component` whose layers are {module name: (rank, alpha)}, keyed
    `component.<arg>` as `save_lora_weights` stores them. Module names are written as given; for
    text encoders pass them without `text_model.` so they match CLIPTextModel in transformers 4 and 5."""
    ranks = Counter(r for r, _ in layers.values())
    alphas = Counter(a for _, a in layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    alpha_value = int(alpha) if float(alpha).is_integer() else alpha
    config = {
        "r": r,
        "lora_alpha": alpha_value,
        "rank_pattern": {name: rk for name, (rk, _) in layers.items() if rk != r},
        "alpha_pattern": {name: (int(a) if float(a).is_integer() else a) for name, (_, a) in layers.items()
                          if a != alpha},
        "target_modules": sorted(layers),
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
    }
    return {f"{component}.{k}": v for k, v in config.items()}


def encode_adapter_metadata(config: Mapping) -> str:
    """As diffusers writes it (indent 2, sorted keys)."""
    return json.dumps(dict(config), indent=2, sort_keys=True)
