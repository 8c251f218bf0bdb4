"""The training loop of `jaxsd train`: set-up, resume, the jitted step, checkpoints, monitoring.

    result = train(load_config("configs/tiny.yaml", ["train.steps=50"]))

Init order (logged): resume from <run_dir>/checkpoints → `model.pretrained` → from scratch.
The loop stops at `train.steps`; on SIGTERM/SIGINT (e.g. TPU preemption) or when
<run_dir>/<checkpoint.trigger_file> appears it saves first (and, for a signal,
then stops). After more than `train.max_nonfinite_skips` consecutive NaN/inf
steps it stops without saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import Config, to_yaml
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train.checkpoint import Checkpointer
from jaxsd.train.compile import compile_train_step, use_compilation_cache
from jaxsd.train.logging import RunLogger
from jaxsd.train.model import (
    build_unet,
    describe,
    initial_params,
    make_apply_fn,
    param_shapes,
    unet_config,
)
from jaxsd.train.optimizers import make_optimizer, streams_updates
from jaxsd.train.sampling import TrainingSampler
from jaxsd.train.sharding import (
    global_batch,
    make_mesh,
    maybe_initialize_distributed,
    micro_batch_sharding,
    param_shardings,
    train_state_shardings,
)
from jaxsd.train.step import TrainState, init_state, make_train_step, reduce_metrics
from jaxsd.train.synthetic import SyntheticSource
from jaxsd.train.trainable import split_params

log = logging.getLogger("jaxsd.train")
# Fault injection for the resume test: SIGKILL ourselves once this step is done and saved.
KILL_AT_STEP_ENV = "JAXSD_FAULT_KILL_AT_STEP"


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    stopped: str  # "done" | "signal" | "nonfinite"
    init_from: str
    losses: list[float]


class _StopFlag:
    """SIGTERM/SIGINT → finish the current step, save, stop (restores the old handlers afterwards)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (so that every process saves/stops together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def make_source(cfg: Config, mesh=None):
    """The batch iterator: local numpy batches (synthetic) or global jax.Arrays (the cache loader)."""
    if cfg.train.data_source == "synthetic":
        return SyntheticSource(cfg.synthetic, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    from jaxsd.data.loader import training_loader
    return _CacheBatches(training_loader(cfg.data, mesh=mesh, batch_size=cfg.train.batch_size))


def _on_mesh(batch: dict, mesh) -> dict:
    """Local numpy rows → global arrays; batches that already are global jax.Arrays pass through."""
    if all(isinstance(v, jax.Array) for v in batch.values()):
        return batch
    return global_batch(batch, mesh)


class _CacheBatches:
    """jaxsd.data's Loader as a trainer source: global arrays on the mesh, checkpointable position."""

    def __init__(self, loader):
        from jaxsd.data.loader import GlobalBatches
        self.loader, self.batches = loader, GlobalBatches(loader)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        batch.pop("index", None)  # sample ids: for debugging, not for the model
        return batch

    def get_state(self) -> dict:
        return self.loader.get_state()

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state)

    def empty_prompt(self):
        empty = self.loader.empty_prompt()
        if empty is None:
            raise ValueError("loss.cond_dropout > 0 needs the empty prompt's cached embedding; the text cache "
                             "has none (re-run jaxsd cache)")
        return empty


def _setup_file_logging(run_dir: Path) -> None:
    if jax.process_index() == 0 and not any(getattr(h, "_jaxsd", False) for h in log.handlers):
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._jaxsd = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)


@dataclasses.dataclass
class StatePlan:
    """What the train state of a config looks like, before any array exists."""

    module: Any
    param_shapes: Any
    param_shardings: Any
    tx: Any
    lr_fn: Any
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState


def plan_state(cfg: Config, mesh) -> StatePlan:
    """Model, optimizer and the sharded abstract TrainState of `cfg` on `mesh` (no allocation)."""
    module = build_unet(cfg.model, unet_config(cfg.model))
    shapes, logical = param_shapes(module)
    shardings = param_shardings(shapes, logical, mesh, dict(cfg.sharding.rules))
    t_shapes, f_shapes = split_params(shapes, cfg.train.trainable, cfg.train.frozen)
    t_shard, f_shard = split_params(shardings, cfg.train.trainable, cfg.train.frozen)
    tx, lr_fn = make_optimizer(cfg.optimizer, cfg.train.steps)
    ema = cfg.train.ema.enabled
    abstract = jax.eval_shape(lambda t, f: init_state(t, f, tx, cfg.train.seed, ema), t_shapes, f_shapes)
    state_sharding = train_state_shardings(abstract, t_shard, f_shard, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    return StatePlan(module, shapes, shardings, tx, lr_fn, abstract, state_sharding)


def train(cfg: Config, source: Any = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`; returns the final state and why it stopped."""
    maybe_initialize_distributed(cfg.sharding)
    cache_dir = use_compilation_cache(cfg.train.compilation_cache)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_file_logging(run_dir)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    mesh = make_mesh(cfg.sharding)
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
    log.info("XLA compilation cache: %s", cache_dir or "off")
    plan = plan_state(cfg, mesh)
    module, shardings, tx, lr_fn, abstract = plan.module, plan.param_shardings, plan.tx, plan.lr_fn, plan.abstract
    state_sharding = plan.state_shardings
    replicated = NamedSharding(mesh, P())
    ema = cfg.train.ema.enabled
    log.info("trainable: %s of %s", describe(abstract.params), describe(plan.param_shapes))
    # before data and compilation, so unusable sample components fail at start-up, not at step sample_every
    sampler = TrainingSampler.from_config(cfg, module.config, run_dir, mesh)

    source = source if source is not None else make_source(cfg, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        state, meta, start = restored
        source.set_state(meta["data"])
        init_from = f"resumed from checkpoint step {start} in {ckpt.directory}"
    else:
        start = 0
        params, init_from = initial_params(cfg.model, module, cfg.train.seed, shardings)
        t_params, f_params = split_params(params, cfg.train.trainable, cfg.train.frozen)
        # donated: the state takes over the params' buffers instead of holding a second copy
        state = jax.jit(lambda t, f: init_state(t, f, tx, cfg.train.seed, ema),
                        out_shardings=state_sharding, donate_argnums=(0, 1))(t_params, f_params)
        del params, t_params, f_params
    log.info("init: %s (order: resume → model.pretrained → from scratch)", init_from)

    empty = source.empty_prompt() if cfg.loss.cond_dropout > 0 else None
    schedule = NoiseSchedule.from_config(cfg.diffusion.to_scheduler_config())
    streamed = streams_updates(cfg.optimizer)
    step_fn = make_train_step(make_apply_fn(module), schedule, cfg.loss, tx, lr_fn, ema_cfg=cfg.train.ema,
                              grad_accum_steps=cfg.train.grad_accum_steps,
                              empty_cond=None if empty is None else jax.tree.map(jnp.asarray, empty),
                              micro_batch_sharding=micro_batch_sharding(mesh) if mesh.size > 1 else None,
                              streamed=streamed)
    first = _on_mesh(next(source), mesh)
    batch_shardings = jax.tree.map(lambda x: x.sharding, first)
    jitted = jax.jit(step_fn, in_shardings=(state_sharding, batch_shardings),
                     out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    compiled, flops = compile_train_step(jitted.lower(state, first))

    logger = RunLogger(run_dir, total_steps=cfg.train.steps, start_step=start, tensorboard=cfg.logging.tensorboard,
                       progress_bar=cfg.logging.progress_bar, every=cfg.logging.every)
    logger.message(f"jaxsd train: {init_from}")
    trigger = run_dir / cfg.checkpoint.trigger_file
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
    losses: list[float] = []
    stopped = "done"
    step = start
    batch = first

    data_state = source.get_state()

    def meta() -> dict:
        return {"step": step, "data": data_state, "config": to_yaml(cfg)}

    with _StopFlag() as stop:
        while step < cfg.train.steps:
            t_step = time.perf_counter()
            state, metrics = compiled(state, batch)
            step += 1
            data_state = source.get_state()  # the position after every batch this state has seen
            if step < cfg.train.steps:
                batch = _on_mesh(next(source), mesh)  # host work overlaps the running step
            host = reduce_metrics(jax.device_get(metrics))
            dt = time.perf_counter() - t_step
            host.update(step_time_s=dt, images_per_s=cfg.train.batch_size / dt)
            if flops and cfg.logging.peak_flops > 0:
                host["mfu"] = flops / dt / (cfg.logging.peak_flops * mesh.size)
            losses.append(host["loss"])
            logger.log_step(step, host)
            skipped = bool(host["skipped"])
            if not skipped and not math.isfinite(host["grad_norm"]):
                # streamed updates check the loss only: this update has already been applied
                logger.message(f"stopping: step {step} had a finite loss but a non-finite gradient, and the update "
                               f"was applied (optimizer.clip_grad_norm is off, so updates are not held back for a "
                               f"gradient check); the last good checkpoint is kept (steps {ckpt.steps()}). Set "
                               f"optimizer.clip_grad_norm to have such steps skipped instead")
                stopped = "nonfinite"
                break
            if skipped:
                n = int(state.nonfinite)
                logger.message(f"step {step}: non-finite loss/gradient, update skipped ({n} in a row)")
                if n > cfg.train.max_nonfinite_skips:
                    logger.message(f"stopping: more than train.max_nonfinite_skips={cfg.train.max_nonfinite_skips} "
                                   f"non-finite steps in a row; the last good checkpoint is kept "
                                   f"(steps {ckpt.steps()})")
                    stopped = "nonfinite"
                    break
            signalled = _any_process(stop.signum is not None)
            triggered = _any_process(jax.process_index() == 0 and trigger.exists())
            if triggered and jax.process_index() == 0:
                trigger.unlink()
            periodic = step % cfg.checkpoint.every == 0 or step == cfg.train.steps
            if not skipped and (periodic or signalled or triggered):  # never checkpoint a skipped step
                ckpt.save(step, state, meta())
            if kill_at and step >= kill_at:
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if signalled:
                logger.message(f"signal received: saved step {step}, stopping")
                stopped = "signal"
                break
            if sampler is not None and sampler.due(step):
                sampler(step, state, logger)  # reads the state only; the next batch is already fetched
    ckpt.close()
    logger.close()
    return TrainResult(state=state, step=step, stopped=stopped, init_from=init_from, losses=losses)
