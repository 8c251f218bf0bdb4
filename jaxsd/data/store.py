"""Random access to cached samples: sidecar files next to the images, or packed ArrayRecord shards.

Both stores read the same manifest format, verify it against what the run
expects, and return one sample as a dict of numpy arrays:
{"latents" | "latent_mean", "latent_logvar", "time_ids"} plus the text: embeddings
{"encoder_hidden_states", "pooled"?}, or token ids (data.cache.text_mode=tokens)
{"input_ids", "attention_mask", "input_ids_2"?, "attention_mask_2"?} as int32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxsd.data.config import DataConfig
from jaxsd.data.manifest import CacheMismatch, read_manifest, verify_manifest
from jaxsd.data.records import decode_record, read_sidecar, sidecar_path
from jaxsd.data.sources import tfds_cache_root
from jaxsd.errors import ConfigError, InputError

FLIPPED = "_flipped"
EMPTY_CAPTION_KEY = "jaxsd_empty_caption"  # per-root sidecar of "" (written by the cache, for CFG dropout)


def _pick_flip(arrays: dict[str, np.ndarray], flip: bool) -> dict[str, np.ndarray]:
    """Use the `*_flipped` variants when asked and cached; drop them from the sample."""
    out = {k: v for k, v in arrays.items() if not k.endswith(FLIPPED)}
    if flip:
        out.update({k[: -len(FLIPPED)]: v for k, v in arrays.items() if k.endswith(FLIPPED)})
    return out


class CacheStore:
    """Entries (location, key, bucket) of cached samples; `read(i, flip)` returns one sample."""

    def __init__(self, manifests: list[tuple[str, dict]]):
        self.names = [where for where, _ in manifests]
        self.latents = manifests[0][1].get("latents")
        self.text = manifests[0][1].get("text")
        for where, m in manifests[1:]:
            for kind in ("latents", "text"):
                if m.get(kind) != getattr(self, kind):
                    raise CacheMismatch(f"{where}: its cached {kind} were made differently from those of "
                                        f"{manifests[0][0]}; mixed roots must be cached with the same models and "
                                        "settings (run `jaxsd cache CONFIG` over all of them)")
        self.entries: list[tuple[int, str, tuple[int, int], dict]] = []
        for loc, (_, m) in enumerate(manifests):
            for key, e in sorted(m.get("entries", {}).items()):
                self.entries.append((loc, key, tuple(e["bucket"]), e))
        if not self.entries:
            raise InputError(f"the cache at {', '.join(w for w, _ in manifests)} has no samples; "
                             "see the validation report of `jaxsd cache`")
        self.bucket_list = sorted({b for _, _, b, _ in self.entries})

    def __len__(self) -> int:
        return len(self.entries)

    def location_name(self, loc: int) -> str:
        return self.names[loc]

    def locations(self) -> np.ndarray:
        """[samples] int64: the cache location (root or pack) of each entry, in `cache_roots` order."""
        return np.array([loc for loc, _, _, _ in self.entries], dtype=np.int64)

    def bucket_ids(self) -> np.ndarray:
        ids = {b: i for i, b in enumerate(self.bucket_list)}
        return np.array([ids[b] for _, _, b, _ in self.entries], dtype=np.int64)

    def read(self, i: int, flip: bool = False, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Sample i (its flipped copy with flip). rng: the draw's generator; a cached sample has no randomness
        of its own left (its crop was drawn at cache time), so it is not used here."""
        raise NotImplementedError  # abstract: SidecarStore / PackedStore

    def empty_text(self) -> dict[str, np.ndarray] | None:
        """The empty caption's cached text (embeddings or token ids, unbatched; for conditioning dropout),
        or None without a text cache."""
        if self.text is None:
            return None
        path = sidecar_path(self.empty_dir, EMPTY_CAPTION_KEY, self.text["suffix"])
        if not path.is_file():
            raise CacheMismatch(f"{path} is missing: the empty caption's sidecar is written by `jaxsd cache`; "
                                "re-run it (with --only text)")
        return read_sidecar(path, self.text)


class SidecarStore(CacheStore):
    def __init__(self, roots: list[str], manifests: list[dict]):
        self.roots = roots
        self.empty_dir = roots[0]
        super().__init__(list(zip(roots, manifests)))

    def read(self, i: int, flip: bool = False, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        loc, key, _, _ = self.entries[i]
        out = {}
        for spec in (self.latents, self.text):
            if spec is not None:
                out.update(read_sidecar(sidecar_path(self.roots[loc], key, spec["suffix"]), spec))
        return _pick_flip(out, flip)


class PackedStore(CacheStore):
    def __init__(self, dirs: list[str], manifests: list[dict]):
        import grain  # ArrayRecord reading

        super().__init__(list(zip(dirs, manifests)))
        self.empty_dir = dirs[0]
        self.sources = [grain.sources.ArrayRecordDataSource([str(Path(d) / s) for s in m["shards"]])
                        for d, m in zip(dirs, manifests)]

    def read(self, i: int, flip: bool = False, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        loc, _, _, e = self.entries[i]
        arrays, _ = decode_record(self.sources[loc][e["record"]])
        return _pick_flip(arrays, flip)


def cache_roots(cfg: DataConfig) -> list[str]:
    """The directories holding sidecars + manifests for `cfg`'s sources (every subset's folders, in order)."""
    from jaxsd.data.subsets import subset_roots

    roots = [r for r, _ in subset_roots(cfg)]
    if cfg.tfds.name:
        roots.append(str(tfds_cache_root(cfg.tfds)))
    return roots


def open_store(cfg: DataConfig, *, latents: Mapping | None = None, text: Mapping | None = None,
               rebuild: str = "jaxsd cache CONFIG") -> CacheStore:
    """The packed shards (data.packed) if configured, else the sidecars of the sources.

    latents / text: expected specs; each location's manifest is verified against them.
    """
    locations = list(cfg.packed) if cfg.packed else cache_roots(cfg)
    if not locations:
        raise ConfigError("no cached data configured: set data.roots, data.tfds.name or data.packed")
    if latents is None and text is None:
        manifests = []
        for loc in locations:
            m = read_manifest(loc)
            if m is None:
                raise CacheMismatch(f"{loc}: no cache found; build it with `{rebuild}`")
            manifests.append(m)
    else:
        pack = " --pack DIR" if cfg.packed else ""
        manifests = [verify_manifest(loc, latents=latents, text=text, rebuild=rebuild + pack) for loc in locations]
    return (PackedStore if cfg.packed else SidecarStore)(locations, manifests)
