"""Component configs of a single file read from its tensors' shapes, for the standard families.

Shapes give the architecture (channels, blocks, layers, attention depth and width, linear or conv
projections, SDXL's embedding sizes); a few numbers are conventions of the released models that no
shape records, and are taken per family:

  heads           SD1: 8 per attention; SD2, SDXL and OpenCLIP: 64-wide heads; CLIP-L: 64-wide heads
  norm groups     32 (fewer only when a model has fewer channels)
  upcast_attention, prediction type   SD2: the 768-v model's (True, v_prediction); else False, epsilon
  VAE scaling     SDXL 0.13025, else 0.18215
  sample sizes    SD1 64, SD2 96, SDXL 128 latents

Every assumption is returned with the config so the command can print it; `--config` (a pipeline
folder of the same family) replaces all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from jaxsd.errors import InputError

Shapes = Mapping[str, tuple[int, ...]]
SAMPLE_SIZE = {"sd1": 64, "sd2": 96, "sdxl": 128}
SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def _groups(channels: list[int]) -> int:
    """GroupNorm groups: 32 in every released model (no shape records it); fewer when the channels are too few."""
    return math.gcd(32, *channels)


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def unet_config(shapes: Shapes, family: str, pooled_dim: int | None) -> tuple[dict, list[str]]:
    """diffusers UNet2DConditionModel config from LDM UNet shapes (keys without the prefix)."""
    n_in = len(_indices(shapes, r"input_blocks\.(\d+)\.")) - 1  # without conv_in's block 0
    downs = _indices(shapes, r"input_blocks\.(\d+)\.0\.op\.")
    levels = len(downs) + 1
    layers = downs[0] - 1 if downs else n_in  # a level: `layers` resnets, then its downsampler's slot
    if layers < 1 or n_in != levels * (layers + 1) - 1:
        raise InputError(f"the UNet's {n_in + 1} input blocks do not form {levels} levels of equal depth")
    channels, depth, down_types = [], [], []
    for b in range(levels):
        first = 1 + b * (layers + 1)
        channels.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        n_blocks = _indices(shapes, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        depth.append(len(n_blocks))
        down_types.append("CrossAttnDownBlock2D" if n_blocks else "DownBlock2D")
    up_types = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(down_types)]
    attn = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    proj = [k for k in shapes if k.endswith(".proj_in.weight")]
    if not attn or not proj:
        raise InputError("the UNet has no cross-attention: not an SD1/SD2/SDXL UNet")
    head_dim = 64
    heads = 8 if family == "sd1" else [max(c // head_dim, 1) for c in channels]
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": SAMPLE_SIZE[family],
        "in_channels": shapes["input_blocks.0.0.weight"][1], "out_channels": shapes["out.2.weight"][0],
        "down_block_types": down_types, "up_block_types": up_types, "block_out_channels": channels,
        "layers_per_block": layers, "cross_attention_dim": shapes[attn[0]][1],
        "attention_head_dim": heads, "use_linear_projection": len(shapes[proj[0]]) == 2,
        "transformer_layers_per_block": [max(d, 1) for d in depth],
        "upcast_attention": family == "sd2", "norm_num_groups": _groups(channels),
    }
    assumed = [f"attention heads {'8' if family == 'sd1' else '64 wide'} ({family} convention)"]
    if family == "sd2":
        assumed.append("upcast_attention=True (the SD2.1 768-v model)")
    if "label_emb.0.0.weight" in shapes:
        total = shapes["label_emb.0.0.weight"][1]
        if pooled_dim is None or (total - pooled_dim) % 6:
            raise InputError(f"the UNet's SDXL embedding takes {total} inputs; without the second text encoder's "
                             "projection width the time-id embedding size is unknown: give --config")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(total - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=total)
    return config, assumed


def vae_config(shapes: Shapes, family: str) -> tuple[dict, list[str]]:
    """diffusers AutoencoderKL config from LDM VAE shapes (keys without the prefix)."""
    blocks = _indices(shapes, r"encoder\.down\.(\d+)\.")
    if not blocks:
        raise InputError("the VAE has no encoder.down.* blocks")
    layers = len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [shapes[f"encoder.down.{b}.block.0.conv2.weight"][0] for b in blocks]
    config = {
        "_class_name": "AutoencoderKL", "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0], "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels), "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": layers, "latent_channels": shapes["decoder.conv_in.weight"][1],
        "sample_size": SAMPLE_SIZE[family] * 2 ** (len(channels) - 1), "scaling_factor": SCALING[family],
        "norm_num_groups": _groups(channels),
    }
    return config, [f"VAE scaling factor {SCALING[family]} ({family} convention)"]


def text_config(shapes: Shapes, layout: str, family: str, with_projection: bool) -> tuple[dict, list[str]]:
    """transformers CLIPTextModel[WithProjection] config from CLIP-L (`clip`) or OpenCLIP shapes."""
    if layout == "clip":
        emb = shapes["transformer.text_model.embeddings.token_embedding.weight"]
        pos = shapes["transformer.text_model.embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, r"transformer\.text_model\.encoder\.layers\.(\d+)\."))
        inter = shapes["transformer.text_model.encoder.layers.0.mlp.fc1.weight"][0]
        act = "quick_gelu"
    else:
        emb = shapes["token_embedding.weight"]
        pos = shapes["positional_embedding"][0]
        layers = len(_indices(shapes, r"transformer\.resblocks\.(\d+)\."))
        inter = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        act = "gelu"
        if family == "sd2":
            layers -= 1  # SD2 conditions on the penultimate layer: diffusers' config drops the last
    hidden = emb[1]
    projection = shapes["text_projection"][1] if with_projection else hidden
    config = {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": emb[0], "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 1), "max_position_embeddings": pos,
        "hidden_act": act, "projection_dim": projection, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    return config, [f"{layout} text encoder: 64-wide heads, pooled at the highest token id ({family} convention)"]


def scheduler_config(family: str) -> dict:
    """The scheduler config the released checkpoints of `family` ship with (our copy; numbers only)."""
    classes = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}
    config = {"_class_name": classes[family],
              "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
              "prediction_type": "v_prediction" if family == "sd2" else "epsilon"}
    if family != "sdxl":
        config.update(set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
    return config


__all__ = ["scheduler_config", "text_config", "unet_config", "vae_config"]
