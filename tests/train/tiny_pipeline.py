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


def tiny_pipeline(folder: Path, *, text_sensitive: bool = False) -> Path:
    """text_sensitive: the UNet of `save_text_sensitive_unet` (images that show what the text encoder gives)."""
    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer")
    _save_tiny_clip(folder / "text_encoder", 0, UNET.cross_attention_dim, False)
    return _save_image_side(folder, save_text_sensitive_unet if text_sensitive else save_tiny_unet, MODEL_INDEX)


def _save_image_side(folder: Path, save_unet_fn, index: dict) -> Path:
    """VAE, UNet (written by `save_unet_fn`), scheduler and model_index.json of a tiny pipeline."""
    save_tiny_vae(folder / "vae", 0)
    save_unet_fn(folder / "unet")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_text_sensitive_unet(folder: Path, seed: int = 0) -> Path:
    """`UNET` with weights whose images depend on the text: attention kernels 0.5, output conv 1.0 and
    unit norm scales (with `save_tiny_unet`'s 0.1 everywhere a prompt moves pixels by < 1 level)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "norm" in name and "scale" in name:
            return (1.0 + 0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
        std = 0.5 if "attentions_0" in name and "kernel" in name else 1.0 if "conv_out" in name else 0.1
        return (std * rng.standard_normal(shape.shape)).astype(np.float32)

    save_unet(folder, UNET, jax.tree_util.tree_map_with_path(draw, abstract_unet_params(UNET)))
    return folder


HYBRID_INDEX = {**MODEL_INDEX, "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5Tokenizer"], "text_projection": ["jaxsd", "TextProjection"]}
HYBRID_COMPONENTS = COMPONENTS + ("text_projection",)


def tiny_hybrid_pipeline(folder: Path, *, tokenizer_length: int = 16) -> Path:
    """The SD + T5 hybrid, torch-free: the UNet/VAE/scheduler of `tiny_pipeline`, a 2-layer 16-wide T5 with a
    sentencepiece tokenizer recording `tokenizer_length` tokens, and a `text_projection/` (16 → 32)."""
    from jaxsd.convert.text_encoders import save_t5, save_text_projection
    from jaxsd.models.params import abstract_params
    from jaxsd.models.t5 import T5Config, T5EncoderModel
    from jaxsd.models.t5 import example_inputs as t5_inputs
    from jaxsd.models.text_projection import TextProjection, TextProjectionConfig
    from jaxsd.models.text_projection import example_inputs as projection_inputs
    from tests.text.tiny import write_t5_tokenizer

    folder = Path(folder)
    rng = np.random.default_rng(3)

    def random(module, inputs, scale):
        shapes, _ = abstract_params(module, *inputs)
        return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)

    write_t5_tokenizer(folder / "tokenizer", max_length=tokenizer_length)
    t5 = T5Config(vocab_size=160, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16)
    save_t5(folder / "text_encoder", t5, random(T5EncoderModel(t5), t5_inputs(t5), 0.3))
    proj = TextProjectionConfig(in_features=16, out_features=UNET.cross_attention_dim)
    save_text_projection(folder / "text_projection", proj, random(TextProjection(proj), projection_inputs(proj), 0.5))
    return _save_image_side(folder, save_text_sensitive_unet, HYBRID_INDEX)
