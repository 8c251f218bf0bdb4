"""Checkpoint → diffusers folder (the `jaxsd export` command).

Two outputs:
  pipeline folder  the trained UNet as unet/ + every other component of a base pipeline folder
                   (hard-linked, or copied across filesystems) + its model_index.json: loads in
                   `jaxsd sample --model` and diffusers' `DiffusionPipeline.from_pretrained`.
  UNet folder      config.json + diffusion_pytorch_model.safetensors (`UNet2DConditionModel`),
                   when there is no base pipeline or with unet_only.

The base is `pipeline` when given, else the run's `model.pretrained` when that is a pipeline
folder (has model_index.json). Its components are checked against the trained UNet's config
before any weights are read (`convert/pipeline_copy.py`). Its scheduler is kept, except that a
noise schedule (betas, prediction type) other than the run's `diffusion` section is replaced by
the run's — that is what the UNet learned to invert.

From the checkpoint only the params (or their EMA) are read, as host arrays
(`partial_restore.py`): never the optimizer state. The frozen params are not in a checkpoint:
they come from the run's base (`model.pretrained` or the seed), whose fingerprint must match the
checkpoint's (`jaxsd/train/base.py`). The run's config is the one stored in
that checkpoint (`meta["config"]`), so a run resumed with other settings exports each step with
its own. Without a step, the newest checkpoint that restores is used; a damaged one is skipped
with a warning.

A `train.text_encoder: full` run's text side (its text encoders, the hybrid's T5 and text_projection/)
replaces BASE's components of the same names.

A LoRA run is exported with `merge_lora`: the base UNet with the adapters folded in; when the text
encoders trained adapters too (`lora.text_encoder`), the run's text encoders (those of
`data.cache.text_encoder`) with theirs folded in replace BASE's `text_encoder/` (`text_encoder_2/`).

The output is written whole or not at all and replaces only a previous export (see
`convert/output_folder.py`); `jaxsd_export.json` in it records what was exported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxsd.config import Config, DiffusionConfig, ShardingConfig, from_yaml_text
from jaxsd.convert.output_folder import check_replaceable, replacing_folder
from jaxsd.convert.pipeline_copy import (
    REPLACED,
    LinkReport,
    check_unet_fits,
    link_components,
    pipeline_components,
)
from jaxsd.diffusion.schedule import make_betas
from jaxsd.errors import InputError
from jaxsd.models.params import fingerprint_params
from jaxsd.models.unet import UNetConfig
from jaxsd.pipelines.text_length import set_text_max_length
from jaxsd.text.encode import PROJECTION_NAME
from jaxsd.train.base import base_fingerprint, load_frozen
from jaxsd.train.checkpoint import RESTORE_ERRORS
from jaxsd.train.partial_restore import CheckpointReader
from jaxsd.train.plan import plan_state
from jaxsd.train.run_dir import is_remote, require_run_dir, run_path
from jaxsd.train.sampling import training_text_length
from jaxsd.train.sharding import make_mesh

log = logging.getLogger("jaxsd.export")
MARKER = "jaxsd_export.json"


@dataclasses.dataclass(frozen=True)
class TrainedText:
    """The text side a checkpoint trained (numpy arrays), per component ("text_encoder", "text_encoder_2",
    "text_projection"). `lora.text_encoder`: the adapted encoders' base params, their trained down/up trees
    and plans; `train.text_encoder: full`: every component's trained params (no adapters)."""

    params: dict[str, Any]
    adapters: dict[str, Any]
    plans: dict[str, Any]  # jaxsd.train.adapters.AdapterPlan
    configs: dict[str, Any]  # CLIPTextConfig, T5Config, TextProjectionConfig

    def merged(self, component: str) -> Any:
        """The component's params, with its adapters (if any) folded into the kernels (scale alpha / rank)."""
        if component not in self.plans:
            return self.params[component]
        return jax.device_get(jax.jit(self.plans[component].merged)(self.adapters[component], self.params[component]))

    def save(self, component: str, folder: Path) -> None:
        """Write the component as its transformers / jaxsd folder (weights as `merged` gives them)."""
        from jaxsd.convert.text_encoders import save_clip, save_t5, save_text_projection
        from jaxsd.models.clip import CLIPTextConfig
        from jaxsd.models.t5 import T5Config

        config = self.configs[component]
        save = (save_clip if isinstance(config, CLIPTextConfig) else save_t5 if isinstance(config, T5Config)
                else save_text_projection)
        save(folder, config, self.merged(component))


@dataclasses.dataclass(frozen=True)
class TrainedUNet:
    """One checkpoint's UNet: params: nested dict of numpy arrays (trained or EMA, merged with frozen)."""

    run_config: Config
    config: UNetConfig
    params: Any
    step: int
    ema: bool
    adapters: Any = None  # LoRA runs: the trained down/up tree (params holds them folded in)
    adapter_plan: Any = None  # its jaxsd.train.adapters.AdapterPlan
    base_hash: str | None = None  # LoRA runs: fingerprint_params of the frozen base UNet
    text: TrainedText | None = None  # lora.text_encoder runs: the text encoders' adapters


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: Path
    step: int
    pipeline: Path | None  # the base whose components were placed beside the UNet; None: UNet folder only
    links: LinkReport | None
    scheduler_from_run: bool  # the base's scheduler config got the run's noise schedule
    text: tuple[str, ...] = ()  # the text components written from the run (trained), not linked from the base


def _run_config(meta: dict, where: epath.Path, ema: bool) -> Config:
    cfg = from_yaml_text(meta["config"])
    if ema and not cfg.train.ema.enabled:
        raise InputError(f"--ema: the run in {where} was trained without EMA (train.ema.enabled=false); "
                         "export without --ema")
    pretrained = cfg.model.pretrained
    if pretrained and not Path(pretrained).exists():
        raise InputError(f"{where}: the run's model.pretrained {pretrained} does not exist any more; export reads "
                         "the UNet's architecture (config.json) from it — put the folder back at that path")
    return cfg


def _warn_skip(where: epath.Path, e: Exception, failures: list[str]) -> None:
    log.warning("checkpoint %s does not restore (%s: %s); trying the previous one",
                where, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
    failures.append(f"{where}: {type(e).__name__}")


def steps_to_try(reader: CheckpointReader, run_dir: epath.Path, step: int | None) -> list[int]:
    """The checkpoint steps an export tries in order: `step` alone, else every one, newest first."""
    steps = reader.steps()
    if not steps:
        raise InputError(f"{run_dir}/checkpoints: no checkpoint yet; train until one is saved "
                         "(checkpoint.every, or at the end of the run)")
    if step is not None and step not in steps:
        raise InputError(f"--step {step}: no such checkpoint in {run_dir}/checkpoints; have {steps}")
    return [step] if step is not None else steps[::-1]


def restored_checkpoints(reader: CheckpointReader, run_dir: epath.Path, step: int | None, ema: bool,
                         before_restore: Callable[[Config, Any], None] | None = None) -> Iterator[tuple]:
    """(step, its directory, meta, run config, plan, trained params or EMA as numpy) of each checkpoint to try
    (`steps_to_try`) whose meta and params read; one that does not is skipped with a warning, and when none
    is left an InputError names them all. before_restore(run config, model config) runs before the params
    are read; its errors (and the run config's: --ema without EMA) propagate."""
    failures: list[str] = []
    for s in steps_to_try(reader, run_dir, step):
        where = reader.directory / str(s)
        try:
            meta = reader.meta(s)
        except RESTORE_ERRORS as e:
            _warn_skip(where, e, failures)
            continue
        cfg = _run_config(meta, where, ema)
        plan = plan_state(cfg, make_mesh(ShardingConfig(data=1), jax.devices()[:1]))
        if before_restore is not None:
            before_restore(cfg, plan.module.config)
        which = "ema" if ema else "params"
        try:
            fields = reader.restore_fields(s, {which: getattr(plan.abstract, which)})
        except RESTORE_ERRORS as e:
            _warn_skip(where, e, failures)
            continue
        yield s, where, meta, cfg, plan, fields[which]
    raise InputError("no checkpoint restores: " + "; ".join(failures) + (". Pick another with --step" if step is not None
                                                                         else ""))


def load_trained_unet(run_dir: str | os.PathLike, *, ema: bool = False, step: int | None = None,
                      before_restore: Callable[[Config, UNetConfig], None] | None = None) -> TrainedUNet:
    """The UNet of checkpoint `step` (default: the newest that restores) of a `jaxsd train` run dir
    (a local path or gs://...).

    before_restore(run config, UNet config) runs before the params are read (checks that should
    fail fast); its errors propagate.
    """
    run_dir = require_run_dir(run_dir)
    reader = CheckpointReader(run_dir / "checkpoints")
    try:
        for s, where, meta, cfg, plan, trained in restored_checkpoints(reader, run_dir, step, ema, before_restore):
            base = base_fingerprint(cfg)
            if meta.get("base", base) != base:
                raise InputError(f"{where}: the run's base model changed since this checkpoint was written "
                                 f"(fingerprint {meta['base']}, now {base}); its frozen params "
                                 f"come from model.pretrained={cfg.model.pretrained!r}, which must be that model")
            text_trains = plan.text is not None and plan.text.trains
            frozen = jax.device_get(load_frozen(cfg, plan, text=text_trains))  # the UNet alone needs no encoders
            if plan.adapters is None:
                text = None
                if text_trains:  # train.text_encoder: full — the trained text side, whole
                    text = TrainedText(plan.text_parts(trained, frozen)[0], {}, {}, plan.text.configs(clip_only=False))
                elif plan.projection is not None:  # the raw-T5 hybrid's projection
                    text = TrainedText({PROJECTION_NAME: trained[PROJECTION_NAME]}, {}, {},
                                       {PROJECTION_NAME: plan.projection.config})
                return TrainedUNet(cfg, plan.module.config, plan.merged(trained, frozen), s, ema, text=text)
            merged = jax.device_get(jax.jit(plan.merged)(trained, frozen))
            unet_adapters, unet_base = plan.unet_parts(trained, frozen)
            text = None
            if text_trains:
                names = tuple(plan.text.adapters)
                text = TrainedText({c: frozen[c] for c in names}, {c: trained[c] for c in names},
                                   dict(plan.text.adapters), plan.text.configs())
            return TrainedUNet(cfg, plan.module.config, merged, s, ema, unet_adapters, plan.adapters,
                               fingerprint_params(unet_base), text)
        raise AssertionError("restored_checkpoints yields or raises")  # unreachable
    finally:
        reader.close()


def default_pipeline(cfg: Config) -> Path | None:
    """The run's `model.pretrained` when it is a pipeline folder (has model_index.json), else None."""
    pretrained = cfg.model.pretrained
    return Path(pretrained) if pretrained and (Path(pretrained) / "model_index.json").is_file() else None


def _same_schedule(a: dict, b: dict) -> bool:
    return (np.array_equal(make_betas(a), make_betas(b))
            and a.get("prediction_type", "epsilon") == b.get("prediction_type", "epsilon"))


def use_run_schedule(folder: Path, diffusion: DiffusionConfig) -> bool:
    """Give folder/scheduler/scheduler_config.json the run's noise schedule if it has another one.

    Spacing, offsets and the scheduler class stay the base's. Returns whether the file changed.
    """
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return False
    base = json.loads(path.read_text())
    run = {**{k: v for k, v in base.items() if k != "trained_betas"}, **diffusion.to_scheduler_config()}
    if _same_schedule(base, run):
        return False
    path.unlink()  # it is a hard link to the base's file: write a new file, never through the link
    path.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    return True


def export(run_dir: str | os.PathLike, out: str | Path, *, pipeline: str | Path | None = None, unet_only: bool = False,
           ema: bool = False, step: int | None = None, merge_lora: bool = False) -> ExportResult:
    """Write checkpoint `step` (default: the newest) of `run_dir` to `out` as a pipeline or UNet folder.

    merge_lora: a LoRA run's adapters folded into the base UNet (required for LoRA runs: a folder
    holds whole weights; `jaxsd.train.export_lora` writes the adapters alone as a LoRA file), and
    text-encoder adapters (lora.text_encoder) into the run's text encoders, which replace the base's."""
    from jaxsd.convert.unet import save_unet

    if pipeline is not None and unet_only:
        raise InputError("--pipeline and --unet-only exclude each other: a UNet folder has no other components")
    run_dir, out = run_path(run_dir, "RUN_DIR"), Path(out)  # RUN_DIR may be gs://...; out is a local folder
    keep = [*([] if is_remote(run_dir) else [run_dir]), *([pipeline] if pipeline is not None else [])]
    check_replaceable(out, MARKER, keep)  # before the checkpoint is read: a refused --out costs nothing
    if pipeline is not None:
        pipeline_components(pipeline, may_lack=REPLACED)
    chosen: dict[str, Path | None] = {}

    def choose_base(cfg: Config, unet: UNetConfig) -> None:
        if cfg.lora.enabled and not merge_lora:
            raise InputError(f"{run_dir} trained LoRA adapters: export them as a LoRA file (--lora --out "
                             "FILE.safetensors) or merged into the UNet as a diffusers folder (--merge-lora)")
        if merge_lora and not cfg.lora.enabled:
            raise InputError(f"--merge-lora: {run_dir} is not a LoRA run (lora.rank is 0)")
        base = None if unet_only else Path(pipeline) if pipeline is not None else default_pipeline(cfg)
        text_side = cfg.train.text_encoder == "full" or (cfg.train.data_source == "cache" and cfg.data.cache.text == "t5")
        if base is None and text_side and not unet_only:
            raise InputError(f"{run_dir} trained its text side too (train.text_encoder: full, or the projection of "
                             "data.cache.text: t5), and there is no "
                             "pipeline folder to write them into: give --pipeline BASE (the pipeline the run trained "
                             "on), or --unet-only for the UNet alone")
        if base is None and cfg.lora.text_encoder:
            raise InputError(f"--merge-lora: {run_dir} trained text-encoder adapters too (lora.text_encoder), and a "
                             "UNet folder has no text encoder to merge them into: give --pipeline BASE (a pipeline "
                             "folder) instead of --unet-only, or write the adapters as a LoRA file (--lora)")
        if base is not None:
            flag = "--pipeline" if pipeline is not None else "the run's model.pretrained (default --pipeline)"
            check_replaceable(out, MARKER, [*keep, base])
            check_unet_fits(base, unet.to_diffusers(), flag=flag)
        chosen["base"] = base

    trained = load_trained_unet(run_dir, ema=ema, step=step, before_restore=choose_base)
    base = chosen["base"]
    # the text components the run trained (adapters merged in): written from the run, not linked from BASE
    text = sorted(trained.text.params) if trained.text is not None and base is not None else []
    if base is not None:
        missing = [c for c in text if c not in pipeline_components(base)]
        if missing:
            raise InputError(f"the run trained {', '.join(missing)}, which the base "
                             f"pipeline {base} does not have; use --pipeline with the pipeline the run trained on")
    links, from_run = None, False
    with replacing_folder(out, MARKER, [*keep, *([base] if base else [])]) as staging:
        if base is not None:
            links = link_components(base, staging, skip=("unet", *text))
            from_run = use_run_schedule(staging, trained.run_config.diffusion)
            text_length = training_text_length(trained.run_config)
            if text_length is not None:  # the T5 length the run's text cache was encoded at
                set_text_max_length(staging, text_length)
        save_unet(staging / "unet" if base is not None else staging, trained.config, trained.params)
        for component in text:  # the run's own text encoders (data.cache.text_encoder's), adapters folded in
            trained.text.save(component, staging / component)
        record = {"written_by": "jaxsd export", "run_dir": str(run_dir), "step": trained.step,
                  "ema": ema, "pipeline": str(base.absolute()) if base else None, "merged_text_encoders": text,
                  "scheduler": "the run's noise schedule" if from_run else ("the pipeline's" if base else None)}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return ExportResult(out.absolute(), trained.step, base, links, from_run, tuple(text))


def export_unet(run_dir: str | os.PathLike, out: str | Path, *, ema: bool = False, step: int | None = None) -> tuple[Path, int]:
    """Write the UNet of checkpoint `step` (default latest) of `run_dir` as a diffusers UNet folder `out`."""
    result = export(run_dir, out, unet_only=True, ema=ema, step=step)
    return result.out, result.step
