"""Which components a single file holds, under which key prefixes, and what family it is.

  family  text encoders (prefix → layout)                                        pipeline class
  sd1     cond_stage_model.transformer. → clip (transformers CLIP-L names)       StableDiffusionPipeline
  sd2     cond_stage_model.model.       → open_clip                              StableDiffusionPipeline
  sdxl    conditioner.embedders.0.transformer. → clip, .1.model. → open_clip     StableDiffusionXLPipeline

The UNet is under `model.diffusion_model.`, the VAE under `first_stage_model.` (or no prefix in a
VAE-only file such as `vae-ft-mse-840000-ema-pruned.safetensors`). Keys a checkpoint carries that no
diffusers component uses — the training EMA (`model_ema.*`), the DDPM schedule buffers, CLIP's
`position_ids`, OpenCLIP's `logit_scale`, SD2's unused projection and last layer — are "extras":
kept aside (a converted folder stores them, so the file comes back whole), never an error. Any
other key is unknown, and an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from jaxsd.convert.folder import read_config
from jaxsd.errors import InputError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
FAMILIES = ("sd1", "sd2", "sdxl")
PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                  "sdxl": "StableDiffusionXLPipeline"}
# component -> (prefix, layout) per family; a `clip` layout's names go on under `transformer.` (names.clip_ref)
TEXT_ENCODERS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("cond_stage_model.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.", "clip"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip")},
}
# LDM DDPM buffers (ldm/models/diffusion/ddpm.py register_schedule) and other non-parameters
_EXTRA = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights"
    r"|model_ema\..*|denoiser\.(sigmas|log_sigmas)"  # SGM (SDXL) files: the discrete denoiser's buffers
    r"|.*\.position_ids|.*model\.logit_scale|.*model\.attn_mask)")


def is_extra(key: str) -> bool:
    """A key that is not a diffusers parameter but belongs in such a checkpoint (see the module doc)."""
    return bool(_EXTRA.fullmatch(key))


def ema_key(key: str) -> str:
    """LDM's EMA copy of UNet key `model.diffusion_model.X`: `model_ema.diffusion_modelX` without X's dots."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def _looks_like_lora(keys: list[str]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k or "lora_down" in k
               for k in keys)


def detect_family(keys: Iterable[str], shapes: dict[str, tuple[int, ...]], source: str) -> tuple[str | None, str]:
    """(family or None when the file does not say, the reason in words) from the names (and a UNet's
    cross-attention width when the file has no text encoder)."""
    keys = list(keys)
    has = {p: any(k.startswith(p) for k in keys) for p in
           ("conditioner.embedders.1.model.", "conditioner.embedders.0.transformer.", "cond_stage_model.model.",
            "cond_stage_model.transformer.", UNET_PREFIX, VAE_PREFIX)}
    if has["conditioner.embedders.1.model."]:
        return "sdxl", "two text encoders under conditioner.embedders.0/1"
    if has["cond_stage_model.model."]:
        return "sd2", "an OpenCLIP text encoder under cond_stage_model.model."
    if has["cond_stage_model.transformer."]:
        return "sd1", "a CLIP text encoder under cond_stage_model.transformer."
    if has[UNET_PREFIX]:
        if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
            return "sdxl", "a UNet with SDXL's label_emb (text_time) embedding, no text encoder"
        widths = {shapes[k][1] for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
        by_width = {768: "sd1", 1024: "sd2"}
        if len(widths) == 1 and next(iter(widths)) in by_width:
            w = next(iter(widths))
            return by_width[w], f"a UNet with {w}-wide cross-attention, no text encoder"
        return None, "a UNet without text encoder whose cross-attention width names no standard family"
    if has[VAE_PREFIX] or any(k.startswith("encoder.down.") for k in keys):
        return None, "a VAE only"
    if _looks_like_lora(keys):
        raise InputError(f"{source}: this is a LoRA file (keys like {keys[0]!r}), not a model checkpoint; "
                         "apply it with `jaxsd sample --lora FILE` or `lora.init_from`")
    sample = ", ".join(sorted(keys)[:5]) or "none"
    raise InputError(f"{source}: not a single-file Stable Diffusion checkpoint: none of its {len(keys)} keys is "
                     f"under model.diffusion_model., first_stage_model. or a text encoder prefix (first keys: "
                     f"{sample}). jaxsd reads the original LDM layout of SD1/SD2/SDXL checkpoints "
                     "(A1111, ComfyUI); for a diffusers folder pass the folder")


def folder_family(folder: str | os.PathLike) -> str:
    """sd1 | sd2 | sdxl of a pipeline folder; other pipelines (T5 hybrids, ...) have no single-file layout."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise InputError(f"{folder}: no model_index.json — give a diffusers pipeline folder")
    index = json.loads((folder / "model_index.json").read_text())
    if "XL" in str(index.get("_class_name", "")) or index.get("text_encoder_2"):
        return "sdxl"
    te = read_config(folder / "text_encoder")
    if te.get("model_type") == "t5" or "text_projection" in index:
        raise InputError(f"{folder}: a T5 text encoder has no place in the SD1/SD2/SDXL single-file layout; "
                         "keep this pipeline as a folder")
    return "sd2" if te.get("hidden_act") == "gelu" else "sd1"


def vae_prefix(keys: Iterable[str]) -> str:
    """`first_stage_model.`, or "" for a VAE-only file in the LDM layout."""
    keys = list(keys)
    return VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""


__all__ = ["EMA_PREFIX", "FAMILIES", "PIPELINE_CLASS", "TEXT_ENCODERS", "UNET_PREFIX", "VAE_PREFIX",
           "detect_family", "ema_key", "folder_family", "is_extra", "vae_prefix"]
