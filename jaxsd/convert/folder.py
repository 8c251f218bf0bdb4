"""Component folders on disk: `config.json` + safetensors weights (diffusers and transformers).

diffusers:     unet/config.json + diffusion_pytorch_model[.variant].safetensors
transformers:  text_encoder/config.json + model[.variant].safetensors
Either may be sharded: `<name>.safetensors.index.json` (or `.index.<variant>.json`)
maps each tensor to a shard file.

Pickle checkpoints (.bin/.ckpt/.pt/.pth) are refused: unpickling runs arbitrary
code. `allow_pickle=True` opts in to `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.errors import InputNotFoundError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")  # PyTorch pickles: read only with allow_pickle


class ComponentError(InputNotFoundError):
    """A component folder that is missing or lacks readable weights."""


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ComponentError(f"{folder}: no config.json — not a diffusers/transformers component folder")
    with open(path) as fh:
        return json.load(fh)


def write_config(folder: str | os.PathLike, config: Mapping) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / "config.json", "w") as fh:
        json.dump(dict(config), fh, indent=2, sort_keys=True)
        fh.write("\n")


class ShardedState(Mapping[str, np.ndarray]):
    """Lazy union of several safetensors files (one checkpoint split in shards)."""

    def __init__(self, files: list[SafetensorsFile]):
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f:
                self._where[k] = f

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_pickle_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch pickle checkpoint as name -> numpy array, with `torch.load(weights_only=True)`; only on opt-in."""
    import torch  # only on explicit opt-in

    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def open_weights(folder: str | os.PathLike, weights_name: str, *, variant: str | None = None,
                 allow_pickle: bool = False) -> Mapping[str, np.ndarray]:
    """Open a component's weights lazily. Returns name -> array, each read from the file when indexed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ComponentError(f"{folder}: component folder does not exist")
    if (folder / "single_file.json").is_file():  # a component of a single-file checkpoint (single_file/to_folder.py)
        from jaxsd.convert.single_file.to_folder import open_pointer
        return open_pointer(folder, variant)
    stem = f"{weights_name}.{variant}" if variant else weights_name
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return SafetensorsFile(single)
    for index in (folder / f"{stem}.safetensors.index.json",
                  folder / f"{weights_name}.safetensors.index.{variant}.json" if variant else None):
        if index is not None and index.is_file():
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
            missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
            if missing:
                raise ComponentError(f"{index}: shard files missing: {', '.join(missing)}")
            return ShardedState([SafetensorsFile(folder / s) for s in sorted(set(weight_map.values()))])
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if allow_pickle:
            return read_pickle_state(folder / pickles[0])
        raise ComponentError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}). jaxsd loads safetensors only, because "
            "unpickling a file can run arbitrary code. Convert once with diffusers/transformers: "
            "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`, "
            "or opt in with allow_pickle=True (uses torch.load(weights_only=True)).")
    have = sorted(p.name for p in folder.iterdir())
    raise ComponentError(f"{folder}: no {stem}.safetensors (or sharded index) found; folder has: {', '.join(have) or 'nothing'}")


def save_weights(folder: str | os.PathLike, state: Mapping[str, np.ndarray], weights_name: str, *,
                 variant: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Write a state dict as one safetensors file, or shards + index when larger than max_shard_bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{weights_name}.{variant}" if variant else weights_name
    meta = {"format": "pt"}
    total = sum(np.asarray(v).nbytes for v in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, folder / f"{stem}.safetensors", meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(state):
        n = np.asarray(state[k]).nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, meta)
        weight_map.update({k: name for k in shard})
    # diffusers/transformers put the variant before `.json`: `<name>.safetensors.index.fp16.json`
    index = f"{weights_name}.safetensors.index.{variant}.json" if variant else f"{weights_name}.safetensors.index.json"
    with open(folder / index, "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
