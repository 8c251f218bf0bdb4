"""Tiny SD1 / SD2 / SDXL pipelines for the single-file tests, and "original" single files made from them.

SD2 is the v-prediction model: an OpenCLIP-style text encoder (gelu, pad token "!"), a UNet with linear
projections and upcast attention. An original file is what A1111/ComfyUI users have: fp16, no jaxsd
metadata, the LDM training EMA (`model_ema.*`), the DDPM schedule buffers, CLIP's position_ids, and for
SD2 OpenCLIP's projection, logit scale and the last layer diffusers drops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from tests.pipelines.tiny import SCHEDULER, _clip, _scale_unet, _vae, build_sd, build_sdxl
from tests.text.tiny import clip_vocab_and_merges, write_clip_tokenizer


def build_sd2(folder: Path) -> Path:
    """A StableDiffusionPipeline like SD2.1-768-v: OpenCLIP-style encoder, v-prediction, linear projection."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(3)
    vocab, _ = clip_vocab_and_merges()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, upcast_attention=True)
    diffusers.StableDiffusionPipeline(
        vae=_vae(torch, diffusers, 0.18215), text_encoder=_clip(torch, transformers, vocab, hidden=64, act="gelu"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok", pad_token="!")),
        unet=_scale_unet(torch, unet, 4.0),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER, prediction_type="v_prediction", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


BUILDERS = {"sd1": build_sd, "sd2": build_sd2, "sdxl": build_sdxl}
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance")


def original_file(jaxsd_file: Path, out: Path, family: str) -> dict[str, np.ndarray]:
    """`jaxsd_file` (a single file jaxsd wrote) as an original LDM checkpoint at `out` (see the module doc).
    Returns its tensors."""
    from jaxsd.convert.single_file.layout import UNET_PREFIX, ema_key

    src = SafetensorsFile(jaxsd_file)
    rng = np.random.default_rng(0)
    tensors = {k: np.asarray(src[k]).astype(np.float16) for k in src}
    for k in list(tensors):
        if k.startswith(UNET_PREFIX):  # the EMA: other numbers than the UNet's
            tensors[ema_key(k)] = (tensors[k] * 0.5).astype(np.float16)
    tensors["model_ema.decay"] = np.array(0.9999, np.float32)
    tensors["model_ema.num_updates"] = np.array(1000, np.int32)
    for name in _SCHEDULE_BUFFERS:
        tensors[name] = rng.random(1000).astype(np.float32)
    if family == "sd1":
        tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None].astype(np.int64)
    if family == "sd2":
        prefix = "cond_stage_model.model."
        hidden = tensors[prefix + "token_embedding.weight"].shape[1]
        tensors[prefix + "text_projection"] = rng.standard_normal((hidden, hidden)).astype(np.float16)
        tensors[prefix + "logit_scale"] = np.array(4.6, np.float16)
        layers = {k.split(".")[4] for k in tensors if k.startswith(prefix + "transformer.resblocks.")}
        last = len(layers)  # the layer SD2 does not condition on: diffusers' config leaves it out
        for k in [k for k in tensors if k.startswith(prefix + "transformer.resblocks.0.")]:
            tensors[k.replace(".resblocks.0.", f".resblocks.{last}.")] = (tensors[k] + 1).astype(np.float16)
    save_file(tensors, out, {"format": "pt"})
    return tensors


__all__ = ["BUILDERS", "build_sd2", "original_file"]
