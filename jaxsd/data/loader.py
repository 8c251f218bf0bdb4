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


def plan_epoch(buckets: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
               stream: int = 0) -> EpochPlan:
    """Single-bucket global batches for `epoch`; a deterministic function of its arguments.

    stream: 0 for the main sequence; another number gives an independent order over the same kind of
    input (the prior half of DreamBooth batches).
    """
    rng = np.random.default_rng([seed, epoch] if stream == 0 else [seed, epoch, stream])
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


class _Pool:
    """One endless sequence of batches over a pool of slots (store indices, repeated per subset)."""

    def __init__(self, slots: np.ndarray, buckets: np.ndarray, batch_size: int, cfg: DataConfig, stream: int):
        self.slots, self.buckets, self.batch_size, self.cfg, self.stream = slots, buckets[slots], batch_size, cfg, stream
        self._plans: dict[int, EpochPlan] = {}
        self.steps_per_epoch = len(self.plan(0).batches)

    def plan(self, epoch: int) -> EpochPlan:
        # grain threads ask for the same few epochs over and over: keep the last two plans
        plan = self._plans.get(epoch)
        if plan is None:
            lc = self.cfg.loader
            plan = plan_epoch(self.buckets, self.batch_size, lc.seed, epoch, lc.shuffle, self.stream)
            self._plans = {**{e: p for e, p in self._plans.items() if e >= epoch - 1}, epoch: plan}
        return plan

    def batch(self, i: int) -> tuple[int, np.ndarray]:
        """(epoch, slot numbers [batch_size]) of this pool's batch number i."""
        epoch, step = divmod(int(i), self.steps_per_epoch)
        return epoch, self.plan(epoch).batches[step]


class _Batches:
    """Random access to this process's part of global batch number i (grain's source).

    Without a prior subset every batch comes from one pool of slots; with one, the first half of each
    global batch from the instance pool and the second half from the prior pool, each pool on its own
    sequence of epochs (an epoch is the instance pool's).
    """

    def __init__(self, store: CacheStore, cfg: DataConfig, rows: np.ndarray):
        from jaxsd.data.subsets import make_slots

        self.store, self.cfg, self.rows = store, cfg, rows
        self.process = (jax.process_index(), jax.process_count())
        self.slots = make_slots(cfg, store.locations())
        buckets = store.bucket_ids()
        gbs = cfg.loader.batch_size
        if len(self.slots.prior) == 0:
            self.pools = [_Pool(self.slots.instance, buckets, gbs, cfg, 0)]
        else:
            if gbs % 2:
                raise ConfigError(f"the batch size {gbs} must be even with prior preservation: half of each batch "
                                  "is instance images, half class images")
            if len(np.unique(buckets)) > 1:
                raise ConfigError("prior preservation needs every image in one bucket (the instance and class halves "
                                  "of a batch must have one shape): set data.image.buckets.enabled=false")
            self.pools = [_Pool(self.slots.instance, buckets, gbs // 2, cfg, 0),
                          _Pool(self.slots.prior, buckets, gbs // 2, cfg, 1)]
        self.steps_per_epoch = self.pools[0].steps_per_epoch
        self.tokenize = None
        if cfg.captions.active:  # captions changed per draw: tokenized here from the cached caption text
            from jaxsd.data.model_encoders import token_encoder

            if (store.text or {}).get("mode") != "tokens":
                raise ConfigError("data.captions needs a token-id cache (data.cache.text=tokens)")
            self.tokenize = token_encoder(cfg).prepare

    def __len__(self) -> int:
        return self.steps_per_epoch * _EPOCHS

    def draws(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(store indices, flip seeds [rows, 4], prior flags) of this process's rows of global batch i."""
        idx, seeds, prior = [], [], []
        for p, pool in enumerate(self.pools):
            epoch, slots = pool.batch(i)
            # the flip is drawn per slot and epoch (without repeats a slot is its sample index)
            idx.append(pool.slots[slots])
            seeds.append(np.stack([np.full(len(slots), epoch), slots, np.full(len(slots), 1 + p)], 1))
            prior.append(np.full(len(slots), p == 1))
        return (np.concatenate(idx)[self.rows], np.concatenate(seeds)[self.rows],
                np.concatenate(prior)[self.rows])

    def indices(self, i: int) -> np.ndarray:
        return self.draws(i)[0]

    def _drawn_tokens(self, i: int, idx: int) -> dict[str, np.ndarray]:
        """Token ids [L] of sample idx's caption as batch i draws it (data.captions)."""
        from jaxsd.data.captions import draw_caption

        loc, key, _, entry = self.store.entries[idx]
        if "text" not in entry:
            raise InputError(f"{key}: the cache of {self.store.location_name(loc)} has no caption texts (made before "
                             "data.captions existed); re-run `jaxsd cache CONFIG --only text`")
        text = draw_caption(entry["text"], self.cfg.captions, np.random.default_rng([self.cfg.loader.seed, i, idx, 7]))
        return {k: np.asarray(v[0], np.int32) for k, v in self.tokenize([text]).items()}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        indices, seeds, prior = self.draws(i)
        samples = []
        for idx, (epoch, slot, stream), is_prior in zip(indices, seeds, prior):
            draw = np.random.default_rng([self.cfg.loader.seed, int(epoch), int(slot), int(stream)])
            flip = bool(draw.integers(2))
            sample = self.store.read(int(idx), flip=flip, rng=draw)  # rng: an image store's random crop
            if self.tokenize is not None and not is_prior:  # class images keep their class prompt as cached
                sample.update(self._drawn_tokens(i, int(idx)))
            samples.append(sample)
        batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        batch["index"] = indices.astype(np.int32)
        if self.slots.weight is not None:  # subsets: the loss weight of each sample, and which are class images
            batch["loss_weight"] = self.slots.weight[indices]
            if len(self.pools) > 1:
                batch["prior"] = prior.astype(np.float32)
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
                 text: Mapping | None = None, rebuild: str = "jaxsd cache CONFIG", batch_size: int | None = None,
                 store: CacheStore | None = None):
        if batch_size is not None:  # the trainer's global batch size wins over data.loader.batch_size
            cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, batch_size=batch_size))
        self.cfg = cfg
        # store: another source of samples with the cache's interface (jaxsd.data.pixels: images, not latents)
        self.store = store if store is not None else open_store(cfg, latents=latents, text=text, rebuild=rebuild)
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
                "samples": self.source.slots.count, "shuffle": lc.shuffle}

    def set_state(self, state: Mapping) -> None:
        lc = self.cfg.loader
        mine = {"seed": lc.seed, "batch_size": lc.batch_size, "samples": self.source.slots.count, "shuffle": lc.shuffle}
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
