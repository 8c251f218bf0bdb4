"""LoRA files on a loaded pipeline: read them against its UNet and CLIP text encoders, and turn
(files, scales) into the "lora" variables the UNet and text encoders apply.

Several files apply at once: per adapted layer their ranks are concatenated, each rank
column carrying its file's scale · alpha / rank (`jaxsd.models.lora`). A scale change is
therefore new values in the same arrays, and the compiled generation program is reused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxsd.convert.lora import LoraModel, LoraWeights, combine_loras, read_lora, warn_if_other_base
from jaxsd.convert.lora_metadata import BASE_HASH_KEY
from jaxsd.errors import InputError
from jaxsd.models.clip import CLIPTextModel
from jaxsd.models.params import fingerprint_params
from jaxsd.pipelines.loading import LoadedPipeline

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def lora_model(pipe: LoadedPipeline) -> LoraModel:
    """What LoRA files are read against: the pipeline's UNet and its CLIP encoders (T5 takes none)."""
    text = {}
    if pipe.text is not None:
        for name, comp in zip(TEXT_COMPONENTS, pipe.text.components):
            if isinstance(comp.model, CLIPTextModel):
                text[name] = comp.model.config
    return LoraModel(pipe.family, pipe.unet_config, text)


def read_loras(pipe: LoadedPipeline, files: Sequence[str | os.PathLike]) -> list[LoraWeights]:
    """Read each file against the pipeline's model; warn for files made on another base UNet."""
    model = lora_model(pipe)
    loras = [read_lora(f, model) for f in files]
    if any(w.metadata.get(BASE_HASH_KEY) for w in loras):
        fingerprint = fingerprint_params(pipe.unet_params)
        for w in loras:
            warn_if_other_base(w, fingerprint)
    return loras


def lora_scales(count: int, scales: Sequence[float] | None) -> list[float]:
    """One scale per file: the given ones, or 1.0 each."""
    if scales is None or len(scales) == 0:
        return [1.0] * count
    if len(scales) != count:
        raise InputError(f"{len(scales)} LoRA scales for {count} LoRA files; give one scale per file "
                         "(--lora-scale S1 S2 ... in the order of --lora), or none for 1.0 each")
    return [float(s) for s in scales]


def apply_loras(pipe: LoadedPipeline, loras: Sequence[LoraWeights], scales: Sequence[float]) -> dict | None:
    """Set the text encoders' "lora" variables for (loras, scales) and return the UNet's (None
    when no file adapts it). No LoRA at all restores the plain model."""
    variables = combine_loras(list(zip(loras, scales))) if loras else {}
    if pipe.text is not None:
        for name, comp in zip(TEXT_COMPONENTS, pipe.text.components):
            comp.lora = variables.get(name)
    return variables.get("unet")


__all__ = ["apply_loras", "lora_model", "lora_scales", "read_loras"]
