"""Load and save text-encoder folders (transformers layout) and the hybrid's text projection.

Everything goes through `jaxsd.convert.load` + `rules` — the same mechanism as
the UNet/VAE; only the per-model exceptions live here:

CLIP  `text_model.embeddings.position_ids` is a buffer (old checkpoints carry
      it) and is ignored. transformers 5 saves CLIPTextModel without the
      `text_model.` prefix; such keys are renamed on load. We always save with
      the prefix, which transformers 4 and 5 both load without missing or
      unexpected keys.
T5    `encoder.embed_tokens.weight` is tied to `shared.weight`: on load it is
      checked equal and dropped (a folder with only one of the two loads too);
      on save both are written, as classic checkpoints have them.

`dtype` is the storage dtype of the loaded params: each tensor is cast on its
own as it is read from the file, so T5-XXL loads in bf16 (≈9.5 GB) without an
fp32 copy. `to_device(path, np_array)` places each tensor (e.g. a sharded
`jax.device_put` from the logical specs of `jaxsd.models.params.abstract_params`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from jaxsd.convert.folder import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, open_weights, read_config
from jaxsd.convert.load import load_params, save_params
from jaxsd.convert.rules import ConversionSpec, torch_to_flax
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel
from jaxsd.models.clip import example_inputs as clip_inputs
from jaxsd.models.params import abstract_params
from jaxsd.models.t5 import T5Config, T5EncoderModel
from jaxsd.models.t5 import example_inputs as t5_inputs
from jaxsd.models.text_projection import TextProjection, TextProjectionConfig
from jaxsd.models.text_projection import example_inputs as projection_inputs

CLIP_SPEC = ConversionSpec(
    rename=((r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),),
    ignore=(r"text_model\.embeddings\.position_ids",),
)
T5_SPEC = ConversionSpec(tied={"encoder.embed_tokens.weight": "shared.weight"})
PROJECTION_SPEC = ConversionSpec()


def clip_config(folder: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False,
                with_projection: bool | None = None) -> CLIPTextConfig:
    """The config of a transformers CLIPTextModel[WithProjection] folder (no weights are read, except the
    safetensors header when config.json names no architecture).

    with_projection: None reads the architecture from config.json (and, when it
    names none, from whether the weights hold `text_projection.weight`).
    """
    raw = read_config(folder)
    config = CLIPTextConfig.from_transformers(raw)
    if with_projection is None and not raw.get("architectures"):
        state = open_weights(folder, TRANSFORMERS_WEIGHTS, variant=variant, allow_pickle=allow_pickle)
        with_projection = "text_projection.weight" in state
    if with_projection is not None and with_projection != config.with_projection:
        config = dataclasses.replace(config, with_projection=with_projection)
    return config


def load_clip(folder: str | os.PathLike, *, dtype=None, variant: str | None = None, allow_pickle: bool = False,
              with_projection: bool | None = None, to_device: Callable | None = None) -> tuple[CLIPTextConfig, dict]:
    """A transformers CLIPTextModel[WithProjection] folder -> (config, Flax params); `with_projection`
    as `clip_config`."""
    config = clip_config(folder, variant=variant, allow_pickle=allow_pickle, with_projection=with_projection)
    params = load_params(folder, CLIPTextModel(config), clip_inputs(config), weights_name=TRANSFORMERS_WEIGHTS,
                         spec=CLIP_SPEC, dtype=dtype, variant=variant, allow_pickle=allow_pickle, to_device=to_device)
    return config, params


def save_clip(folder: str | os.PathLike, config: CLIPTextConfig, params: Mapping, *, dtype=None,
              variant: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Write config.json + model.safetensors that transformers' from_pretrained loads with no key warnings."""
    save_params(folder, params, config.to_transformers(), weights_name=TRANSFORMERS_WEIGHTS, spec=CLIP_SPEC,
                dtype=dtype, variant=variant, max_shard_bytes=max_shard_bytes)


class _UntieEmbeddings(Mapping[str, np.ndarray]):
    """A checkpoint holding only `encoder.embed_tokens.weight` (no `shared.weight`) seen as one with both."""

    def __init__(self, state: Mapping[str, np.ndarray]):
        self._state = state

    def __getitem__(self, key: str) -> np.ndarray:
        return self._state["encoder.embed_tokens.weight" if key == "shared.weight" else key]

    def __iter__(self) -> Iterator[str]:
        yield "shared.weight"
        yield from (k for k in self._state if k != "encoder.embed_tokens.weight")

    def __len__(self) -> int:
        return len(self._state)


def load_t5(folder: str | os.PathLike, *, dtype=None, variant: str | None = None, allow_pickle: bool = False,
            to_device: Callable | None = None) -> tuple[T5Config, dict]:
    """A transformers T5EncoderModel folder (or a full T5 model's; decoder keys are then reported
    as unexpected) -> (config, Flax params). dtype=jnp.bfloat16 for T5-XXL."""
    config = T5Config.from_transformers(read_config(folder))
    state = open_weights(folder, TRANSFORMERS_WEIGHTS, variant=variant, allow_pickle=allow_pickle)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        params = _load_state(folder, _UntieEmbeddings(state), T5EncoderModel(config), t5_inputs(config), T5_SPEC, dtype, to_device)
    else:
        params = load_params(folder, T5EncoderModel(config), t5_inputs(config), weights_name=TRANSFORMERS_WEIGHTS,
                             spec=T5_SPEC, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                             to_device=to_device)
    return config, params


def save_t5(folder: str | os.PathLike, config: T5Config, params: Mapping, *, dtype=None,
            variant: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Write config.json + model.safetensors (with both `shared` and `encoder.embed_tokens`)."""
    save_params(folder, params, config.to_transformers(), weights_name=TRANSFORMERS_WEIGHTS, spec=T5_SPEC,
                dtype=dtype, variant=variant, max_shard_bytes=max_shard_bytes)


def load_text_projection(folder: str | os.PathLike, *, dtype=None,
                         to_device: Callable | None = None) -> tuple[TextProjectionConfig, dict]:
    """A `text_projection/` component folder (see jaxsd.models.text_projection) -> (config, params)."""
    config = TextProjectionConfig.from_dict(read_config(folder))
    params = load_params(folder, TextProjection(config), projection_inputs(config), weights_name=DIFFUSERS_WEIGHTS,
                         spec=PROJECTION_SPEC, dtype=dtype, to_device=to_device)
    return config, params


def save_text_projection(folder: str | os.PathLike, config: TextProjectionConfig, params: Mapping, *,
                         dtype=None) -> None:
    save_params(folder, params, config.to_dict(), weights_name=DIFFUSERS_WEIGHTS, spec=PROJECTION_SPEC, dtype=dtype)


def _load_state(folder, state, module, inputs, spec, dtype, to_device) -> dict:
    """load_params' second half, for a state mapping we had to adapt first."""
    abstract, _ = abstract_params(module, *inputs)
    return torch_to_flax(state, abstract, dtype=dtype, spec=spec, to_device=to_device, source=str(folder))


__all__ = [
    "CLIP_SPEC",
    "T5_SPEC",
    "clip_config",
    "load_clip",
    "load_t5",
    "load_text_projection",
    "save_clip",
    "save_t5",
    "save_text_projection",
]
