"""Tiny LoRA test material shared by the model, file and pipeline tests (no torch needed)."""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from jaxsd.convert.lora import LoraLayer, LoraModel, LoraWeights
from jaxsd.models.clip import CLIPTextConfig
from jaxsd.models.lora import plan_adapters
from jaxsd.models.unet import UNetConfig

# the UNet of tests/pipelines/tiny.py's SD1 pipeline
TINY_SD = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=4, norm_num_groups=8)
# the UNet of tests/pipelines/tiny.py's SDXL pipeline
TINY_SDXL = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=96,
                       attention_head_dim=(2, 4), norm_num_groups=8, transformer_layers_per_block=(1, 2),
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=80)
CLIP = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CLIP2 = CLIPTextConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, hidden_act="gelu", projection_dim=32, with_projection=True)

# what the LoRA tests adapt: attn_ff (rank 4, alpha 8) + LoCon (rank 2, alpha 1) on the UNet,
# rank 4 alpha 2 on the text encoders — rank != alpha everywhere
UNET_LORA = {"targets": "attn_ff", "rank": 4, "alpha": 8, "conv_rank": 2, "conv_alpha": 1}
TEXT_LORA = {"targets": "text_encoder", "rank": 4, "alpha": 2}


def lora_plans(model: LoraModel) -> dict:
    """{component: plan} of UNET_LORA / TEXT_LORA over the model's adaptable layers."""
    plans = {}
    for component, table in model.tables.items():
        tree = traverse_util.unflatten_dict({p + ("kernel",): np.zeros(s, np.int8) for p, s in table.layers.items()})
        spec = UNET_LORA if component == "unet" else TEXT_LORA
        plans[component] = plan_adapters(tree, spec["targets"], spec["rank"], spec["alpha"],
                                         conv_rank=spec.get("conv_rank", 0), conv_alpha=spec.get("conv_alpha", 0))
    return plans


def random_lora(model: LoraModel, dtype=np.float32, seed=0, up_scale: float = 0.3) -> LoraWeights:
    """UNET_LORA + TEXT_LORA with random down (as PEFT's scale: N(0, 1/fan_in)) and random, non-zero up.

    up_scale 0.3 changes the tiny UNet's output by ~100 % — far beyond any tolerance — while keeping
    attention logits moderate: at 1.0 they grow so large that fp32 rounding in the softmax alone
    moves the output by 1e-3 in any two implementations."""
    rng = np.random.default_rng(seed)
    layers = {}
    for component, plan in lora_plans(model).items():
        layers[component] = {}
        for p, s in plan.items():
            down = rng.standard_normal(s.down_shape()) / np.sqrt(np.prod(s.kernel_shape[:-1]))
            up = up_scale * rng.standard_normal(s.up_shape())
            layers[component][p] = LoraLayer(down.astype(dtype), up.astype(dtype), s.alpha)
    return LoraWeights(layers)
