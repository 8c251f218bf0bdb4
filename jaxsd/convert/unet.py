"""Load / save a diffusers `unet/` folder as (UNetConfig, Flax params).

Files, variants, shards, pickle refusal and dtype-at-load come from
`jaxsd.convert.load`; the UNet needs no exceptions to the generic naming rules
(its state dict has no buffers or tied weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from flax import traverse_util

from jaxsd.convert.folder import DIFFUSERS_WEIGHTS
from jaxsd.convert.load import load_config, load_params, save_params
from jaxsd.convert.rules import ConversionError, ConversionSpec
from jaxsd.models.params import abstract_params
from jaxsd.models.unet import UNet2DConditionModel, UNetConfig, example_inputs

UNET_SPEC = ConversionSpec()


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
    try:
        config = UNetConfig.from_diffusers(load_config(folder))
    except ValueError as e:
        raise ValueError(f"{folder}/config.json: {e}") from None
    params = load_params(folder, UNet2DConditionModel(config), example_inputs(config),
                         weights_name=DIFFUSERS_WEIGHTS, spec=UNET_SPEC, dtype=dtype, variant=variant,
                         allow_pickle=allow_pickle, to_device=to_device)
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
    abstract, _ = abstract_params(UNet2DConditionModel(config), *example_inputs(config))
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
    have = {k: tuple(getattr(v, "shape", ())) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    if want != have:
        missing = sorted("/".join(k) for k in want.keys() - have.keys())
        unexpected = sorted("/".join(k) for k in have.keys() - want.keys())
        shapes = sorted(f"{'/'.join(k)}: {have[k]} vs config {want[k]}" for k in want.keys() & have.keys()
                        if want[k] != have[k])
        raise ConversionError(f"UNet params do not match the config: missing {missing[:20]}, "
                              f"unexpected {unexpected[:20]}, shape mismatches {shapes[:20]}")
    save_params(folder, params, config.to_diffusers(), weights_name=DIFFUSERS_WEIGHTS, spec=UNET_SPEC,
                dtype=dtype, variant=variant, max_shard_bytes=max_shard_bytes)


__all__ = ["load_unet", "save_unet", "UNET_SPEC"]
