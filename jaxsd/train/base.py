"""The frozen base: the params a run does not train, kept out of its checkpoints.

Frozen params never change during a run, so a checkpoint does not hold them (for a LoRA run
that is the whole UNet: megabytes instead of gigabytes per save). They are loaded again from
where the run got them — `model.pretrained`, or the random init of `train.seed` — and a
fingerprint stored in each checkpoint's meta makes sure it is the same base: a different one is
refused with one message instead of silently training adapters on the wrong weights.

The fingerprint is cheap (no full read of a multi-GB file): the UNet's config.json, and per
weights file its name, size and a SHA-256 of its first and last MiB — safetensors files begin
with a header listing every tensor's name, dtype, shape and offset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax

from jaxsd.config import Config
from jaxsd.train.model import initial_params, unet_folder
from jaxsd.train.plan import StatePlan
from jaxsd.train.step import TrainState
from jaxsd.train.trainable import split_params

_EDGE = 1 << 20


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
        h.update(f.read(_EDGE))
    return f"{path.name}:{size}:{h.hexdigest()}"


def base_fingerprint(cfg: Config) -> str:
    """What the frozen params of `cfg` are made from, as a short stable string."""
    if not cfg.model.pretrained:
        unet = json.dumps(dict(cfg.model.unet), sort_keys=True)
        return "scratch:" + hashlib.sha256(f"{unet}|seed={cfg.train.seed}".encode()).hexdigest()[:16]
    folder = unet_folder(cfg.model.pretrained)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")
                     and (cfg.model.variant is None or f".{cfg.model.variant}." in p.name))
    parts = [(folder / "config.json").read_text(), *(_file_digest(p) for p in weights)]
    return "pretrained:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_frozen(cfg: Config, plan: StatePlan) -> Any:
    """The run's frozen params, loaded as at the start of the run and placed with their shardings."""
    if not jax.tree.leaves(plan.abstract.frozen):
        return plan.abstract.frozen  # nothing frozen: an empty tree
    params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings, dtype=plan.base_dtype)
    if plan.adapters is not None:
        return params  # LoRA: the whole UNet is the frozen base
    return split_params(params, cfg.train.trainable, cfg.train.frozen)[1]


def checkpointed(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds of a train state (or of its abstract plan): every field with arrays,
    except the frozen params."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name != "frozen" and jax.tree.leaves(getattr(state, f.name))}


def from_checkpoint(restored: dict[str, Any], frozen: Any, abstract: TrainState) -> TrainState:
    """The train state from a checkpoint's fields (`checkpointed`) and the reloaded frozen params."""
    return abstract.replace(**restored, frozen=frozen)
