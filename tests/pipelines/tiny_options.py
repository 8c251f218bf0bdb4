"""Tiny folders the generation-option tests add to tests/pipelines/tiny.py's pipelines: a second VAE
(for --vae), an SD inpainting pipeline (UNet with 9 input channels) and an fp16-variant copy."""

from __future__ import annotations

from pathlib import Path

from tests.pipelines.tiny import SCHEDULER, _clip, _scale_unet, _vae
from tests.text.tiny import clip_vocab_and_merges, write_clip_tokenizer


def build_vae(folder: Path, seed: int = 5) -> Path:
    """A standalone AutoencoderKL folder with the SD fixture's config and other weights."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    _vae(torch, diffusers, 0.18215).save_pretrained(folder)
    return folder


def build_sd_inpaint(folder: Path) -> Path:
    """A StableDiffusionInpaintPipeline: the SD fixture's shapes with a 9-input-channel UNet."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(3)
    vocab, _ = clip_vocab_and_merges()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    with torch.no_grad():  # the mask and masked-image channels must steer the output visibly
        unet.conv_in.weight[:, 4:].mul_(4.0)
    diffusers.StableDiffusionInpaintPipeline(
        vae=_vae(torch, diffusers, 0.18215), text_encoder=_clip(torch, transformers, vocab),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok")),
        unet=_scale_unet(torch, unet, 4.0),
        scheduler=diffusers.PNDMScheduler(**SCHEDULER, skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def save_fp16_variant(source: Path, folder: Path, pipeline_class: str) -> Path:
    """`source` re-saved with fp16 weights as the "fp16" variant only (`*.fp16.safetensors`), as hub
    repositories ship them next to (here: instead of) the fp32 files."""
    import diffusers
    import torch

    pipe = getattr(diffusers, pipeline_class).from_pretrained(source).to(torch.float16)
    pipe.save_pretrained(folder, variant="fp16")
    return folder
