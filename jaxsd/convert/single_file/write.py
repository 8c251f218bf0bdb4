"""Write a diffusers pipeline folder (SD1, SD2, SDXL) as one single-file checkpoint in the LDM layout.

Tensor by tensor (`safetensors_io.save_file_streamed`): each is read from the memory-mapped component
files, renamed (`names.py`), re-laid out (VAE attention linears as 1×1 convs, OpenCLIP's fused q/k/v
and transposed projection), cast to `dtype` when asked, and written; only one is in memory at a time.

The metadata records what no tensor says — `jaxsd.family`, each component's config.json
(`jaxsd.config.<component>`), the scheduler config and prediction type, plus the caller's (e.g. the
training steps of `jaxsd export`) — so jaxsd reads its own files back without `--config`. A folder
`jaxsd convert` wrote from a single file holds that file's unused tensors and metadata
(`single_file_extras.safetensors`); they are written back, so the round trip gives the same file.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from jaxsd.convert.folder import open_weights, read_config
from jaxsd.convert.safetensors_io import SafetensorsFile, is_float, save_file_streamed
from jaxsd.convert.single_file import layout
from jaxsd.convert.single_file.read import META, WEIGHTS, SingleFileError, ref_for
from jaxsd.convert.single_file.to_folder import EXTRAS, view_file

Getter = Callable[[], np.ndarray]


def _entries(kind: str, prefix: str, state: Mapping[str, np.ndarray], config: Mapping) -> dict[str, Getter]:
    """LDM key -> function making its tensor, for one component's diffusers state dict."""
    groups: dict[str, dict[str, str]] = {}
    for key in state:
        if kind == "open_clip" and key.endswith("position_ids"):
            continue  # a buffer transformers 4 saved; OpenCLIP has none
        ref = ref_for(kind, key, config)
        groups.setdefault(prefix + ref.key, {})[ref.layout] = key

    def make(parts: dict[str, str]) -> Getter:
        if "qkv:0" in parts:
            if len(parts) != 3:
                raise SingleFileError(f"OpenCLIP attention needs q, k and v; found only {sorted(parts.values())}")
            return lambda: np.concatenate([state[parts[f"qkv:{i}"]] for i in range(3)], axis=0)
        (layout_, key), = parts.items()
        if layout_ == "conv1x1":
            return lambda: np.asarray(state[key])[:, :, None, None]
        if layout_ == "T":
            return lambda: np.ascontiguousarray(np.asarray(state[key]).T)
        return lambda: state[key]

    return {name: make(parts) for name, parts in groups.items()}


def _shape(kind_getter: Getter) -> tuple[tuple[int, ...], np.dtype]:
    arr = kind_getter()
    return tuple(arr.shape), arr.dtype


def _extras(folder: Path) -> tuple[SafetensorsFile | None, list[str]]:
    """(the file holding the unused tensors of the single file `folder` came from, their names): a
    converted folder's `single_file_extras.safetensors`, or for a folder view the file itself."""
    if (folder / EXTRAS).is_file():
        f = SafetensorsFile(folder / EXTRAS)
        return f, list(f)
    for name in WEIGHTS:
        source = view_file(folder / name)
        if source is not None:
            return source.file, source.extras
    return None, []


def write_single_file(folder: str | os.PathLike, out: str | os.PathLike, *, dtype=None,
                      unet: tuple[Mapping, Mapping[str, np.ndarray]] | None = None,
                      metadata: Mapping[str, str] | None = None, extras: bool = True,
                      text: Mapping[str, tuple[Mapping, Mapping[str, np.ndarray]]] | None = None) -> dict[str, int]:
    """Write pipeline `folder` as single file `out`. Returns {component: tensors written}.

    dtype: cast floating tensors (e.g. np.float16); None keeps each tensor's dtype.
    unet: (diffusers config dict, state dict) to write instead of the folder's unet/ (a trained UNet).
    text: {"text_encoder"[, "text_encoder_2"]: (transformers config dict, state dict)} to write instead of the
      folder's (trained text encoders)
    extras: write back the unused tensors of the single file the folder came from (its
      `single_file_extras.safetensors`, or the file itself for a folder view).
    """
    folder = Path(folder)
    family = layout.folder_family(folder)
    entries: dict[str, Getter] = {}
    meta: dict[str, str] = {}
    extras_file, extra_keys = _extras(folder) if extras else (None, [])
    if extras_file is not None:
        meta.update(extras_file.metadata)
    counts = {}
    components = [("unet", layout.UNET_PREFIX, "unet"), ("vae", layout.VAE_PREFIX, "vae"),
                  *((n, p, k) for n, (p, k) in layout.TEXT_ENCODERS[family].items())]
    replaced = {**({"unet": unet} if unet is not None else {}), **(text or {})}
    for name, prefix, kind in components:
        if name in replaced:
            config, state = replaced[name]
        elif (folder / name).is_dir():
            config, state = read_config(folder / name), open_weights(folder / name, WEIGHTS[name])
        else:
            continue
        part = _entries(kind, prefix, state, config)
        entries.update(part)
        counts[name] = len(part)
        meta[META + name] = json.dumps(dict(config), sort_keys=True)
    if extras_file is not None:
        # with a new UNet only the text encoders' and the VAE's extras still describe the model (the EMA
        # and the DDPM schedule buffers were the old UNet's); a new text encoder's were the old one's
        keep = tuple(p for n, p, _ in components if n not in replaced)
        for key in extra_keys:
            if key not in entries and (not replaced or key.startswith(keep)):
                entries[key] = functools.partial(extras_file.__getitem__, key)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        meta["jaxsd.scheduler"] = scheduler.read_text()
        meta["jaxsd.prediction_type"] = json.loads(meta["jaxsd.scheduler"]).get("prediction_type", "epsilon")
    meta["jaxsd.family"] = family
    meta.update(metadata or {})

    def cast(arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        return arr.astype(dtype) if dtype is not None and is_float(arr.dtype) else arr

    layout_ = {}
    for key, get in entries.items():
        shape, dt = _shape(get)
        layout_[key] = (shape, np.dtype(dtype) if dtype is not None and is_float(dt) else dt)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file_streamed(layout_, lambda k: cast(entries[k]()), out, meta)
    return counts


__all__ = ["write_single_file"]
