"""The caching engine behind `jaxsd cache`: validate, encode what is missing, write sidecars + manifest.

Per process: scan all sources, take every `process_count`-th item (each process
encodes only its own files), validate them, then encode

  latents: images grouped by target size (bucket), batches of `cache.batch_size`,
           loaded/preprocessed by a thread pool ahead of the device, encoded by the
           jitted encoder sharded over this process's devices;
  text:    captions in batches, tokenized on the host, encoded the same way (or, for a
           token-id cache, the token ids themselves);

skipping every item whose sidecar header says it is already current (resume).
Then the per-root manifest and the validation report are written (process 0
merges the other processes' parts after a barrier).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxsd.data.config import DataConfig, check_data_config
from jaxsd.data.encoders import Encoder
from jaxsd.data.images import prepare, to_rgb
from jaxsd.data.manifest import file_signature, read_manifest, text_signature, write_manifest
from jaxsd.data.records import STORAGE_DTYPES, sidecar_is_current, sidecar_path, write_sidecar
from jaxsd.data.sources import Item, open_sources
from jaxsd.data.store import EMPTY_CAPTION_KEY
from jaxsd.data.validate import Finding, Report, Valid, report_path, validate
from jaxsd.errors import InputError


@dataclass
class CacheResult:
    report: Report
    encoded: dict[str, int]
    reused: dict[str, int]
    seconds: float


def _key_seed(*parts) -> int:
    # from the file's key (not its absolute path), so a moved dataset re-encodes identically
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def _image_source(item: Item) -> str:
    return file_signature(item.path) if item.index < 0 else item.path


class ShardedEncoder:
    """`encoder.apply` jitted with its batch split over this process's devices; pads ragged batches."""

    def __init__(self, encoder: Encoder, batch_size: int):
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("batch",))
        self.batch = -(-batch_size // len(devices)) * len(devices)
        replicated, split = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("batch"))
        self.split = split
        self.params = jax.device_put(encoder.params, replicated)
        self.fn = jax.jit(encoder.apply, in_shardings=(replicated, split), out_shardings=split)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        padded = {k: np.concatenate([v, np.repeat(v[-1:], self.batch - n, 0)]) if n < self.batch else v
                  for k, v in inputs.items()}
        # an explicit transfer onto this process's devices: under jax.distributed, jit refuses
        # numpy inputs with a non-replicated sharding
        out = self.fn(self.params, jax.device_put(padded, self.split))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def _store(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):  # token ids / masks: exact, as they are
        return x
    return x.astype(np.float32).astype(STORAGE_DTYPES[dtype])


class _Run:
    def __init__(self, cfg: DataConfig, sources: Sequence, progress: bool, log: Callable[[str], None]):
        self.cfg, self.sources, self.progress, self.log = cfg, sources, progress, log
        self.failed: list[Finding] = []

    # ---- latents -------------------------------------------------------------------------
    def _load(self, target: tuple[int, int], chunk: list[Valid]):
        cfg, pixels, time_ids, kept = self.cfg, [], [], []
        for v in chunk:
            try:
                rgb, _ = to_rgb(self.sources[v.item.source].open_image(v.item), cfg.validation.background)
            except Exception as e:  # the file changed since validation; report it, keep going
                self.failed.append(Finding(v.item.path, "skipped", (f"unreadable during caching: {e}",)))
                continue
            flips = (False, True) if cfg.image.random_flip else (False,)
            for flip in flips:  # the same crop for both: one rng per item, re-seeded per flip
                rng = np.random.default_rng(_key_seed(cfg.image.seed, v.item.key))
                p = prepare(rgb, *target, crop=cfg.image.crop, flip=flip, rng=rng)
                pixels.append(p.pixels)
                time_ids.append(p.time_ids)
            kept.append(v)
        return kept, np.stack(pixels) if pixels else None, np.stack(time_ids) if time_ids else None

    def latents(self, enc: Encoder, todo: list[Valid]) -> None:
        cfg, spec = self.cfg, enc.spec
        encode = ShardedEncoder(enc, cfg.cache.batch_size * (2 if cfg.image.random_flip else 1))
        groups: dict[tuple[int, int], list[Valid]] = defaultdict(list)
        for v in todo:
            groups[v.target].append(v)
        bs = cfg.cache.batch_size
        batches = [(t, vs[i:i + bs]) for t, vs in sorted(groups.items()) for i in range(0, len(vs), bs)]
        names = ("latents",) if cfg.cache.latents == "sample" else ("latent_mean", "latent_logvar")
        with ThreadPoolExecutor(max(1, cfg.loader.threads)) as pool, \
                tqdm(total=len(todo), unit="img", desc="latents", disable=not self.progress) as bar:
            pending = deque(pool.submit(self._load, *b) for b in batches[:2 * max(1, cfg.loader.threads)])
            nxt = len(pending)
            while pending:
                kept, pixels, time_ids = pending.popleft().result()
                if nxt < len(batches):
                    pending.append(pool.submit(self._load, *batches[nxt]))
                    nxt += 1
                if not kept:
                    continue
                out = encode({"pixels": pixels})
                mean, logvar = np.asarray(out["latent_mean"], np.float32), np.asarray(out["latent_logvar"], np.float32)
                per = 2 if cfg.image.random_flip else 1
                for i, v in enumerate(kept):
                    arrays = {}
                    for j, tag in enumerate(("", "_flipped")[:per]):
                        r = i * per + j
                        if cfg.cache.latents == "sample":
                            eps = np.random.default_rng(_key_seed(cfg.cache.seed, v.item.key, tag))
                            vals = (mean[r] + np.exp(0.5 * logvar[r]) * eps.standard_normal(mean[r].shape),)
                        else:
                            vals = (mean[r], logvar[r])
                        arrays.update({n + tag: _store(x, cfg.cache.dtype) for n, x in zip(names, vals)})
                        arrays["time_ids" + tag] = time_ids[r]
                    write_sidecar(sidecar_path(v.item.root, v.item.key, enc.suffix), arrays, spec=spec,
                                  source=_image_source(v.item))
                bar.update(len(kept))

    # ---- text ----------------------------------------------------------------------------
    def text(self, enc: Encoder, todo: list[tuple[str, str, str]]) -> None:
        """todo: (root, key, caption). An encoder without `apply` caches `prepare`'s output (token ids)."""
        encode = ShardedEncoder(enc, self.cfg.cache.batch_size) if enc.apply is not None else dict
        bs = self.cfg.cache.batch_size
        with tqdm(total=len(todo), unit="caption", desc="text", disable=not self.progress) as bar:
            for i in range(0, len(todo), bs):
                chunk = todo[i:i + bs]
                out = encode(dict(enc.prepare([c for _, _, c in chunk])))
                for j, (root, key, caption) in enumerate(chunk):
                    arrays = {k: _store(v[j], self.cfg.cache.dtype) for k, v in out.items()}
                    write_sidecar(sidecar_path(root, key, enc.suffix), arrays, spec=enc.spec,
                                  source=text_signature(caption))
                bar.update(len(chunk))


def _scan_and_validate(cfg: DataConfig, pi: int, pc: int):
    """Scan every source; validate this process's share (every pc-th item)."""
    sources = open_sources(cfg)
    items, problems = [], []
    for s in sources:
        its, probs = s.scan()
        items += its
        problems += probs
    valid, report = validate(sources, items[pi::pc], cfg, scan_problems=problems if pi == 0 else (),
                             threads=cfg.loader.threads)
    return sources, valid, report


def validate_only(cfg: DataConfig, *, log: Callable[[str], None] = print) -> Report:
    """The validation pass alone (single process): summary + report file, nothing encoded."""
    check_data_config(cfg)
    sources, _, report = _scan_and_validate(cfg, 0, 1)
    path = report_path(cfg, sources)
    report.write(path)
    log(report.summary())
    log(f"validation report: {path}")
    return report


def build_cache(cfg: DataConfig, *, vae: Encoder | None = None, text: Encoder | None = None,
                only: str | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> CacheResult:
    """Validate the sources and cache latents (with `vae`) and/or text embeddings (with `text`).

    only: None (both), "latents" or "text". Re-running skips every sidecar still current.
    Every process must call this (collectively) when running multi-process.
    """
    check_data_config(cfg)
    if only not in (None, "latents", "text"):
        raise ValueError(f"only={only!r}: use 'latents' or 'text'")
    vae = vae if only in (None, "latents") else None
    text = text if only in (None, "text") else None
    if vae is None and text is None:
        raise InputError("nothing to cache: no VAE for latents and no text encoder for captions")
    t0 = time.perf_counter()
    pi, pc = jax.process_index(), jax.process_count()
    sources, valid, report = _scan_and_validate(cfg, pi, pc)
    if pc == 1:  # the user sees what was skipped before waiting for the encoders
        log(report.summary())
    run = _Run(cfg, sources, progress and pi == 0, log)
    roots = sorted({str(s.root) for s in sources})
    old = {r: read_manifest(r) or {} for r in roots}
    _invalidate_changed(old, {"latents": vae.spec if vae is not None else None,
                              "text": text.spec if text is not None else None}, pi, pc)
    encoded, reused = {"latents": 0, "text": 0}, {"latents": 0, "text": 0}

    def current(v: Valid, kind: str, spec) -> bool:
        path = sidecar_path(v.item.root, v.item.key, spec["suffix"])
        src = _image_source(v.item) if kind == "latents" else text_signature(v.caption)
        return sidecar_is_current(path, spec, src)

    if vae is not None:
        todo = [v for v in valid if not current(v, "latents", vae.spec)]
        reused["latents"] = len(valid) - len(todo)
        run.latents(vae, todo)
        encoded["latents"] = len(todo)
    if text is not None:
        todo = [(v.item.root, v.item.key, v.caption) for v in valid if not current(v, "text", text.spec)]
        reused["text"] = len(valid) - len(todo)
        if pi == 0:
            todo += [(r, EMPTY_CAPTION_KEY, "") for r in roots
                     if not sidecar_is_current(sidecar_path(r, EMPTY_CAPTION_KEY, text.suffix), text.spec,
                                               text_signature(""))]
        run.text(text, todo)
        encoded["text"] = len(todo)
        note = text.summary() if text.summary is not None else None
        if note:
            log(note)
    failed = {f.path for f in run.failed}
    report.findings = [f for f in report.findings if f.path not in failed] + run.failed
    valid = [v for v in valid if v.item.path not in failed]

    specs = {r: {"latents": vae.spec if vae is not None else old[r].get("latents"),
                 "text": text.spec if text is not None else old[r].get("text")} for r in roots}
    entries: dict[str, dict] = defaultdict(dict)
    stale = 0
    for v in valid:  # an entry needs a current sidecar for every kind this root has a spec for
        spec = specs[v.item.root]
        if all(spec[k] is None or current(v, k, spec[k]) for k in ("latents", "text")):
            entry = {"bucket": list(v.target), "image": Path(v.item.path).name}
            if (spec["text"] or {}).get("mode") == "tokens":  # data.captions re-tokenizes the text per draw
                entry["text"] = v.caption
            entries[v.item.root][v.item.key] = entry
        else:
            stale += 1
    if stale:
        log(f"warning: {stale} images have a stale or missing cache of the kind not rebuilt now "
            "(run `jaxsd cache CONFIG` without --only); they are left out of the manifest")
    report = _gather(roots, specs, entries, report, pi, pc)
    if pi == 0:
        path = report_path(cfg, sources)
        report.write(path)
        if pc > 1:
            log(report.summary())
        for f in run.failed:
            log(f"skipped during caching: {f.path}: {f.reasons[0]}")
        log(f"validation report: {path}")
    return CacheResult(report, encoded, reused, time.perf_counter() - t0)


def _invalidate_changed(old: dict[str, dict], new: dict[str, Mapping | None], pi: int, pc: int) -> None:
    """Before any sidecar is overwritten by a different producer, drop that kind from the
    manifest: a run killed halfway then leaves "no cached latents" (refused, with the rebuild
    command), never a manifest vouching for a mix of old and new sidecars."""
    for root, manifest in old.items():
        changed = [k for k, spec in new.items()
                   if spec is not None and manifest.get(k) is not None
                   and json.loads(json.dumps(manifest[k])) != json.loads(json.dumps(dict(spec)))]
        if changed and pi == 0:
            for k in changed:
                manifest[k] = None
            write_manifest(root, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    if pc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxsd_cache_manifest_invalidated")


def _gather(roots, specs, entries, report: Report, pi: int, pc: int) -> Report:
    """Write manifests; with several processes, process 0 merges every process's part first."""
    if pc > 1:
        from jax.experimental import multihost_utils

        part = Path(roots[0]) / f"jaxsd_cache.part{pi}.json"
        with open(part, "w") as fh:
            json.dump({"entries": entries, "report": report.to_json()}, fh)
        multihost_utils.sync_global_devices("jaxsd_cache_parts_written")
        if pi == 0:
            entries, report = defaultdict(dict), Report()
            for p in range(pc):
                path = Path(roots[0]) / f"jaxsd_cache.part{p}.json"
                data = json.loads(path.read_text())
                for r, es in data["entries"].items():
                    entries[r].update(es)
                report = report.merge(Report.from_json(data["report"]))
                path.unlink()
    if pi == 0:
        for r in roots:
            write_manifest(r, {**specs[r], "entries": dict(sorted(entries.get(r, {}).items()))})
    if pc > 1:
        multihost_utils.sync_global_devices("jaxsd_cache_manifest_written")
    return report
