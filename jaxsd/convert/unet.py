"""Load / save a diffusers `unet/` folder as (UNetConfig, Flax params).

Files, variants, shards, pickle refusal and dtype-at-load come from
`jaxsd.convert.folder` / `rules` (as in `jaxsd.convert.load`); the UNet needs no exceptions to the generic naming rules
(its state dict has no buffers or tied weights).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping

from jaxsd.convert.folder import DIFFUSERS_WEIGHTS, open_weights
from jaxsd.convert.load import load_config, save_params
from jaxsd.convert.rules import ConversionSpec, check_fits, check_tied, torch_to_flax
from jaxsd.errors import InputError
from jaxsd.models.params import abstract_params
from jaxsd.models.unet import UNet2DConditionModel, UNetConfig, example_inputs

UNET_SPEC = ConversionSpec()


@functools.lru_cache(maxsize=8)
def unet_param_specs(config: UNetConfig) -> tuple[dict, dict]:
    """(the param tree of `config` as fp32 ShapeDtypeStructs, its logical PartitionSpecs), traced once per
    config: a full-size UNet takes seconds to trace, and a run's plan, load and save each need the tree."""
    return abstract_params(UNet2DConditionModel(config), *example_inputs(config))


def abstract_unet_params(config: UNetConfig) -> dict:
    """The param tree of `config` as fp32 ShapeDtypeStructs."""
    return unet_param_specs(config)[0]


def read_unet_config(folder: str | os.PathLike) -> UNetConfig:
    """`folder/config.json` as a UNetConfig (what `load_unet` reads, without the weights)."""
    try:
        return UNetConfig.from_diffusers(load_config(folder))
    except InputError as e:
        raise InputError(f"{folder}/config.json: {e}") from None


def load_unet(
    folder: str | os.PathLike,
    *,
    dtype=None,
    variant: str | None = None,
    allow_pickle: bool = False,
    to_device: Callable | None = None,
) -> tuple[UNetConfig, dict]:
    """Read `folder/config.json` and its weights straight into Flax params (no random init).

    dtype: storage dtype of the params (None: fp32); each tensor is cast on its own.
    variant: e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
    """
    config = read_unet_config(folder)
    # load.load_params minus the tracing, which abstract_unet_params caches
    state = open_weights(folder, DIFFUSERS_WEIGHTS, variant=variant, allow_pickle=allow_pickle)
    check_tied(state, UNET_SPEC, str(folder))
    params = torch_to_flax(state, abstract_unet_params(config), dtype=dtype, spec=UNET_SPEC, to_device=to_device,
                           source=str(folder))
    return config, params


def save_unet(
    folder: str | os.PathLike,
    config: UNetConfig,
    params: Mapping,
    *,
    dtype=None,
    variant: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json + diffusion_pytorch_model[.variant].safetensors for diffusers' `from_pretrained`.

    The params are checked against the config's shapes first, so a mismatched pair is
    refused instead of writing a folder diffusers cannot load.
    """
    check_fits(abstract_unet_params(config), params, "UNet")
    save_params(folder, params, config.to_diffusers(), weights_name=DIFFUSERS_WEIGHTS, spec=UNET_SPEC,
                dtype=dtype, variant=variant, max_shard_bytes=max_shard_bytes)


__all__ = ["UNET_SPEC", "load_unet", "save_unet"]
