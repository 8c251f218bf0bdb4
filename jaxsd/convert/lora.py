"""LoRA / LoCon safetensors files: read them onto a model, write them for diffusers and kohya.

Two layouts (key names in `jaxsd.convert.lora_names`, rank/alpha in `lora_metadata`):

  peft   `unet.<module>.lora_A.weight` [r, in] (conv [r, in, kh, kw]), `.lora_B.weight` [out, r]
         (conv [out, r, 1, 1]), `text_encoder.` / `text_encoder_2.` prefixes; alpha in the
         `lora_adapter_metadata` JSON — what `pipe.save_lora_weights` writes. Also read: the
         attention spellings diffusers' training scripts save (`to_q.lora.down.weight`,
         `q_proj.lora_linear_layer.down.weight`).
  kohya  `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` (same
         shapes as lora_A / lora_B) / `.alpha` (0-d), `lora_te_` (SD1/SD2) or `lora_te1_` /
         `lora_te2_` (SDXL); SDXL UNet names are the SGM ones (`input_blocks_4_1_...`).

In memory a file is a `LoraWeights`: per component, per Flax module path, a `LoraLayer` in
jaxsd's layout (down [in, r] / [kh, kw, in, r], up [r, out] / [1, 1, r, out]) kept in the
file's dtype, so reading and writing back gives the same tensors bit for bit.
`lora_variables` turns it into the "lora" variable collection the models apply
(`jaxsd.models.lora`). LoHa, LoKr, DoRA and other LyCORIS variants are refused by name.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd.convert.lora_metadata import (
    ADAPTER_METADATA_KEY,
    BASE_HASH_KEY,
    LoraInfo,
    encode_adapter_metadata,
    peft_adapter_metadata,
    peft_alpha,
    peft_component_config,
)
from jaxsd.convert.lora_names import COMPONENTS, KOHYA_PREFIXES, NameTable
from jaxsd.convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from jaxsd.convert.unet import abstract_unet_params
from jaxsd.errors import InputError
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel
from jaxsd.models.clip import example_inputs as clip_inputs
from jaxsd.models.lora import AdapterSpec, concat_adapters
from jaxsd.models.names import ModulePath
from jaxsd.models.params import abstract_params
from jaxsd.models.unet import UNetConfig

LAYOUTS = ("peft", "kohya")
# key fragments of adapter types jaxsd does not implement -> their name for the error
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
               "lora_mid": "LoCon with Tucker decomposition (lora_mid)", "oft_": "OFT", "boft_": "BOFT",
               ".diff": "full weight difference (diff)", "ia3_": "IA3", "lora_B.bias": "a bias on lora_B (lora_bias)"}
# PEFT's names, and the spellings diffusers' `convert_state_dict_to_diffusers` gives attention layers
# (its training scripts save those): UNet `to_q.lora.down`, text encoder `q_proj.lora_linear_layer.down`
_PEFT_SUFFIX = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}
_KOHYA_SUFFIX = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


class LoraBaseWarning(UserWarning):
    """A LoRA file recorded another base UNet than the one it is applied to."""


@dataclass
class LoraLayer:
    """One adapted layer: down [in, r] (conv [kh, kw, in, r]), up [r, out] (conv [1, 1, r, out]),
    scale = alpha / rank. alpha_dtype: the dtype of a kohya `.alpha` tensor (kept for round trips)."""

    down: np.ndarray
    up: np.ndarray
    alpha: float
    alpha_dtype: np.dtype | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])


@dataclass
class LoraWeights:
    """A LoRA: {component ("unet", "text_encoder", "text_encoder_2"): {module path: LoraLayer}}.

    layout / metadata / file_keys: the file's layout, safetensors metadata and, per layer, its
    tensor keys ({"down": key, "up": key[, "alpha": key]}), when it came from a file. Writing in the
    same layout reuses the keys, so a file read and written back has the same keys.
    """

    layers: dict[str, dict[ModulePath, LoraLayer]]
    layout: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "adapters"
    file_keys: dict[str, dict[ModulePath, dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def from_adapters(cls, adapters: Mapping[str, Mapping], plans: Mapping[str, Mapping[ModulePath, AdapterSpec]]
                      ) -> LoraWeights:
        """From "lora" trees ({component: tree}, e.g. trained) and the plans that made them (for alpha)."""
        layers: dict[str, dict[ModulePath, LoraLayer]] = {}
        for component, tree in adapters.items():
            flat = traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, v: "down" in v)
            plan = plans.get(component, {})
            out = {}
            for path, ad in sorted(flat.items()):
                if path not in plan:
                    raise ValueError(f"{component} adapter {'/'.join(path)} has no entry in the plan (for its alpha)")
                down, up = (np.asarray(jax.device_get(ad[k])) for k in ("down", "up"))
                if down.shape[-1] != plan[path].rank:
                    raise ValueError(f"{component} adapter {'/'.join(path)}: rank {down.shape[-1]} but the plan "
                                     f"says {plan[path].rank}")
                out[path] = LoraLayer(down, up, plan[path].alpha)
            layers[component] = out
        return cls(layers)

    def count(self) -> int:
        return sum(len(v) for v in self.layers.values())


@functools.lru_cache(maxsize=8)
def _clip_abstract(config: CLIPTextConfig) -> dict:
    return abstract_params(CLIPTextModel(config), *clip_inputs(config))[0]


class LoraModel:
    """The model a LoRA file is read against or written for: its family (which kohya names) and
    the layers of each component that can be adapted.

    text_encoders: {"text_encoder": CLIPTextConfig, "text_encoder_2": ...} — the CLIP encoders
      (SD1/SD2: one, SDXL: two, the T5 hybrid: none; T5 adapters are not supported).
    """

    def __init__(self, family: str, unet_config: UNetConfig, text_encoders: Mapping[str, CLIPTextConfig] = ()):
        self.family = family
        self.unet_config = unet_config
        self.tables: dict[str, NameTable] = {"unet": NameTable("unet", family, abstract_unet_params(unet_config),
                                                               unet_config)}
        for name, config in dict(text_encoders).items():
            if name not in COMPONENTS[1:]:
                raise ValueError(f"text encoder component {name!r}: choose from {COMPONENTS[1:]}")
            self.tables[name] = NameTable(name, family, _clip_abstract(config))
        self._index = {key: (table.component, path) for table in self.tables.values()
                       for key, path in table._read.items()}

    def lookup(self, file_module: str) -> tuple[str, ModulePath] | None:
        return self._index.get(file_module)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(layout, module name as in the file, part) of a LoRA tensor key; None if it is no LoRA key."""
    for layout, suffixes in (("peft", _PEFT_SUFFIX), ("kohya", _KOHYA_SUFFIX)):
        for suffix, part in suffixes.items():
            if key.endswith(suffix):
                return layout, key[: -len(suffix)], part
    return None


def _open(path: str | os.PathLike) -> SafetensorsFile:
    if not os.path.isfile(path):
        raise InputError(f"LoRA file {path}: no such file")
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise InputError(f"LoRA file {e}") from None


def lora_file_components(path: str | os.PathLike) -> dict[str, list[str]]:
    """{component: its tensor keys} of a LoRA file, by key prefix (PEFT `unet.` / `text_encoder.` /
    `text_encoder_2.`, kohya `lora_unet_` / `lora_te_`, `lora_te1_` / `lora_te2_`), read from the
    header only — which models a file adapts, before reading it against them. Other keys are left out
    (`read_lora` names them)."""
    keys = list(_open(path))
    prefixes = [(c, f"{c}.") for c in COMPONENTS] + [(c, p) for c, ps in KOHYA_PREFIXES.items() for p in ps]
    found: dict[str, list[str]] = {}
    for key in keys:
        component = next((c for c, prefix in prefixes if key.startswith(prefix)), None)
        if component is not None:
            found.setdefault(component, []).append(key)
    return found


def _refuse_unsupported(keys: Sequence[str], source: str) -> None:
    found: dict[str, list[str]] = {}
    for key in keys:
        for fragment, kind in UNSUPPORTED.items():
            if fragment in key:
                found.setdefault(kind, []).append(key)
    if found:
        kinds = "; ".join(f"{kind} (e.g. {names[0]})" for kind, names in found.items())
        raise InputError(f"{source}: holds adapter types jaxsd does not support: {kinds}. jaxsd applies plain "
                         "LoRA and LoCon (lora_A/lora_B or lora_down/lora_up/alpha) only")


def _to_jaxsd(arr: np.ndarray) -> np.ndarray:
    """[n, m] -> [m, n]; conv [n, m, kh, kw] -> [kh, kw, m, n] (torch -> jaxsd layout)."""
    return np.ascontiguousarray(arr.T if arr.ndim == 2 else arr.transpose(2, 3, 1, 0))


def _to_file(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.T if arr.ndim == 2 else arr.transpose(3, 2, 0, 1))


def _check_shapes(down: np.ndarray, up: np.ndarray, kernel: tuple[int, ...]) -> str | None:
    """Why (down, up) in jaxsd layout cannot adapt a kernel of shape `kernel`; None if they can."""
    if down.ndim != len(kernel) or up.ndim != len(kernel):
        kind = "a conv" if len(kernel) == 4 else "a linear layer"
        return f"{down.ndim}-D/{up.ndim}-D weights for {kind} (kernel {kernel})"
    if down.shape[-1] != up.shape[-2]:
        return f"rank mismatch between down (rank {down.shape[-1]}) and up (rank {up.shape[-2]})"
    want_down, want_up = kernel[:-1] + (down.shape[-1],), (1,) * (len(kernel) - 2) + (up.shape[-2], kernel[-1])
    if down.shape != want_down or up.shape != want_up:
        return (f"shapes down {_to_file(down).shape} / up {_to_file(up).shape} (file layout) do not fit the "
                f"layer's kernel {kernel} (jaxsd layout)")
    return None


def _fail(source: str, model: LoraModel, unknown: list[str], problems: list[str]) -> None:
    lines = [f"{source} does not fit this {model.family} model:"]
    if unknown:
        lines.append(f"  keys that name no adaptable layer of the model ({len(unknown)} layers/keys): "
                     + ", ".join(sorted(unknown)[:10]) + (" ..." if len(unknown) > 10 else ""))
        lines.append(f"  (the model has {', '.join(model.tables)}; is the LoRA for another architecture?)")
    if problems:
        lines.append(f"  layers that do not fit ({len(problems)}): " + "; ".join(problems[:10])
                     + (" ..." if len(problems) > 10 else ""))
    raise InputError("\n".join(lines))


def read_lora(path: str | os.PathLike, model: LoraModel) -> LoraWeights:
    """Read a PEFT/diffusers or kohya LoRA safetensors file onto `model`.

    Every key must name an adaptable layer of the model with fitting shapes; anything else is
    one InputError naming the first keys that do not fit. Tensors keep the file's dtype.
    """
    source = str(path)
    f = _open(path)
    keys = list(f)
    if not keys:
        raise InputError(f"{source}: holds no tensors, so no LoRA")
    _refuse_unsupported(keys, source)
    groups: dict[str, dict[str, str]] = {}
    layouts, unknown, problems = set(), [], []
    for key in keys:
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        layouts.add(split[0])
        groups.setdefault(split[1], {})[split[2]] = key
    if len(layouts) > 1:
        raise InputError(f"{source}: mixes PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) keys; a LoRA "
                         "file uses one layout")
    layout = layouts.pop() if layouts else "peft"
    layers: dict[str, dict[ModulePath, LoraLayer]] = {}
    file_keys: dict[str, dict[ModulePath, dict[str, str]]] = {}
    configs: dict[str, dict | None] = {}
    for module, parts in sorted(groups.items()):
        found = model.lookup(module)
        if found is None:
            unknown.append(module + (".*" if len(parts) > 1 else "." + parts.popitem()[1][len(module) + 1:]))
            continue
        component, mpath = found
        if "down" not in parts or "up" not in parts:
            problems.append(f"{module}: has {sorted(parts)} but needs both down and up weights")
            continue
        down, up = _to_jaxsd(np.array(f[parts["down"]])), _to_jaxsd(np.array(f[parts["up"]]))
        why = _check_shapes(down, up, model.tables[component].layers[mpath])
        if why:
            problems.append(f"{module}: {why}")
            continue
        rank, alpha_dtype = down.shape[-1], None
        if layout == "kohya":
            alpha = float(rank)  # kohya: no alpha -> alpha = rank
            if "alpha" in parts:
                stored = np.asarray(f[parts["alpha"]])
                if stored.size != 1:
                    problems.append(f"{parts['alpha']}: alpha must be one number, has shape {stored.shape}")
                    continue
                alpha, alpha_dtype = float(stored.reshape(())), stored.dtype
        else:
            if component not in configs:
                configs[component] = peft_component_config(f.metadata, component, source)
            alpha = peft_alpha(configs[component], model.tables[component].module_name(mpath), rank, source)
        layers.setdefault(component, {})[mpath] = LoraLayer(down, up, alpha, alpha_dtype)
        file_keys.setdefault(component, {})[mpath] = parts
    if unknown or problems:
        _fail(source, model, unknown, problems)
    return LoraWeights(layers, layout, dict(f.metadata), source, file_keys)


def write_lora(path: str | os.PathLike, weights: LoraWeights, model: LoraModel, *, layout: str = "peft",
               dtype=None, info: LoraInfo | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Write `weights` as a LoRA safetensors file in `layout` ("peft" or "kohya").

    dtype: tensor dtype in the file (None: each array's own, so a read file writes back bit-exactly).
    info: what to record about how the LoRA was made (`LoraInfo`: `jaxsd.*` keys, and kohya's
      `ss_*` keys for kohya); metadata: further string keys, written last.
    """
    if layout not in LAYOUTS:
        raise InputError(f"LoRA layout {layout!r} unknown; choose one of {LAYOUTS}")
    cast = (lambda a: a) if dtype is None else (lambda a: np.asarray(a, dtype=dtype))
    tensors: dict[str, np.ndarray] = {}
    adapter_config: dict = {}
    for component, layers in weights.layers.items():
        table = model.tables.get(component)
        missing = [p for p in layers if table is None or p not in table.layers]
        if missing:
            raise InputError(f"LoRA layers {component}: {['/'.join(p) for p in missing[:5]]} are not adaptable "
                             f"layers of this {model.family} model")
        ranks_alphas = {}
        own_keys = weights.file_keys.get(component, {}) if weights.layout == layout else {}
        for mpath, layer in sorted(layers.items()):
            if layout == "peft":
                name = f"{component}.{table.module_name(mpath)}"
                keys = {"down": f"{name}.lora_A.weight", "up": f"{name}.lora_B.weight"}
                ranks_alphas[table.module_name(mpath).removeprefix("text_model.")] = (layer.rank, layer.alpha)
            else:
                name = table.kohya[mpath]
                keys = {"down": f"{name}.lora_down.weight", "up": f"{name}.lora_up.weight", "alpha": f"{name}.alpha"}
            own = own_keys.get(mpath, {})
            keys = {part: own.get(part, default) for part, default in keys.items()}
            tensors[keys["down"]] = cast(_to_file(layer.down))
            tensors[keys["up"]] = cast(_to_file(layer.up))
            if "alpha" in keys:
                alpha_dtype = dtype or layer.alpha_dtype or tensors[keys["down"]].dtype
                tensors[keys["alpha"]] = np.asarray(layer.alpha, dtype=alpha_dtype)
        if layout == "peft" and ranks_alphas:
            adapter_config.update(peft_adapter_metadata(component, ranks_alphas))
    if not tensors:
        raise InputError("no LoRA layers to write")
    meta = {"format": "pt"}
    if adapter_config:
        meta[ADAPTER_METADATA_KEY] = encode_adapter_metadata(adapter_config)
    if info is not None:
        meta.update(info.metadata(layout))
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    save_file(tensors, path, meta)


def lora_variables(weights: LoraWeights, scale: float = 1.0, dtype=jnp.float32) -> dict[str, dict]:
    """{component: "lora" tree} with scale = `scale` · alpha / rank per layer (f32)."""
    out = {}
    for component, layers in weights.layers.items():
        flat = {}
        for mpath, layer in layers.items():
            flat[mpath + ("down",)] = jnp.asarray(layer.down, dtype)
            flat[mpath + ("up",)] = jnp.asarray(layer.up, dtype)
            flat[mpath + ("scale",)] = jnp.full((layer.rank,), scale * layer.alpha / layer.rank, jnp.float32)
        out[component] = traverse_util.unflatten_dict(flat)
    return out


def combine_loras(loras: Sequence[tuple[LoraWeights, float]], dtype=jnp.float32) -> dict[str, dict]:
    """Several LoRAs at their scales as one {component: "lora" tree} (ranks concatenated per layer)."""
    per_component: dict[str, list[dict]] = {}
    for weights, scale in loras:
        for component, tree in lora_variables(weights, scale, dtype).items():
            per_component.setdefault(component, []).append(tree)
    return {component: concat_adapters(trees) for component, trees in per_component.items()}


def warn_if_other_base(weights: LoraWeights, unet_fingerprint: str) -> bool:
    """Warn (LoraBaseWarning) when the file recorded a base-UNet fingerprint other than
    `unet_fingerprint`; returns whether it did."""
    recorded = weights.metadata.get(BASE_HASH_KEY)
    if recorded and recorded != unet_fingerprint:
        warnings.warn(f"{weights.source} was made for another base UNet (its {BASE_HASH_KEY} is {recorded}, "
                      f"this model's is {unet_fingerprint}); it may not work as intended", LoraBaseWarning,
                      stacklevel=2)
        return True
    return False


__all__ = ["LAYOUTS", "LoraBaseWarning", "LoraInfo", "LoraLayer", "LoraModel", "LoraWeights", "combine_loras",
           "lora_file_components", "lora_variables", "read_lora", "warn_if_other_base", "write_lora"]
