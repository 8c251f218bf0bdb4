"""A LoRA run's adapters as a LoRA file (`jaxsd export RUN --lora --out FILE.safetensors`).

The trained `down` / `up` matrices (or their EMA) of one checkpoint, in the PEFT/diffusers layout
(what `pipe.save_lora_weights` writes and `pipe.load_lora_weights` reads) or kohya's
(`lora_unet_...`, what kohya-ss, A1111 and ComfyUI load), with rank/alpha as those tools read them
and metadata: base model family, rank, alpha, targets, steps and a fingerprint of the base UNet
(`jaxsd.convert.lora`). A `lora.text_encoder` run's text-encoder adapters go in the same file
(`text_encoder.` / `text_encoder_2.`; kohya `lora_te_`, SDXL `lora_te1_` / `lora_te2_`). The family
comes from the base pipeline folder (`--pipeline`, default the run's `model.pretrained`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from jaxsd.convert.lora import LoraInfo, LoraModel, LoraWeights, write_lora
from jaxsd.errors import InputError
from jaxsd.pipelines.loading import detect_family
from jaxsd.train.export import default_pipeline, load_trained_unet


@dataclasses.dataclass(frozen=True)
class LoraExport:
    out: Path
    step: int
    layers: int
    family: str


def export_lora(run_dir: str | os.PathLike, out: str | Path, *, layout: str = "peft", pipeline: str | Path | None = None,
                ema: bool = False, step: int | None = None) -> LoraExport:
    """Write the adapters of checkpoint `step` (default: the newest) of a LoRA run to the file `out`."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"--lora --out {out}: a LoRA file is one .safetensors file; name it FILE.safetensors")
    found: dict[str, str] = {}

    def family_of(cfg, unet_config) -> None:
        if not cfg.lora.enabled:
            raise InputError(f"--lora: {run_dir} is not a LoRA run (lora.rank is 0); export its UNet without --lora")
        base = Path(pipeline) if pipeline is not None else default_pipeline(cfg)
        if base is None:
            raise InputError("--lora: the file records the base model's family (sd1, sd2, sdxl), read from a "
                             f"pipeline folder; model.pretrained={cfg.model.pretrained!r} is not one: add "
                             "--pipeline BASE")
        found["family"] = detect_family(base)

    trained = load_trained_unet(run_dir, ema=ema, step=step, before_restore=family_of)
    lc = trained.run_config.lora
    family = found["family"]
    adapters, plans, text_configs = {"unet": trained.adapters}, {"unet": trained.adapter_plan.specs}, {}
    if trained.text is not None:  # lora.text_encoder: text_encoder. / lora_te_ (SDXL: lora_te1_, lora_te2_) keys
        for component, tree in trained.text.adapters.items():
            adapters[component], plans[component] = tree, trained.text.plans[component].specs
            text_configs[component] = trained.text.configs[component]
    weights = LoraWeights.from_adapters(adapters, plans)
    targets = lc.targets if isinstance(lc.targets, str) else tuple(lc.targets)
    info = LoraInfo(family=family, rank=lc.rank, alpha=float(lc.alpha or lc.rank), conv_rank=lc.conv_rank,
                    conv_alpha=float(lc.conv_alpha or lc.conv_rank), targets=targets,
                    text_encoder=trained.text is not None, steps=trained.step, base_unet_hash=trained.base_hash)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_lora(out, weights, LoraModel(family, trained.config, text_configs), layout=layout, info=info)
    return LoraExport(out, trained.step, weights.count(), family)
