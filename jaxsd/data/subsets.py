"""Dataset subsets: groups of folders with their own repeats, captions, kind and loss weight.

`data.subsets: [{roots, repeats, caption, caption_prefix, class: instance|prior, loss_weight}]`;
`data.roots` is the shorthand for one instance subset with the defaults. The cache treats every
root as before (one manifest each); a subset's fixed caption or prefix changes what its text
sidecars are made from. The loader reads each sample `repeats` times per epoch ("slots"), and
with a prior subset (DreamBooth's class images) fills every batch half from instance slots,
half from prior slots (`jaxsd.data.loader`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxsd.data.config import DataConfig, DreamBoothConfig, SubsetConfig
from jaxsd.errors import ConfigError

KINDS = ("instance", "prior")


def data_subsets(cfg: DataConfig) -> list[SubsetConfig]:
    """The subsets of `cfg`: `data.subsets`, or one default subset of `data.roots` (+ the TFDS source)."""
    if cfg.subsets:
        return list(cfg.subsets)
    return [SubsetConfig(roots=tuple(cfg.roots))]


def check_subsets(cfg: DataConfig) -> None:
    """Values OmegaConf cannot check: kinds, repeats, weights, a root in two subsets, both spellings."""
    if not cfg.subsets:
        return
    if cfg.roots:
        raise ConfigError("set either data.roots (one subset) or data.subsets, not both: put those roots into "
                          "a subset of their own")
    if cfg.packed:
        raise ConfigError("data.subsets with data.packed is not supported: train subsets from their sidecar "
                          "caches (data.packed=[])")
    seen: dict[str, int] = {}
    for i, s in enumerate(cfg.subsets):
        where = f"data.subsets[{i}]"
        if not s.roots:
            raise ConfigError(f"{where}.roots is empty: list the image folders of this subset")
        if s.kind not in KINDS:
            raise ConfigError(f"{where}.class={s.kind!r} is not one of {', '.join(KINDS)}")
        if s.repeats < 1:
            raise ConfigError(f"{where}.repeats={s.repeats} must be >= 1 (how often an epoch sees each image)")
        if s.loss_weight < 0:
            raise ConfigError(f"{where}.loss_weight={s.loss_weight} must be >= 0")
        for r in s.roots:
            key = str(Path(r))
            if key in seen:
                raise ConfigError(f"{where}: folder {r} is already in data.subsets[{seen[key]}]; a folder's cache "
                                  "holds one caption per image, so it can belong to one subset only")
            seen[key] = i
    if cfg.tfds.name:
        raise ConfigError("data.subsets with data.tfds is not supported: list folders in the subsets")


def subset_roots(cfg: DataConfig) -> list[tuple[str, int]]:
    """(folder, subset index) for every folder of every subset, in cache order."""
    return [(str(Path(r)), i) for i, s in enumerate(data_subsets(cfg)) for r in s.roots]


def with_class_subset(cfg: DataConfig, db: DreamBoothConfig) -> DataConfig:
    """`cfg` plus DreamBooth's class folder as a prior subset (caption: the class prompt, weight:
    prior_loss_weight); `cfg` itself when prior preservation is off."""
    if not db.enabled:
        return cfg
    if not db.class_dir:
        raise ConfigError("dreambooth.class_prompt is set but dreambooth.class_dir is not: name the folder the "
                          "class images are generated into")
    if db.num_class_images < 1 or db.prior_loss_weight < 0:
        raise ConfigError(f"dreambooth.num_class_images={db.num_class_images} must be >= 1 and "
                          f"dreambooth.prior_loss_weight={db.prior_loss_weight} >= 0")
    subsets = list(cfg.subsets) or [SubsetConfig(roots=tuple(cfg.roots))]
    if any(str(Path(r)) == str(Path(db.class_dir)) for s in subsets for r in s.roots):
        raise ConfigError(f"dreambooth.class_dir {db.class_dir} is also listed in data.roots / data.subsets; "
                          "it is added as the prior subset by itself, remove it there")
    subsets.append(SubsetConfig(roots=(db.class_dir,), caption=db.class_prompt, kind="prior",
                                loss_weight=db.prior_loss_weight))
    out = dataclasses.replace(cfg, roots=(), subsets=subsets)
    check_subsets(out)
    return out


def without_ungenerated_class_folder(cfg: DataConfig) -> tuple[DataConfig, list[str]]:
    """`jaxsd cache` before the class images exist: (cfg without the prior subsets whose folders do not
    exist yet, those folders). `jaxsd dreambooth-classes` / `jaxsd train` generate and cache them."""
    kept = [s for s in cfg.subsets if not (s.kind == "prior" and all(not Path(r).exists() for r in s.roots))]
    gone = sorted({r for s in cfg.subsets if s not in kept for r in s.roots})
    return (dataclasses.replace(cfg, subsets=kept) if gone else cfg), gone


@dataclasses.dataclass(frozen=True)
class Slots:
    """What an epoch draws from: each sample once per repeat, split into the instance and prior pools.

    instance / prior: store indices [n], a sample repeated `repeats` times; prior is empty without a
    prior subset. weight: loss weight per store index [samples] float32 (None without data.subsets).
    """

    instance: np.ndarray
    prior: np.ndarray
    weight: np.ndarray | None

    @property
    def count(self) -> int:
        return len(self.instance) + len(self.prior)


def make_slots(cfg: DataConfig, entry_locations: np.ndarray) -> Slots:
    """Slots of a store whose entry i comes from cache location `entry_locations[i]` (cache_roots order)."""
    if not cfg.subsets:
        return Slots(np.arange(len(entry_locations)), np.zeros(0, np.int64), None)
    subsets = data_subsets(cfg)
    subset_of_location = np.array([i for _, i in subset_roots(cfg)], np.int64)
    subset = subset_of_location[entry_locations]
    repeats = np.array([s.repeats for s in subsets], np.int64)[subset]
    slots = np.repeat(np.arange(len(subset)), repeats)
    prior = np.array([s.kind == "prior" for s in subsets])[subset]
    weight = np.array([s.loss_weight for s in subsets], np.float32)[subset]
    return Slots(slots[~prior[slots]], slots[prior[slots]], weight)
