"""`jaxsd export RUN_DIR --single-file --out FILE.safetensors`: a trained UNet and its base's other
components as one single-file checkpoint (LDM layout: A1111, ComfyUI, diffusers' from_single_file).

The UNet is the checkpoint's (its EMA with `ema`); the VAE and text encoders come from BASE —
`pipeline` (a pipeline folder or a single file), else the run's `model.pretrained` — and must fit the
UNet (`pipeline_copy.check_unet_fits`); a `train.text_encoder: full` run's text encoders replace BASE's. The metadata records the family, the components' configs, the
run's noise schedule (prediction type included), the step and whether it is the EMA.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from jaxsd.convert.pipeline_copy import check_unet_fits
from jaxsd.convert.rules import flax_to_torch
from jaxsd.convert.single_file import layout
from jaxsd.convert.single_file.layout import folder_family
from jaxsd.convert.single_file.to_folder import model_folder
from jaxsd.convert.single_file.write import write_single_file
from jaxsd.convert.text_encoders import CLIP_SPEC
from jaxsd.convert.unet import UNET_SPEC
from jaxsd.errors import InputError
from jaxsd.train.export import TrainedUNet, load_trained_unet
from jaxsd.train.run_dir import run_path


@dataclasses.dataclass(frozen=True)
class SingleFileExport:
    out: Path
    step: int
    base: str  # where the VAE and text encoders came from
    family: str


def _trained_text(trained: TrainedUNet, folder: Path) -> dict[str, tuple[dict, dict]]:
    """{component: (transformers config, state dict)} of the text encoders a `train.text_encoder: full` run
    trained ({} for others): they replace BASE's in the file."""
    if trained.text is None:
        return {}
    slots = layout.TEXT_ENCODERS.get(layout.folder_family(folder), {})
    missing = [c for c in trained.text.params if c not in slots]
    if missing:
        raise InputError(f"--single-file: the run trained {', '.join(missing)}, which the single-file layout of "
                         f"{folder} has no place for (the T5 hybrid has no single-file form); export a diffusers "
                         "folder instead (without --single-file)")
    return {c: (trained.text.configs[c].to_transformers(), flax_to_torch(trained.text.merged(c), spec=CLIP_SPEC))
            for c in trained.text.params}


def export_single_file(run_dir: str | os.PathLike, out: str | os.PathLike, *, pipeline: str | None = None,
                       ema: bool = False, step: int | None = None, dtype=None) -> SingleFileExport:
    """Write checkpoint `step` (default: the newest) of `run_dir` with BASE's other components to file `out`."""
    run_dir, out = run_path(run_dir, "RUN_DIR"), Path(out)
    chosen: dict[str, object] = {}

    def choose_base(cfg, unet) -> None:
        if cfg.lora.enabled:
            raise InputError(f"{run_dir} trained LoRA adapters: export them as a LoRA file (--lora), or merged "
                             "into a diffusers folder (--merge-lora) and convert that with `jaxsd convert DIR "
                             "--single-file`")
        base = pipeline or cfg.model.pretrained
        if not base:
            raise InputError("--single-file writes the whole model: give --pipeline BASE (a pipeline folder or a "
                             "single file) for the VAE and text encoders; the run has no model.pretrained")
        flag = "--pipeline" if pipeline else "the run's model.pretrained (default --pipeline)"
        folder = model_folder(base)
        if not (Path(folder) / "model_index.json").is_file():
            raise InputError(f"{flag} {base}: a UNet folder; --single-file needs a pipeline folder or single file")
        check_unet_fits(folder, unet.to_diffusers(), flag=flag)
        chosen.update(base=str(base), folder=folder)

    trained = load_trained_unet(run_dir, ema=ema, step=step, before_restore=choose_base)
    folder = Path(chosen["folder"])
    base_scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(base_scheduler.read_text()) if base_scheduler.is_file() else {}
    scheduler = {**{k: v for k, v in scheduler.items() if k != "trained_betas"},
                 **trained.run_config.diffusion.to_scheduler_config()}
    metadata = {"jaxsd.steps": str(trained.step), "jaxsd.ema": str(ema).lower(), "jaxsd.base": chosen["base"],
                "jaxsd.scheduler": json.dumps(scheduler, sort_keys=True),
                "jaxsd.prediction_type": scheduler.get("prediction_type", "epsilon")}
    state = flax_to_torch(trained.params, spec=UNET_SPEC)
    write_single_file(folder, out, dtype=dtype, unet=(trained.config.to_diffusers(), state), metadata=metadata,
                      text=_trained_text(trained, folder))
    return SingleFileExport(out.absolute(), trained.step, chosen["base"], folder_family(folder))
