"""The hybrid's text projection trained with the UNet, on a cache of raw T5 states (`data.cache.text: t5`).

The seed recipe of the SD1.5 + T5-XXL hybrid: a frozen T5 whose hidden states are cached once, and a linear
`text_projection` (jaxsd.models.text_projection) from its width to the UNet's cross-attention width, trained
with the UNet. The projection starts from the `text_projection/` component of `data.cache.text_encoder` (the
pipeline folder the cache was made with; a pipeline folder without one is refused by name) and is part of
the trainable tree, `{"unet": ..., "text_projection": {"linear": {"kernel", "bias"}}}`: updated by the one
optimizer at optimizer.learning_rate, checkpointed, EMA'd, and written by `jaxsd export` as the pipeline's
`text_projection/`. The frozen tree stays the UNet's alone.

The step's conditioning projects the cached states; a sample dropped by `loss.cond_dropout` is projected
from the empty caption's cached T5 states. (With `data.cache.text: t5_projected` the cache holds projected
states and nothing of the text side trains; with a token cache the projection is part of the text side,
`jaxsd.train.text`, and trains with `train.text_encoder: full`.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.config import Config
from jaxsd.errors import ConfigError
from jaxsd.models.params import abstract_params
from jaxsd.models.text_projection import TextProjection, TextProjectionConfig
from jaxsd.models.text_projection import example_inputs as projection_inputs
from jaxsd.text.encode import PROJECTION_NAME


@dataclasses.dataclass(frozen=True)
class StepProjection:
    """The trained projection of a raw-T5 cache run, before any weight is read (shapes: abstract params,
    logical: their logical PartitionSpecs)."""

    folder: Path
    module: TextProjection
    shapes: Any
    logical: Any

    @property
    def config(self) -> TextProjectionConfig:
        return self.module.config


def step_projection(cfg: Config, context_dim: int) -> StepProjection | None:
    """The projection `cfg`'s step trains: only for a cache of raw T5 states (`data.cache.text: t5`)."""
    if cfg.train.data_source != "cache" or cfg.data.cache.text != "t5":
        return None
    from jaxsd.convert.folder import read_config
    from jaxsd.data.model_encoders import text_root

    folder = text_root(cfg.data) / PROJECTION_NAME
    if not (folder / "config.json").is_file():
        raise ConfigError(f"data.cache.text: t5 caches raw T5 states, and the UNet (cross_attention_dim "
                          f"{context_dim}) is conditioned on them through the hybrid's trained text projection, "
                          f"which starts from {folder}: there is none. Use the hybrid pipeline folder (with "
                          "text_projection/) as data.cache.text_encoder")
    config = TextProjectionConfig.from_dict(read_config(folder))
    if config.out_features != context_dim:
        raise ConfigError(f"{folder}: the projection gives {config.out_features}-wide states, the UNet has "
                          f"cross_attention_dim={context_dim}; use the pipeline folder of this UNet")
    if cfg.lora.enabled:
        raise ConfigError("data.cache.text: t5 trains the hybrid's text projection in full beside the UNet; with "
                          "lora.rank > 0 the projection would be lost by a LoRA export: train the hybrid without "
                          "LoRA, or cache the projected states (data.cache.text: t5_projected)")
    if cfg.logging.sample_every:
        raise ConfigError("logging.sample_every: sample grids of a run that trains the text projection (data.cache."
                          "text: t5) are not built yet; set logging.sample_every=0, and sample the exported pipeline "
                          "with `jaxsd sample`")
    module = TextProjection(config, dtype=jnp.dtype(cfg.model.dtype), param_dtype=jnp.dtype(cfg.model.param_dtype))
    shapes, logical = abstract_params(module, *projection_inputs(config))
    return StepProjection(folder, module, shapes, logical)


def load_projection(proj: StepProjection, dtype: Any, shardings: Any) -> Any:
    """The projection's initial params (its folder's), in `dtype`, placed with `shardings`."""
    from jaxsd.convert.text_encoders import load_text_projection

    _, params = load_text_projection(proj.folder, dtype=dtype)
    return jax.device_put(params, shardings)


def projected_conditioning(proj: StepProjection, empty: Mapping[str, np.ndarray] | None) -> Callable:
    """The step's batch → conditioning function (`make_train_step(encode_text=...)`):
    `encode(trainable, frozen, batch, drop [B], model_draws=None)` returns the batch with its cached T5 states
    [B, L, in] projected to "encoder_hidden_states" [B, L, out]; rows where `drop` is True project the empty
    caption's cached states (empty: {"encoder_hidden_states": [L, in]}, needed when loss.cond_dropout > 0)."""
    empty_states = None if empty is None else jnp.asarray(empty["encoder_hidden_states"])

    def encode(trainable: Any, frozen: Any, batch: Mapping[str, jax.Array], drop: jax.Array,
               model_draws: Any = None) -> dict[str, jax.Array]:
        states = batch["encoder_hidden_states"]
        if empty_states is not None:
            states = jnp.where(drop[:, None, None], empty_states[None].astype(states.dtype), states)
        projected = proj.module.apply({"params": trainable[PROJECTION_NAME]}, states)
        return {**batch, "encoder_hidden_states": projected}

    return encode


__all__ = ["StepProjection", "load_projection", "projected_conditioning", "step_projection"]
