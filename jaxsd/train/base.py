"""The frozen base: the params a run does not train, kept out of its checkpoints.

Frozen params never change during a run, so a checkpoint does not hold them (for a LoRA run
that is the whole UNet: megabytes instead of gigabytes per save). They are loaded again from
where the run got them — `model.pretrained`, or the random init of `train.seed` — and a
fingerprint stored in each checkpoint's meta makes sure it is the same base: a different one is
refused with one message instead of silently training adapters on the wrong weights.

A run that encodes its text in the step (token-id cache, `jaxsd.train.text`) has the text encoders
as frozen params too: they are reloaded from `data.cache.text_encoder` the same way, and their folders
are part of the fingerprint (a resume with another text encoder is refused like one with another UNet).
The perceptual loss's VAE decoder, VGG16 and style Gram matrices (`loss.perceptual`) are frozen params too,
reloaded from their files; they shape the loss, not the base, so they are not fingerprinted (their paths are
in the config a resume compares).

The fingerprint is cheap (no full read of a multi-GB file): each component's config.json, and per
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
from jaxsd.convert.single_file.to_folder import view_source
from jaxsd.train.model import initial_params, unet_folder
from jaxsd.train.perceptual import PERCEPTUAL
from jaxsd.train.plan import StatePlan
from jaxsd.train.step import TrainState
from jaxsd.train.text import load_text_params, text_folders
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


def _folder_parts(folder: Path, variant: str | None) -> list[str]:
    """A component folder's config.json and the digests of its weights files (of `variant`)."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")
                     and (variant is None or f".{variant}." in p.name))
    source = view_source(folder)  # a single-file checkpoint's UNet: that file
    weights += [source] if source else []
    return [(folder / "config.json").read_text(), *(_file_digest(p) for p in weights)]


def base_fingerprint(cfg: Config) -> str:
    """What the frozen params of `cfg` are made from, as a short stable string."""
    if cfg.model.kind == "vae":
        from jaxsd.train.vae_plan import vae_fingerprint
        return vae_fingerprint(cfg, _folder_parts, _file_digest)
    if not cfg.model.pretrained:
        unet = json.dumps(dict(cfg.model.unet), sort_keys=True)
        base = "scratch:" + hashlib.sha256(f"{unet}|seed={cfg.train.seed}".encode()).hexdigest()[:16]
    else:
        parts = _folder_parts(unet_folder(cfg.model.pretrained), cfg.model.variant)
        base = "pretrained:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    folders = text_folders(cfg)
    if not folders:
        return base
    parts = [f"{f.name}\n" + "\n".join(_folder_parts(f, cfg.data.cache.variant or None)) for f in folders]
    return f"{base}+text:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_frozen(cfg: Config, plan: StatePlan, *, text: bool = True) -> Any:
    """The run's frozen params, loaded as at the start of the run and placed with their shardings.

    text=False: without the text encoders of a text-in-the-step run nor the perceptual loss's VAE decoder and
    VGG16 ({"unet": ...} only), for callers that need the UNet alone (exporting it)."""
    if cfg.model.kind == "vae":
        from jaxsd.train.vae_plan import load_vae_frozen
        return load_vae_frozen(cfg, plan)
    unet = plan.unet_parts(plan.abstract.params, plan.abstract.frozen)[1]
    if jax.tree.leaves(unet):
        params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings, dtype=plan.base_dtype)
        # LoRA: the whole UNet is the frozen base
        unet = params if plan.adapters is not None else split_params(params, cfg.train.trainable, cfg.train.frozen)[1]
    if not plan.frozen_keyed:
        return unet  # (nothing frozen: the empty tree)
    if not text:
        return {"unet": unet}
    frozen = {"unet": unet}
    if plan.text is not None:
        _, kept = plan.text.split(load_text_params(plan.text, plan.base_dtype, plan.text_shardings()))
        frozen.update(kept)  # (train.text_encoder full: the trained part is the checkpoint's)
    if plan.perceptual is not None:
        frozen[PERCEPTUAL] = plan.load_perceptual(cfg)
    return frozen


def checkpointed(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds of a train state (or of its abstract plan): every field with arrays,
    except the frozen params."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name != "frozen" and jax.tree.leaves(getattr(state, f.name))}


def from_checkpoint(restored: dict[str, Any], frozen: Any, abstract: TrainState) -> TrainState:
    """The train state from a checkpoint's fields (`checkpointed`) and the reloaded frozen params."""
    return abstract.replace(**restored, frozen=frozen)
