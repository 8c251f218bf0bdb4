"""The CLIP vision tower in Flax, equal to transformers' `CLIPVisionModelWithProjection` (the
`vision_model` + `visual_projection` half of a `CLIPModel`), used by the CLIP score.

Param names mirror transformers' state dict (`vision_model/encoder/layers_0/self_attn/q_proj/kernel` ⇔
`vision_model.encoder.layers.0.self_attn.q_proj.weight`), so conversion is the generic rules.

Forward (pre-LN ViT, bidirectional self-attention; the encoder layers are the text model's):
  patches = patch_embedding(pixels)            conv P×P, stride P, no bias -> [B, (S/P)², D]
  h_0 = [class_embedding; patches] + position_embedding(0..(S/P)²)
  h = pre_layrnorm(h_0)                        (transformers' spelling)
  h_N = encoder(h)                             N layers, no causal mask
  pooled = post_layernorm(h_N[:, 0])           the class token
  image_embeds = pooled @ visual_projection    (no bias)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.models.clip import CLIPEncoder
from jaxsd.models.layers import Conv, Dense, Embed, LayerNorm, activation


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' `CLIPVisionConfig` that define the computation, plus the
    `CLIPConfig`'s `projection_dim` (the width of `visual_projection`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_transformers(cls, config: Mapping) -> CLIPVisionConfig:
        """From a transformers `CLIPConfig` dict (its `vision_config`; `projection_dim` from the top level)."""
        if config.get("model_type") != "clip" or "vision_config" not in config:
            raise InputError(f"expected a transformers CLIPModel config.json (model_type 'clip' with a vision_config), "
                             f"got model_type {config.get('model_type')!r}")
        vision = dict(config["vision_config"])
        names = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        known = {k: vision[k] for k in names if k in vision}
        activation(known.get("hidden_act", cls.hidden_act))  # unknown activation: fail now, naming it
        return cls(**known, projection_dim=int(config.get("projection_dim", cls.projection_dim)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise InputError(f"CLIP vision input has shape {tuple(pixels.shape[1:])} (H, W, C); this model takes "
                             f"{(c.image_size, c.image_size, c.num_channels)} (preprocess the images first)")
        patches = Conv(c.hidden_size, kernel_size=c.patch_size, strides=c.patch_size, padding=0, use_bias=False,
                       name="patch_embedding", **kw)(pixels)
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)  # row-major, as torch's flatten(2)
        cls_token = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
                               (c.hidden_size,), self.param_dtype)
        cls_token = jnp.broadcast_to(cls_token.astype(self.dtype), (patches.shape[0], 1, c.hidden_size))
        positions = Embed(c.num_positions, c.hidden_size, name="position_embedding", **kw)(jnp.arange(c.num_positions))
        return jnp.concatenate([cls_token, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' `vision_model`: pixels [B, S, S, C] (preprocessed, NHWC) -> pooled [B, D]."""

    config: CLIPVisionConfig
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixels)
        h = LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(h)
        states = CLIPEncoder(c, self.implementation, causal=False, name="encoder", **kw)(h, None)
        return LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)(states[-1][:, 0])


class CLIPVisionModelWithProjection(nn.Module):
    """pixels [B, S, S, C] float (CLIP-normalised, NHWC) -> image_embeds [B, projection_dim], as
    transformers' `CLIPModel.get_image_features`."""

    config: CLIPVisionConfig
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        pooled = CLIPVisionTransformer(self.config, self.implementation, self.dtype, self.param_dtype,
                                       name="vision_model")(pixels)
        return Dense(self.config.projection_dim, use_bias=False, axes=("embed", None), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="visual_projection")(pooled)


def example_inputs(config: CLIPVisionConfig, batch: int = 1) -> tuple[jax.Array]:
    """Inputs for `jax.eval_shape` / init: one image of the model's size."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)
