"""A VAE run's checkpoint → a diffusers AutoencoderKL folder (`jaxsd export RUN --out DIR`, model.kind vae).

DIR gets config.json + diffusion_pytorch_model.safetensors (`AutoencoderKL.from_pretrained(DIR)`; also
what `model.pretrained`, `data.cache.vae` and a pipeline's vae/ take) and jaxsd_export.json. The
autoencoder is read as the UNet's export reads it (jaxsd/train/export.py): the trained params (or their
EMA) of the checkpoint alone, never the optimizer state nor the discriminator, merged with the frozen
encoder of a decoder-only fine-tune reloaded from `model.pretrained` (whose fingerprint must match).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from jaxsd.convert.output_folder import check_replaceable, replacing_folder
from jaxsd.errors import InputError
from jaxsd.train.base import base_fingerprint
from jaxsd.train.checkpoint import RESTORE_ERRORS
from jaxsd.train.export import MARKER, restored_checkpoints
from jaxsd.train.partial_restore import CheckpointReader
from jaxsd.train.run_dir import is_remote, require_run_dir, run_path
from jaxsd.train.vae_plan import load_vae_frozen


@dataclasses.dataclass(frozen=True)
class VAEExport:
    out: Path
    step: int


def run_model_kind(run_dir: str | os.PathLike) -> str:
    """model.kind of the run's newest checkpoint ("unet" when there is none: the UNet export reports that)."""
    from jaxsd.config import from_yaml_text

    reader = CheckpointReader(require_run_dir(run_dir) / "checkpoints")
    try:
        for step in reader.steps()[::-1]:
            try:
                return from_yaml_text(reader.meta(step)["config"]).model.kind
            except RESTORE_ERRORS:
                continue
        return "unet"
    finally:
        reader.close()


def export_vae(run_dir: str | os.PathLike, out: str | Path, *, ema: bool = False,
               step: int | None = None) -> VAEExport:
    """Write checkpoint `step` (default: the newest that restores) of VAE run `run_dir` as an AutoencoderKL folder."""
    from jaxsd.convert.vae import save_vae

    run_dir, out = run_path(run_dir, "RUN_DIR"), Path(out)
    keep = [] if is_remote(run_dir) else [run_dir]
    check_replaceable(out, MARKER, keep)
    reader = CheckpointReader(run_dir / "checkpoints")
    try:
        for s, where, meta, cfg, plan, trained in restored_checkpoints(reader, run_dir, step, ema):
            if meta.get("base", base_fingerprint(cfg)) != base_fingerprint(cfg):
                raise InputError(f"{where}: the run's base changed since this checkpoint was written (fingerprint "
                                 f"{meta['base']}, now {base_fingerprint(cfg)}): the frozen encoder and LPIPS come "
                                 f"from model.pretrained={cfg.model.pretrained!r} and loss.lpips, which must be "
                                 "those files")
            params = jax.device_get(plan.merged(trained, load_vae_frozen(cfg, plan, lpips=False)))
            with replacing_folder(out, MARKER, keep) as staging:
                save_vae(staging, plan.module.config, params)
                record = {"written_by": "jaxsd export", "run_dir": str(run_dir), "step": s, "ema": ema,
                          "model": "AutoencoderKL"}
                (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
            return VAEExport(out.absolute(), s)
        raise AssertionError("restored_checkpoints yields or raises")  # unreachable
    finally:
        reader.close()
