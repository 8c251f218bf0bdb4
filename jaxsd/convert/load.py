"""Load and save a model component folder as Flax params — the glue between
`folder` (files), `rules` (names/layouts) and a model's abstract param tree."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import flax.linen as nn

from jaxsd.convert.folder import open_weights, read_config, save_weights, write_config
from jaxsd.convert.rules import ConversionSpec, check_tied, flax_to_torch, torch_to_flax
from jaxsd.models.params import abstract_params


def load_params(
    folder: str | os.PathLike,
    module: nn.Module,
    example_inputs: tuple,
    *,
    weights_name: str,
    spec: ConversionSpec = ConversionSpec(),
    dtype=None,
    variant: str | None = None,
    allow_pickle: bool = False,
    to_device: Callable | None = None,
) -> dict:
    """Read `folder`'s weights straight into `module`'s param tree (no random init).

    dtype: storage dtype of the loaded params (e.g. jnp.bfloat16); each tensor is
    cast on its own as it is read from the file, so no fp32 copy of the model exists.
    """
    abstract, _ = abstract_params(module, *example_inputs)
    state = open_weights(folder, weights_name, variant=variant, allow_pickle=allow_pickle)
    check_tied(state, spec, str(folder))
    return torch_to_flax(state, abstract, dtype=dtype, spec=spec, to_device=to_device, source=str(folder))


def save_params(
    folder: str | os.PathLike,
    params: Mapping,
    config: Mapping,
    *,
    weights_name: str,
    spec: ConversionSpec = ConversionSpec(),
    dtype=None,
    variant: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json + safetensors that diffusers/transformers `from_pretrained` loads."""
    write_config(folder, config)
    save_weights(folder, flax_to_torch(params, spec=spec, dtype=dtype), weights_name,
                 variant=variant, max_shard_bytes=max_shard_bytes)


def load_config(folder: str | os.PathLike) -> dict:
    return read_config(Path(folder))


__all__ = ["load_params", "save_params", "load_config"]
