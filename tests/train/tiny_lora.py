"""Random LoRA files for the tiny pipelines of tests/train/tiny_pipeline.py: what `lora.init_from` continues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import traverse_util

from jaxsd.convert.load import load_config
from jaxsd.convert.lora import LoraLayer, LoraModel, LoraWeights, write_lora
from jaxsd.convert.unet import abstract_unet_params
from jaxsd.models.clip import CLIPTextConfig
from jaxsd.models.lora import AdapterSpec, plan_adapters
from jaxsd.models.unet import UNetConfig


def random_lora_file(path: Path, pipe: Path, unet: dict, *, text: dict | None = None, layout: str = "kohya",
                     skip_convs: bool = False, seed: int = 1) -> Path:
    """A LoRA file with random down/up (std 0.3: the adapters change the outputs) on the layers of `pipe`'s
    UNet that `unet` ({targets, rank, alpha[, conv_rank, conv_alpha]}, as `lora:`) selects, and with `text`
    ({rank, alpha}) on its text encoder's `lora.text_encoder` layers. skip_convs: without the UNet's 4-D ones."""
    rng = np.random.default_rng(seed)

    def layers(plan: dict[tuple, AdapterSpec]) -> dict[tuple, LoraLayer]:
        return {m: LoraLayer((0.3 * rng.standard_normal(s.down_shape())).astype(np.float32),
                             (0.3 * rng.standard_normal(s.up_shape())).astype(np.float32), s.alpha)
                for m, s in plan.items() if not (skip_convs and s.is_conv)}

    unet_config = UNetConfig.from_diffusers(load_config(pipe / "unet"))
    texts = {} if text is None else {"text_encoder": CLIPTextConfig.from_transformers(load_config(pipe / "text_encoder"))}
    model = LoraModel("sd1", unet_config, texts)
    weights = {"unet": layers(plan_adapters(abstract_unet_params(unet_config), **unet))}
    if text is not None:
        kernels = {p + ("kernel",): np.zeros(s, np.int8) for p, s in model.tables["text_encoder"].layers.items()}
        weights["text_encoder"] = layers(plan_adapters(traverse_util.unflatten_dict(kernels), "text_encoder", **text))
    write_lora(path, LoraWeights(weights), model, layout=layout)
    return path
