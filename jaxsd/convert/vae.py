"""Load / save a diffusers `vae/` folder as (VAEConfig, Flax params).

Files, variants, shards, pickle refusal and dtype-at-load come from
`jaxsd.convert.load`. The one exception to the generic naming rules is the
mid-block attention of checkpoints saved before diffusers 0.14: `query`, `key`,
`value`, `proj_attn` instead of `to_q`, `to_k`, `to_v`, `to_out.0` — renamed on
load exactly as diffusers' `_fix_state_dict_keys_on_load` does. Their 1×1-conv
shaped weights ([C, C, 1, 1]) load into the linear kernels through the generic
rules. Saving always writes the current names and linear shapes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from jaxsd.convert.folder import DIFFUSERS_WEIGHTS
from jaxsd.convert.load import load_config, load_params, save_params
from jaxsd.convert.rules import ConversionSpec, check_fits
from jaxsd.errors import InputError
from jaxsd.models.params import abstract_params
from jaxsd.models.vae import AutoencoderKL, VAEConfig, example_inputs

_ATTN = r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)"
VAE_SPEC = ConversionSpec(rename=(
    (_ATTN + r"\.query\.(weight|bias)$", r"\1.to_q.\2"),
    (_ATTN + r"\.key\.(weight|bias)$", r"\1.to_k.\2"),
    (_ATTN + r"\.value\.(weight|bias)$", r"\1.to_v.\2"),
    (_ATTN + r"\.proj_attn\.(weight|bias)$", r"\1.to_out.0.\2"),
))


def read_vae_config(folder: str | os.PathLike) -> VAEConfig:
    """`folder/config.json` as a VAEConfig (what `load_vae` reads, without the weights)."""
    try:
        return VAEConfig.from_diffusers(load_config(folder))
    except InputError as e:
        raise InputError(f"{folder}/config.json: {e}") from None


def load_vae(
    folder: str | os.PathLike,
    *,
    dtype=None,
    variant: str | None = None,
    allow_pickle: bool = False,
    to_device: Callable | None = None,
) -> tuple[VAEConfig, dict]:
    """Read `folder/config.json` and its weights straight into Flax params (no random init).

    dtype: storage dtype of the params (None: fp32); each tensor is cast on its own.
    variant: e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
    allow_pickle: opt in to loading a `.bin` checkpoint with `torch.load(weights_only=True)`.
    """
    config = read_vae_config(folder)
    params = load_params(folder, AutoencoderKL(config), example_inputs(config), weights_name=DIFFUSERS_WEIGHTS,
                         spec=VAE_SPEC, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                         to_device=to_device)
    return config, params


def check_params(config: VAEConfig, params: Mapping) -> None:
    """Refuse params whose tree or shapes do not match `config` (before anything is written)."""
    abstract, _ = abstract_params(AutoencoderKL(config), *example_inputs(config))
    check_fits(abstract, params, "VAE")


def save_vae(
    folder: str | os.PathLike,
    config: VAEConfig,
    params: Mapping,
    *,
    dtype=None,
    variant: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json + diffusion_pytorch_model[.variant].safetensors for `AutoencoderKL.from_pretrained`.

    dtype: cast every tensor on save (e.g. np.float16 with variant="fp16"); None keeps the params' dtype.
    """
    check_params(config, params)
    save_params(folder, params, config.to_diffusers(), weights_name=DIFFUSERS_WEIGHTS, spec=VAE_SPEC,
                dtype=dtype, variant=variant, max_shard_bytes=max_shard_bytes)


__all__ = ["VAE_SPEC", "check_params", "load_vae", "save_vae"]
