"""Where image + caption pairs come from: folder trees and tensorflow-datasets.

A source lists `Item`s and opens them. Each item has a `key` (its name inside
its cache root; `sub/foo` for `root/sub/foo.jpg`) and a `root`, the directory
where its cache sidecars (`root/sub/foo.sd_vae`) and the manifest go. For a
folder that is the folder itself; a TFDS dataset has no folder, so its cache
lives under `tfds.cache_dir`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from jaxsd.data.config import DataConfig, TFDSConfig
from jaxsd.data.images import decode, read_bytes
from jaxsd.errors import ConfigError, InputNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # preference order for duplicate stems
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class Item:
    """One image + caption. `path` is the image file (or `tfds:name/split[i]`), for reports."""

    source: int  # index of its source in the list returned by `open_sources`
    root: str
    key: str
    path: str
    caption_path: str | None = None
    index: int = -1  # record index for TFDS


@dataclass(frozen=True)
class Problem:
    """A file the scan itself rejects (before any decoding), e.g. a duplicate stem."""

    path: str
    reason: str


class FolderSource:
    """Images (jpg/jpeg/png/webp) under `root`, recursively, each with `same-stem.txt` or `.caption`.

    caption: one fixed caption for every image (a subset's; caption files are then not read).
    caption_prefix: put before every caption.
    """

    def __init__(self, root: str | os.PathLike, source_id: int = 0, caption: str | None = None,
                 caption_prefix: str = ""):
        self.root = Path(root)
        self.source_id = source_id
        self.caption, self.caption_prefix = caption, caption_prefix
        if not self.root.is_dir():
            raise InputNotFoundError(f"data root {self.root} does not exist or is not a directory "
                                     "(set data.roots to folders of foo.jpg + foo.txt pairs)")

    def scan(self) -> tuple[list[Item], list[Problem]]:
        groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
        captions: dict[tuple[str, str], Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                stem, ext = os.path.splitext(name)
                key = (rel_dir, stem)
                if ext.lower() in IMAGE_EXTENSIONS:
                    groups[key].append(Path(dirpath) / name)
                elif ext.lower() in CAPTION_EXTENSIONS and (key not in captions or ext.lower() == ".txt"):
                    captions[key] = Path(dirpath) / name  # .txt wins over .caption when both exist
        items, problems = [], []
        for (rel_dir, stem), paths in sorted(groups.items()):
            paths.sort(key=lambda p: (IMAGE_EXTENSIONS.index(p.suffix.lower()), p.name))
            kept, *dupes = paths
            for d in dupes:
                problems.append(Problem(str(d), f"duplicate stem: {kept.name} has the same name and is used"))
            key = stem if rel_dir == "." else f"{rel_dir}/{stem}".replace(os.sep, "/")
            cap = captions.get((rel_dir, stem))
            items.append(Item(self.source_id, str(self.root), key, str(kept), str(cap) if cap else None))
        return items, problems

    def open_image(self, item: Item) -> Image.Image:
        return decode(read_bytes(item.path))

    def read_caption(self, item: Item) -> tuple[str | None, list[str]]:
        """The caption (None if there is no caption file) and notes about how it was read."""
        if self.caption is not None:
            return (self.caption_prefix + self.caption).strip(), []
        if item.caption_path is None:
            return None, []
        raw = read_bytes(item.caption_path)
        try:
            text, notes = raw.decode("utf-8-sig").strip(), []
        except UnicodeDecodeError:
            text, notes = raw.decode("latin-1").strip(), ["caption is not UTF-8; read as Latin-1"]
        return (self.caption_prefix + text).strip() if text else text, notes


class TFDSSource:
    """A TFDS dataset through `tfds.data_source` (random access over ArrayRecord; no TensorFlow)."""

    def __init__(self, cfg: TFDSConfig, source_id: int = 0):
        import tensorflow_datasets as tfds  # optional dependency, only for TFDS sources

        self.cfg = cfg
        self.source_id = source_id
        kwargs = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
        self.data = tfds.data_source(cfg.name, split=cfg.split, **kwargs)
        features = self.data.dataset_info.features
        if cfg.image_key not in features:
            raise ConfigError(f"TFDS {cfg.name}: no image feature {cfg.image_key!r} "
                              f"(features: {', '.join(features.keys())}); set data.tfds.image_key")
        self.label_names = None
        if cfg.caption_key:
            if cfg.caption_key not in features:
                raise ConfigError(f"TFDS {cfg.name}: no caption feature {cfg.caption_key!r} "
                                  f"(features: {', '.join(features.keys())}); set data.tfds.caption_key")
        elif cfg.label_key in features:
            self.label_names = getattr(features[cfg.label_key], "names", None)
        else:
            raise ConfigError(f"TFDS {cfg.name}: neither data.tfds.caption_key nor a label feature "
                              f"{cfg.label_key!r} (features: {', '.join(features.keys())})")
        self.root = tfds_cache_root(cfg)

    def scan(self) -> tuple[list[Item], list[Problem]]:
        self.root.mkdir(parents=True, exist_ok=True)
        return [Item(self.source_id, str(self.root), f"{i:08d}", f"tfds:{self.cfg.name}/{self.cfg.split}[{i}]", None, i)
                for i in range(len(self.data))], []

    def open_image(self, item: Item) -> Image.Image:
        arr = np.asarray(self.data[item.index][self.cfg.image_key])
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(arr)

    def read_caption(self, item: Item) -> tuple[str | None, list[str]]:
        record = self.data[item.index]
        if self.cfg.caption_key:
            value = record[self.cfg.caption_key]
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text.strip(), []
        label = int(record[self.cfg.label_key])
        name = self.label_names[label] if self.label_names else str(label)
        return self.cfg.caption_template.format(label=name.replace("_", " ")).strip(), []


def tfds_cache_root(cfg: TFDSConfig) -> Path:
    """Directory of a TFDS source's sidecars and manifest: `<cache_dir>/<name>_<split>`."""
    return Path(cfg.cache_dir) / f"{cfg.name.replace('/', '_')}_{cfg.split.replace('[', '_').replace(']', '').replace(':', '-')}"


def open_sources(cfg: DataConfig) -> list[FolderSource | TFDSSource]:
    """Every configured source, in order (folder roots of every subset first, then TFDS)."""
    from jaxsd.data.subsets import data_subsets, subset_roots

    subsets = data_subsets(cfg)
    sources: list = [FolderSource(r, i, subsets[s].caption, subsets[s].caption_prefix)
                     for i, (r, s) in enumerate(subset_roots(cfg))]
    if cfg.tfds.name:
        sources.append(TFDSSource(cfg.tfds, len(sources)))
    if not sources:
        raise ConfigError("no data source configured: set data.roots=[path, ...] or data.tfds.name")
    return sources
