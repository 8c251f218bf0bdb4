"""The autoencoder being trained (`model.kind: vae`): module from config, and its initial params.

Init order as for the UNet (jaxsd/train/model.py): resume (the loop) → `model.pretrained` — a diffusers
AutoencoderKL folder, a pipeline folder's vae/ or a single-file checkpoint's VAE — whose config.json
defines the architecture → from scratch: `model.vae` (diffusers config keys), random init from train.seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxsd.config import ModelConfig
from jaxsd.errors import ConfigError, InputError
from jaxsd.models.params import init_params
from jaxsd.models.vae import AutoencoderKL, VAEConfig, example_inputs
from jaxsd.train.compile import run_once


def vae_folder(pretrained: str) -> Path:
    """The VAE folder of `model.pretrained`: a pipeline root's vae/, or the folder itself (as `data.cache.vae`)."""
    from jaxsd.data.model_encoders import vae_folder as component_folder

    return component_folder(pretrained, key="model.pretrained")


def vae_config(cfg: ModelConfig) -> VAEConfig:
    """The architecture: the pretrained folder's config.json, else `model.vae`."""
    try:
        if cfg.pretrained:
            from jaxsd.convert.load import load_config as load_folder_config
            folder = vae_folder(cfg.pretrained)
            return VAEConfig.from_diffusers(load_folder_config(folder))
        if not cfg.vae:
            raise ConfigError("model.kind = vae: model.vae is empty and model.pretrained is not set")
        return VAEConfig.from_diffusers(dict(cfg.vae))
    except InputError as e:
        where = f"model.pretrained={cfg.pretrained!r}" if cfg.pretrained else "model.vae"
        raise ConfigError(f"{where}: {e}") from None


def build_vae(cfg: ModelConfig, config: VAEConfig) -> AutoencoderKL:
    # force_upcast off: the dtype asked for is the dtype trained in (a training run chooses it knowingly)
    return AutoencoderKL(config, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                         attention_impl=cfg.attention_impl, remat_policy=cfg.remat_policy, force_upcast=False)


def initial_vae_params(cfg: ModelConfig, module: AutoencoderKL, seed: int, shardings: Any = None,
                       dtype: Any = None) -> tuple[dict, str]:
    """(params, where from): `model.pretrained`'s VAE, else a random init (created sharded)."""
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    if cfg.pretrained:
        from jaxsd.convert.vae import load_vae
        folder = vae_folder(cfg.pretrained)
        _, params = load_vae(folder, dtype=dtype, variant=cfg.variant)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return params, f"pretrained VAE folder {folder}"

    def init(key):
        return jax.tree.map(lambda x: x.astype(dtype), init_params(module, key, *example_inputs(module.config)))

    return run_once(init, jax.random.key(seed), out_shardings=shardings), f"from scratch (model.vae, seed {seed})"
