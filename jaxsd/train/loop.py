"""The training loop of `jaxsd train`: set-up, resume, the jitted step, checkpoints, monitoring.

    result = train(load_config("configs/tiny.yaml", ["train.steps=50"]))

Init order (logged): resume from <run_dir>/checkpoints (checked against the run's config first,
see `jaxsd.train.resume`) → `model.pretrained` → from scratch. The first batch's step is compiled
from the planned state before any weight is loaded (`_FirstBatch`); other batch shapes (aspect-ratio
buckets) compile on first sight. The loop stops at `train.steps`; on SIGTERM/SIGINT (e.g. TPU preemption) or when
<run_dir>/<checkpoint.trigger_file> appears it saves first (and, for a signal,
then stops). After more than `train.max_nonfinite_skips` consecutive NaN/inf
steps it stops without saving, so the last good checkpoint stays the latest.
The host reads a step's metrics `train.steps_in_flight` steps after dispatching it (default 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections import deque
from typing import Any

import jax
import numpy as np

from jaxsd.config import Config, to_yaml
from jaxsd.errors import InputError
from jaxsd.host_memory import release_freed_host_memory
from jaxsd.train.base import base_fingerprint, checkpointed
from jaxsd.train.checkpoint import Checkpointer
from jaxsd.train.compile import CompiledSteps, use_compilation_cache
from jaxsd.train.logging import RunLogger
from jaxsd.train.model import describe, initial_params
from jaxsd.train.plan import StatePlan, compiled_train_steps, fresh_state, plan_state
from jaxsd.train.resume import STATE_FORMAT, restore_data_position, resume
from jaxsd.train.run_dir import RunDir, TriggerFile
from jaxsd.train.sampling import StateText, TrainingSampler
from jaxsd.train.sharding import (
    global_batch,
    make_mesh,
    maybe_initialize_distributed,
)
from jaxsd.train.step import TrainState, reduce_metrics
from jaxsd.train.synthetic import SyntheticSource
from jaxsd.train.validation import Validator

log = logging.getLogger("jaxsd.train")


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int  # the last step whose metrics were read and logged
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


class _StopPolls:
    """Whether to save and/or stop now: a signal on any process, or the trigger file (seen by process 0).

    One process: checked every step (a flag and a file stat). Several: every `poll_every` steps in
    one small collective (the flags of all processes at once), so that every process saves and
    stops at the same step — a SIGTERM is acted on within `poll_every` steps.
    """

    def __init__(self, trigger: TriggerFile, poll_every: int):
        self.trigger = trigger
        self.every = 1 if jax.process_count() == 1 else max(1, poll_every)

    def poll(self, step: int, signalled: bool) -> tuple[bool, bool]:
        """(signalled, triggered) as every process sees them at `step`."""
        if step % self.every:
            return False, False
        triggered = jax.process_index() == 0 and self.trigger.exists()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.asarray([signalled, triggered], np.int32))
            signalled, triggered = (bool(x) for x in np.max(flags.reshape(-1, 2), axis=0))
        if triggered and jax.process_index() == 0:
            self.trigger.unlink()
        return signalled, triggered


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose metrics the host has not read yet."""

    step: int
    metrics: Any  # device arrays
    flops: float | None


class _Monitor:
    """Reads a step's metrics once it has run, logs them and applies the NaN/inf policy.

    The loop reads step n's metrics only after step n + `train.steps_in_flight` is dispatched, so
    the device never waits for the host's logging. Step time is the wall time between two reads
    (steady state: one step), restarted after checkpoint saves and sample grids.
    """

    def __init__(self, cfg: Config, logger: RunLogger, ckpt: Checkpointer, devices: int):
        self.cfg, self.logger, self.ckpt, self.devices = cfg, logger, ckpt, devices
        self.losses: list[float] = []
        self.skips = 0  # consecutive skipped steps
        self.last_step = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    @property
    def last_skipped(self) -> bool:
        """Whether the last step read had its update skipped (non-finite loss/gradient)."""
        return self.skips > 0

    def read_behind(self, pending: deque[_InFlight], keep: int) -> str:
        """Read the oldest pending steps until `keep` remain; "done" to go on or the reason to stop."""
        while len(pending) > keep:
            stopped = self.read(pending.popleft())
            if stopped != "done":
                return stopped
        return "done"

    def read(self, f: _InFlight) -> str:
        """Read, log and check step f.step: "done" to go on or the reason to stop."""
        host = reduce_metrics(jax.device_get(f.metrics))
        now = time.perf_counter()
        dt, self.clock = now - self.clock, now
        host.update(step_time_s=dt, images_per_s=self.cfg.train.batch_size / dt)
        peak = self.cfg.logging.peak_flops
        if f.flops and peak > 0:
            host["mfu"] = f.flops / dt / (peak * self.devices)
        self.losses.append(host["loss"])
        self.last_step = f.step
        self.logger.log_step(f.step, host)
        skipped = bool(host["skipped"])
        self.skips = self.skips + 1 if skipped else 0
        kept = f"the last good checkpoint is kept (steps {self.ckpt.steps()})"
        # (train.fused_update has no gradient norm: it reports whether the updated params are finite)
        if not skipped and not (math.isfinite(host.get("grad_norm", 0.0)) and host.get("params_finite", 1)):
            # streamed updates check the loss only: this update has already been applied
            self.logger.message(f"stopping: step {f.step} had a finite loss but a non-finite gradient, and the "
                                f"update was applied (optimizer.clip_grad_norm is off, so updates are not held "
                                f"back for a gradient check); {kept}. Set optimizer.clip_grad_norm to have such "
                                f"steps skipped instead")
            return "nonfinite"
        if skipped:
            self.logger.message(f"step {f.step}: non-finite loss/gradient, update skipped ({self.skips} in a row)")
            limit = self.cfg.train.max_nonfinite_skips
            if self.skips > limit:
                self.logger.message(f"stopping: more than train.max_nonfinite_skips={limit} non-finite steps in "
                                    f"a row; {kept}")
                return "nonfinite"
        return "done"


def make_source(cfg: Config, mesh=None):
    """The batch iterator: local numpy batches (synthetic) or global jax.Arrays (the cache loader)."""
    if cfg.train.data_source == "synthetic":
        return SyntheticSource(cfg.synthetic, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.model.kind == "vae":  # the autoencoder trains on the images themselves
        from jaxsd.data.pixels import pixel_loader
        return _CacheBatches(pixel_loader(cfg.data, mesh=mesh, batch_size=cfg.train.batch_size))
    from jaxsd.data.loader import training_loader
    from jaxsd.data.subsets import with_class_subset
    data = with_class_subset(cfg.data, cfg.dreambooth)  # + DreamBooth's class images as a prior subset
    return _CacheBatches(training_loader(data, mesh=mesh, batch_size=cfg.train.batch_size))


def on_mesh(batch: dict, mesh) -> dict:
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
            raise InputError("loss.cond_dropout > 0 needs the empty caption's cached text (embedding or token ids); "
                             "the text cache has none (re-run jaxsd cache)")
        return empty


class _FirstBatch:
    """The run's first batch, drawn and its step compiled from the planned state (no arrays) before any
    weight is loaded or restored: the compiler's transient host memory is handed back first, so the
    peak RSS is the larger of compiling and training, not their sum (SD1.5 LoRA on CPU: docs/benchmarks.md)."""

    def __init__(self, cfg: Config, plan: StatePlan, source: Any, steps: CompiledSteps, mesh: Any):
        self.cfg, self.plan, self.source, self.steps, self.mesh = cfg, plan, source, steps, mesh
        self.batch: dict | None = None

    def draw(self, step: int, meta: dict | None = None, changes: dict | None = None) -> None:
        """At `step` (a checkpoint's meta and config changes when resuming): put the data where the
        checkpoint left it, draw the next batch (none once train.steps is reached) and compile its step."""
        if meta is not None:
            restore_data_position(self.source, meta, changes or {})
        self.batch = on_mesh(next(self.source), self.mesh) if step < self.cfg.train.steps else None
        if self.batch is not None:
            self.steps.compile(self.plan.abstract, self.batch)


def train(cfg: Config, source: Any = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`; returns the final state and why it stopped."""
    maybe_initialize_distributed(cfg.sharding)
    if source is None and cfg.train.data_source == "cache" and cfg.dreambooth.enabled:
        # DreamBooth: the missing class images first (generated and cached; resumable)
        from jaxsd.train.dreambooth import prepare_class_images
        prepare_class_images(cfg, progress=cfg.logging.progress_bar, log_fn=log.info)
    # train.run_dir: a local path or gs://... (jaxsd.train.run_dir); process 0 logs to its train.log, and
    # leaving the block (also by an exception) uploads what it staged
    with RunDir(cfg.train.run_dir, writer=jax.process_index() == 0, logger=log) as run:
        return _train(cfg, source, run)


def _train(cfg: Config, source: Any, run: RunDir) -> TrainResult:
    cache_dir = use_compilation_cache(cfg.train.compilation_cache)
    run_dir = run.path  # an epath.Path: joined with "/", never through pathlib (gs:// would become gs:/)

    mesh = make_mesh(cfg.sharding)
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
    log.info("XLA compilation cache: %s", cache_dir or "off")
    plan = plan_state(cfg, mesh)
    log.info("trainable: %s", plan.describe_trainable())
    if plan.text is not None:
        adapted = sum(len(p.specs) for p in plan.text.adapters.values())
        log.info("text encoders of %s run in the step (%s): %s%s", plan.text.folder, ", ".join(plan.text.components),
                 describe(plan.text.shapes), f", LoRA adapters on {adapted} of their layers" if adapted else
                 ", fine-tuned (train.text_encoder: full)" if plan.text.full else ", frozen")
    # before data and compilation, so unusable sample components fail at start-up, not at step sample_every
    trained_text = StateText(plan.text, plan.text_parts) if plan.text and plan.text.trains else None
    sampler = TrainingSampler.from_config(cfg, plan.module.config, run_dir, mesh, merge=plan.merged, text=trained_text)

    source = source if source is not None else make_source(cfg, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    # the empty caption's cached text: its embedding, or (text in the step) its token ids
    empty = source.empty_prompt() if cfg.loss.cond_dropout > 0 else None
    # batches arrive as global arrays with their sharding; one executable per batch shape
    steps = compiled_train_steps(cfg, plan, mesh, empty)
    first = _FirstBatch(cfg, plan, source, steps, mesh)
    resumed = resume(cfg, plan, ckpt, mesh, before_load=first.draw)  # compares configs before reading any array
    if resumed is not None:
        state, start, init_from = resumed.state, resumed.step, resumed.how
    else:
        start = 0
        first.draw(0)
        params, init_from = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings,
                                           dtype=plan.base_dtype)
        state = fresh_state(cfg, plan, params)
        del params
    release_freed_host_memory()  # what loading freed (reading, casting) goes back before the step's temporaries
    log.info("init: %s (order: resume → model.pretrained → from scratch)", init_from)
    if jax.process_index() == 0:  # after the resume check: it compares against the checkpoint's own copy
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    logger = RunLogger(run, total_steps=cfg.train.steps, start_step=start, tensorboard=cfg.logging.tensorboard,
                       progress_bar=cfg.logging.progress_bar, every=cfg.logging.every)
    logger.message(f"jaxsd train: {init_from}")
    monitor = _Monitor(cfg, logger, ckpt, mesh.size)
    validator = Validator.from_config(cfg, plan, mesh)  # validation.every: the held-out loss (val/loss)
    if validator is not None and start == 0:  # the baseline, before any update
        validator(0, state, logger)
    stops = _StopPolls(TriggerFile(run_dir / cfg.checkpoint.trigger_file), cfg.checkpoint.poll_every)
    stopped = "done"
    step = start
    batch = first.batch
    data_state = source.get_state()
    pending: deque[_InFlight] = deque()  # dispatched steps whose metrics the host has not read yet

    base = base_fingerprint(cfg)

    def meta() -> dict:
        return {"step": step, "data": data_state, "config": to_yaml(cfg), "base": base, "state_format": STATE_FORMAT}

    # the host never waits for the device by accident: on GPU/TPU, reading a device value without an
    # explicit jax.device_get (float(x), np.asarray(x), int(state.step)) raises here (JAX does not check
    # CPU arrays, which live in host memory; tests/train/test_loop.py checks the read order instead)
    with _StopFlag() as stop, jax.transfer_guard_device_to_host("disallow"):
        while step < cfg.train.steps:
            state, metrics, flops = steps(state, batch)  # dispatched; runs while the host goes on
            step += 1
            data_state = source.get_state()  # the position after every batch this state has seen
            if step < cfg.train.steps:
                batch = on_mesh(next(source), mesh)
            pending.append(_InFlight(step, metrics, flops))
            # the steps more than train.steps_in_flight behind this one have run by now (or are about to)
            stopped = monitor.read_behind(pending, cfg.train.steps_in_flight)
            if stopped != "done":
                break  # (steps dispatched after it are not logged: the run stopped before them)
            signalled, triggered = stops.poll(step, stop.signum is not None)
            periodic = step % cfg.checkpoint.every == 0 or step == cfg.train.steps
            sample = sampler is not None and sampler.due(step)
            validate = validator is not None and validator.due(step)
            if not (periodic or signalled or triggered or sample or validate):
                continue
            # these need this step's own metrics (never checkpoint a skipped step): wait for it
            stopped = monitor.read_behind(pending, 0)
            if stopped != "done":
                break
            if not monitor.last_skipped and (periodic or signalled or triggered):
                with jax.transfer_guard_device_to_host("allow"):  # a checkpoint copies the state to host
                    ckpt.save(step, checkpointed(state), meta())  # the frozen base is not saved
                run.sync()  # a remote run dir gets the logs up to this checkpoint (what a resume goes on from)
            if signalled:
                logger.message(f"signal received: saved step {step}, stopping")
                stopped = "signal"
                break
            if sample:
                with jax.transfer_guard_device_to_host("allow"):  # the grid's pixels come to the host
                    sampler(step, state, logger)  # reads the state only; the next batch is already fetched
            if validate:
                with jax.transfer_guard_device_to_host("allow"):  # the losses come to the host
                    validator(step, state, logger)
            monitor.restart_clock()  # saving and sampling are not step time
    ckpt.close()
    logger.close()
    return TrainResult(state=state, step=monitor.last_step, stopped=stopped, init_from=init_from,
                       losses=monitor.losses)
