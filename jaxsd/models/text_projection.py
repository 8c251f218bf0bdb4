"""The hybrid's text projection: T5 hidden states → the UNet's cross-attention width.

SD1.5 + T5-XXL: the UNet cross-attends to 768-wide states, T5-XXL emits
4096-wide ones; one linear layer maps between them and is trained with the UNet.

It is a component of its own, stored like any diffusers component so a
pipeline folder can carry it next to `unet/` and `text_encoder/`:

  text_projection/
    config.json                              {"_class_name": "TextProjection",
                                              "in_features": 4096, "out_features": 768,
                                              "bias": true}
    diffusion_pytorch_model.safetensors      linear.weight [out, in], linear.bias [out]

The tensors are a PyTorch `nn.Linear` named `linear` (weight is [out, in]), so
`torch.nn.Linear(in, out).load_state_dict({k[7:]: v ...})` or any module with a
`linear` attribute loads it. See docs/text_encoders.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.models.layers import Dense

CLASS_NAME = "TextProjection"


@dataclass(frozen=True)
class TextProjectionConfig:
    in_features: int = 4096
    out_features: int = 768
    bias: bool = True

    @classmethod
    def from_dict(cls, config: Mapping) -> TextProjectionConfig:
        if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise InputError(f"config.json describes a {config['_class_name']!r}, not a {CLASS_NAME}")
        missing = [k for k in ("in_features", "out_features") if k not in config]
        if missing:
            raise InputError(f"{CLASS_NAME} config.json lacks {', '.join(missing)}")
        return cls(int(config["in_features"]), int(config["out_features"]), bool(config.get("bias", True)))

    def to_dict(self) -> dict:
        return {"_class_name": CLASS_NAME, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias}


class TextProjection(nn.Module):
    """x [B, L, in_features] -> [B, L, out_features]."""

    config: TextProjectionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.config.in_features:
            raise ValueError(f"TextProjection expects {self.config.in_features}-wide states, got {x.shape[-1]}")
        return Dense(self.config.out_features, use_bias=self.config.bias, axes=("mlp", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="linear")(x)


def example_inputs(config: TextProjectionConfig) -> tuple[jax.Array]:
    return (jnp.zeros((1, 1, config.in_features), jnp.float32),)
