"""The training loader: cached samples -> single-bucket global batches on the mesh.

Order of an epoch (identical on every process, a pure function of seed and epoch):
samples are grouped by bucket, each bucket shuffled and cut into global batches
(the remainder of each bucket is dropped this epoch; shuffling changes which),
then the batches are shuffled. So every batch has one shape, and every process
is on the same bucket at the same step without talking to the others.

Each process reads only its rows of each global batch (the rows its devices hold
under the batch sharding), in grain worker threads with prefetch; `GlobalBatches`
assembles them into global `jax.Array`s sharded over ("data", "fsdp").
The grain iterator's state is the position in this endless sequence of batches;
restoring it yields exactly the batches that would have come next.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.data.config import DataConfig
from jaxsd.data.store import CacheStore, open_store
from jaxsd.errors import ConfigError, InputError

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp")
_EPOCHS = 1_000_000  # the sequence of batches is "endless": long enough for any run


@dataclass(frozen=True)
class EpochPlan:
    """Global batches of one epoch: [steps, global_batch] sample indices."""

    batches: np.ndarray


def plan_epoch(buckets: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> EpochPlan:
    """Single-bucket global batches for `epoch`; a deterministic function of its arguments."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for b in np.unique(buckets):
        idx = np.flatnonzero(buckets == b)
        if shuffle:
            idx = rng.permutation(idx)
        usable = len(idx) // batch_size * batch_size
        batches += list(idx[:usable].reshape(-1, batch_size))
    if not batches:
        raise InputError(f"no bucket holds a full global batch of {batch_size} samples "
                         f"(largest bucket: {np.bincount(buckets).max() if len(buckets) else 0}); "
                         "lower data.loader.batch_size or add images")
    order = rng.permutation(len(batches)) if shuffle else np.arange(len(batches))
    return EpochPlan(np.stack([batches[i] for i in order]))


def batch_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """The global batch rows this process's devices hold under `sharding` (sorted, unique)."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*idx[0].indices(batch_size)))
    return np.array(sorted(rows), dtype=np.int64)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension split over the mesh's ("data", "fsdp") axes (those it has)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes if axes else None))


class _Batches:
    """Random access to this process's part of global batch number i (grain's source)."""

    def __init__(self, store: CacheStore, cfg: DataConfig, rows: np.ndarray):
        self.store, self.cfg, self.rows = store, cfg, rows
        self.process = (jax.process_index(), jax.process_count())
        self.buckets = store.bucket_ids()
        self._plans: dict[int, EpochPlan] = {}
        self.steps_per_epoch = len(self._plan(0).batches)

    def _plan(self, epoch: int) -> EpochPlan:
        # grain threads ask for the same few epochs over and over: keep the last two plans
        plan = self._plans.get(epoch)
        if plan is None:
            lc = self.cfg.loader
            plan = plan_epoch(self.buckets, lc.batch_size, lc.seed, epoch, lc.shuffle)
            self._plans = {**{e: p for e, p in self._plans.items() if e >= epoch - 1}, epoch: plan}
        return plan

    def __len__(self) -> int:
        return self.steps_per_epoch * _EPOCHS

    def indices(self, i: int) -> np.ndarray:
        epoch, step = divmod(int(i), self.steps_per_epoch)
        return self._plan(epoch).batches[step][self.rows]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        epoch = int(i) // self.steps_per_epoch
        samples = []
        for idx in self.indices(i):
            flip = bool(np.random.default_rng([self.cfg.loader.seed, epoch, int(idx), 1]).integers(2))
            samples.append(self.store.read(int(idx), flip=flip))
        batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        batch["index"] = self.indices(i).astype(np.int32)
        if log.isEnabledFor(logging.DEBUG):  # how a multi-host run splits its data (`logging.debug` in jaxsd train)
            log.debug("global batch %d: process %d of %d reads samples %s", i, *self.process,
                      batch["index"].tolist())
        return batch


class Loader:
    """Per-process numpy batches of the cached dataset, as a checkpointable grain iterator.

    mesh: the training mesh; this process reads exactly the batch rows its devices hold.
      None: rows split evenly and contiguously by process index.
    latents / text: expected cache specs of the model being trained (see `verify_manifest`);
      a cache made by anything else is refused.
    Each batch: {"latents" | "latent_mean"+"latent_logvar": [b,h,w,C], "time_ids": [b,6],
    "index": [b] sample ids} and the text — embeddings: "encoder_hidden_states" [b,L,D], "pooled"
    [b,P] (SDXL); token ids (data.cache.text_mode=tokens): "input_ids", "attention_mask" [b,L]
    int32, and "input_ids_2", "attention_mask_2" [b,L] int32 for SDXL (jaxsd/text/encode.py).
    """

    def __init__(self, cfg: DataConfig, *, mesh: Mesh | None = None, latents: Mapping | None = None,
                 text: Mapping | None = None, rebuild: str = "jaxsd cache CONFIG", batch_size: int | None = None):
        if batch_size is not None:  # the trainer's global batch size wins over data.loader.batch_size
            cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, batch_size=batch_size))
        self.cfg = cfg
        self.store = open_store(cfg, latents=latents, text=text, rebuild=rebuild)
        gbs = cfg.loader.batch_size
        if mesh is not None:
            self.sharding = batch_sharding(mesh)
            shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
            if gbs % shards:
                raise ConfigError(f"data.loader.batch_size={gbs} is not divisible by the {shards} batch shards "
                                  "of the mesh (data x fsdp)")
            rows = batch_rows(self.sharding, gbs)
        else:
            self.sharding = None
            pc, pi = jax.process_count(), jax.process_index()
            if gbs % pc:
                raise ConfigError(f"data.loader.batch_size={gbs} is not divisible by the {pc} processes")
            rows = np.arange(pi * gbs // pc, (pi + 1) * gbs // pc)
        self.rows = rows
        self.source = _Batches(self.store, cfg, rows)
        options = grain.ReadOptions(num_threads=max(1, cfg.loader.threads),
                                    prefetch_buffer_size=max(1, cfg.loader.prefetch))
        self.dataset = grain.MapDataset.source(self.source).to_iter_dataset(options)
        self.iterator = iter(self.dataset)

    def empty_prompt(self) -> dict[str, np.ndarray] | None:
        """The empty caption's cached text, unbatched, for conditioning dropout; None without a text cache.
        Embeddings: {"encoder_hidden_states": [L,D], "pooled"?: [P]} (the trainer's empty_cond).
        Token ids: {"input_ids": [L], "attention_mask": [L], "input_ids_2"?, "attention_mask_2"?} int32,
        the same keys as a batch's (encode them with `jaxsd.text.encode.encode_token_ids`)."""
        return self.store.empty_text()

    @property
    def text_mode(self) -> str | None:
        """What the cache holds per caption: "embeddings", "tokens" (token ids), or None (no text cache)."""
        return None if self.store.text is None else self.store.text.get("mode", "embeddings")

    @property
    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        """Position + what it is a position in; store it with the checkpoint (JSON-able)."""
        lc = self.cfg.loader
        return {"grain": self.iterator.get_state(), "seed": lc.seed, "batch_size": lc.batch_size,
                "samples": len(self.store), "shuffle": lc.shuffle}

    def set_state(self, state: Mapping) -> None:
        lc = self.cfg.loader
        mine = {"seed": lc.seed, "batch_size": lc.batch_size, "samples": len(self.store), "shuffle": lc.shuffle}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise InputError("loader state was saved for a different data order: "
                             + ", ".join(f"{k} saved {a} now {b}" for k, (a, b) in diff.items())
                             + "; restore with the same data.loader settings and cache, or start the data fresh")
        self.iterator.set_state(state["grain"])


class GlobalBatches:
    """Wrap a `Loader` made with a mesh: yields dicts of global `jax.Array`s [global_batch, ...]."""

    def __init__(self, loader: Loader):
        if loader.sharding is None:
            raise ValueError("GlobalBatches needs a Loader built with mesh=...")
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self.loader)
        gbs = self.loader.cfg.loader.batch_size
        pos = {int(r): j for j, r in enumerate(self.loader.rows)}
        out = {}
        for k, v in local.items():
            sharding = NamedSharding(self.loader.sharding.mesh,
                                     P(self.loader.sharding.spec[0], *([None] * (v.ndim - 1))))

            def piece(index, v=v):
                rows = range(*index[0].indices(gbs))
                return v[[pos[r] for r in rows]][(slice(None),) + tuple(index[1:])]

            out[k] = jax.make_array_from_callback((gbs,) + v.shape[1:], sharding, piece)
        return out


def training_loader(cfg: DataConfig, *, mesh: Mesh | None = None, batch_size: int | None = None,
                    config_path: str = "CONFIG") -> Loader:
    """The loader `jaxsd train` uses: it refuses any cache not made by `data.cache.vae` and
    `data.cache.text_encoder` under this preprocessing (the error names the field and the
    `jaxsd cache <config_path> --only ...` command that rebuilds it)."""
    from jaxsd.data.model_encoders import expected_specs

    missing = [k for k, v in (("data.cache.vae", cfg.cache.vae), ("data.cache.text_encoder", cfg.cache.text_encoder))
               if not v]
    if missing:
        raise ConfigError(f"set {' and '.join(missing)}: training checks the cache against the models that must "
                          "have made it (the same settings `jaxsd cache` used)")
    latents, text = expected_specs(cfg)
    return Loader(cfg, mesh=mesh, latents=latents, text=text, rebuild=f"jaxsd cache {config_path}",
                  batch_size=batch_size)
