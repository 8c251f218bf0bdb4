"""CLIP text encoders in Flax, equal to transformers' `CLIPTextModel` and
`CLIPTextModelWithProjection`.

SD 1.x conditions on CLIP ViT-L (`quick_gelu`), SD 2.x on OpenCLIP ViT-H
(`gelu`, 23 of its 24 layers kept in the checkpoint), SDXL on both CLIP ViT-L
and OpenCLIP ViT-bigG with its `text_projection`.

Param names mirror transformers' state dict under the `text_model.` prefix
(`text_model/encoder/layers_3/self_attn/q_proj/kernel` ⇔
`text_model.encoder.layers.3.self_attn.q_proj.weight`), so conversion is the
generic rules of `jaxsd.convert.rules`.

Forward (pre-LN transformer, causal self-attention):
  h_0 = token_embedding(ids) + position_embedding(0..L-1)
  h_i = h_{i-1} + attn(LN1(h_{i-1})); h_i += mlp(LN2(h_i))
  last_hidden_state = final_layer_norm(h_N)
  pooled = last_hidden_state at the EOS position (see `eos_positions`)
  text_embeds = pooled @ text_projection              (with projection only)
`hidden_states` is (h_0, ..., h_N) — h_N is *before* the final norm, as in
transformers; clip-skip and SDXL's penultimate layer index into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxsd.models.attention import attention
from jaxsd.models.layers import Dense, Embed, LayerNorm, activation


@dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' `CLIPTextConfig` that define the computation.

    `with_projection` is the architecture (CLIPTextModelWithProjection), not a
    transformers config field; `extra` keeps every other key of the source
    config.json so a saved folder carries it unchanged.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    with_projection: bool = False
    extra: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_transformers(cls, config: Mapping) -> CLIPTextConfig:
        """From a transformers `config.json` dict (a CLIPTextConfig, or a full CLIPConfig's `text_config`)."""
        config = dict(config.get("text_config", config)) if config.get("model_type") == "clip" else dict(config)
        names = {f.name for f in dataclasses.fields(cls)} - {"with_projection", "extra"}
        known = {k: config[k] for k in names if k in config}
        activation(known.get("hidden_act", cls.hidden_act))  # unknown activation: fail now, naming it
        arch = config.get("architectures") or []
        extra = tuple(sorted((k, v) for k, v in config.items() if k not in names and not isinstance(v, (dict, list))))
        return cls(**known, with_projection="CLIPTextModelWithProjection" in arch, extra=extra)

    def to_transformers(self) -> dict:
        """A config.json dict that transformers' CLIPTextModel[WithProjection].from_pretrained accepts."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("with_projection", "extra")})
        out["model_type"] = "clip_text_model"
        out["architectures"] = ["CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"]
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@flax.struct.dataclass
class CLIPTextOutput:
    """last_hidden_state [B, L, D]; hidden_states: tuple of N+1 [B, L, D] (embeddings, then each
    layer, the last one before the final norm); pooled [B, D]; text_embeds [B, P] or None."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array
    text_embeds: jax.Array | None = None


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token whose state is pooled, per sequence, exactly as transformers picks it.

    Checkpoints whose config still says `eos_token_id == 2` (all original
    OpenAI/SD configs) use the legacy rule: the position of the largest id
    (the EOS token is the largest id in CLIP's vocabulary). Otherwise the first
    position equal to `eos_token_id` (pad may equal eos, so "first" matters).
    input_ids: [B, L] -> [B] int32.
    """
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; `causal` False for the vision tower (jaxsd.models.clip_vision), whose
    config has the same fields this reads (hidden_size, num_attention_heads, head_dim)."""

    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c = self.config
        b, n, _ = x.shape
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        q, k, v = (Dense(c.hidden_size, axes=("embed", "heads"), name=name, **kw)(x)
                   .reshape(b, n, c.num_attention_heads, c.head_dim) for name in ("q_proj", "k_proj", "v_proj"))
        o = attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.implementation)
        return Dense(c.hidden_size, axes=("heads", "embed"), name="out_proj", **kw)(o.reshape(b, n, -1))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = Dense(c.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(x)
        h = activation(c.hidden_act)(h)
        return Dense(c.hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = LayerNorm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(c, self.implementation, causal=self.causal, name="self_attn", **kw)(h, mask)
        h = LayerNorm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(c, name="mlp", **kw)(h)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        n = input_ids.shape[-1]
        if n > c.max_position_embeddings:
            raise ValueError(f"CLIP text input has {n} tokens; this model takes at most "
                             f"{c.max_position_embeddings} (tokenize with truncation)")
        tokens = Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding", **kw)(jnp.arange(n))
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    """The layer stack; returns every layer's output (N+1 states including the input);
    causal for text, not for the vision tower."""

    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        states = [h]
        for i in range(self.config.num_hidden_layers):
            h = CLIPEncoderLayer(self.config, self.implementation, self.dtype, self.param_dtype, self.causal,
                                 name=f"layers_{i}")(h, mask)
            states.append(h)
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """transformers' `text_model`: embeddings, encoder layers, final norm, EOS pooling."""

    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids)
        # Optional padding mask, combined with the causal mask inside attention. diffusers' SD
        # pipelines pass none (padding tokens are attended to, causally, as in training).
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        states = CLIPEncoder(c, self.implementation, name="encoder", **kw)(h, mask)
        last = LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(states[-1])
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, c.eos_token_id)]
        return CLIPTextOutput(last_hidden_state=last, hidden_states=states, pooled=pooled)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel. input_ids [B, L] int (L <= max_position_embeddings),
    attention_mask [B, L] optional (1 = token, 0 = padding) -> `CLIPTextOutput` (text_embeds None)."""

    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        out = CLIPTextTransformer(self.config, self.implementation, self.dtype, self.param_dtype,
                                  name="text_model")(input_ids, attention_mask)
        if not self.config.with_projection:
            return out
        # Linear without bias, [hidden, projection_dim] (OpenCLIP / SDXL encoder 2).
        embeds = Dense(self.config.projection_dim, use_bias=False, axes=("embed", None), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="text_projection")(out.pooled)
        return out.replace(text_embeds=embeds)


def CLIPTextModelWithProjection(config: CLIPTextConfig, **kwargs) -> CLIPTextModel:
    """transformers' CLIPTextModelWithProjection: CLIPTextModel plus `text_projection`; output
    `text_embeds` [B, projection_dim] = pooled @ text_projection."""
    return CLIPTextModel(dataclasses.replace(config, with_projection=True), **kwargs)


def example_inputs(config: CLIPTextConfig, batch: int = 1) -> tuple[jax.Array]:
    """Inputs for `jax.eval_shape` / init: one max-length row of ids."""
    return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)
