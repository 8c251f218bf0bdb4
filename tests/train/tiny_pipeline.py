"""A tiny diffusers pipeline folder written by jaxsd itself (no torch, no init to compile): random
weights drawn from the abstract param shapes for a one-level UNet (16 channels, 8x8 latents), a
2-layer 32-wide CLIP text encoder with its tokenizer, a VAE with downscale factor 2, a DDIM scheduler.

`model.pretrained` can point at it (the UNet is loaded, not initialised) and its VAE / text side serve
`jaxsd cache` and sample grids during training."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxsd.convert.unet import abstract_unet_params, save_unet
from jaxsd.models.unet import UNetConfig
from tests.data.test_cache_command import save_tiny_vae
from tests.data.test_cache_text import _save_tiny_clip
from tests.text.tiny import write_clip_tokenizer

UNET = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,),
                  down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1,
                  attention_head_dim=2, cross_attention_dim=32, norm_num_groups=4)
IMAGE_SIZE = 16  # pixels: the UNet's 8x8 latents × the VAE's factor 2
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def save_tiny_unet(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                          abstract_unet_params(UNET))
    save_unet(folder, UNET, params)
    return folder


def tiny_pipeline(folder: Path) -> Path:
    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer")
    _save_tiny_clip(folder / "text_encoder", 0, UNET.cross_attention_dim, False)
    save_tiny_vae(folder / "vae", 0)
    save_tiny_unet(folder / "unet")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return folder
