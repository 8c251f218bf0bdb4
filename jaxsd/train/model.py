"""The UNet being trained: module from config, and the initial params.

Init order (documented in docs/training.md and logged by the loop):
  1. resume — the run dir's latest good checkpoint (handled by the loop, which
     then never calls `initial_params`);
  2. `model.pretrained` — a diffusers folder (pipeline root with `unet/`, or the
     UNet folder itself): its config.json defines the architecture;
  3. from scratch — `model.unet` (diffusers config keys), random init from train.seed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxsd.config import ModelConfig
from jaxsd.errors import ConfigError, InputNotFoundError
from jaxsd.models.params import init_params
from jaxsd.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from jaxsd.train.compile import run_once

log = logging.getLogger("jaxsd.train")


def unet_folder(pretrained: str) -> Path:
    """The UNet folder inside a diffusers pipeline root, or the folder itself (a single-file checkpoint's
    UNet through its folder view, jaxsd/convert/single_file/to_folder.py)."""
    from jaxsd.convert.single_file.to_folder import model_folder

    root = model_folder(pretrained)
    if (root / "unet" / "config.json").is_file():
        return root / "unet"
    if (root / "config.json").is_file():
        return root
    raise InputNotFoundError(f"model.pretrained={pretrained!r}: no unet/config.json or config.json there; "
                             "point it at a diffusers pipeline folder, its unet/ folder or a single-file "
                             ".safetensors checkpoint")


def unet_config(cfg: ModelConfig) -> UNetConfig:
    """The architecture: the pretrained folder's config.json, else `model.unet`."""
    if cfg.pretrained:
        from jaxsd.convert.load import load_config as load_folder_config
        return UNetConfig.from_diffusers(load_folder_config(unet_folder(cfg.pretrained)))
    if not cfg.unet:
        raise ConfigError("model.unet is empty and model.pretrained is not set: give a diffusers UNet config "
                          "(see configs/tiny.yaml) or a pretrained folder")
    return UNetConfig.from_diffusers(dict(cfg.unet))


def build_unet(cfg: ModelConfig, config: UNetConfig) -> UNet2DConditionModel:
    tm = cfg.token_merging if cfg.token_merging.active else None  # ratio 0: exactly the plain UNet
    return UNet2DConditionModel(config, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                                attention_impl=cfg.attention_impl, remat_policy=cfg.remat_policy, token_merging=tm)


def make_apply_fn(module: UNet2DConditionModel, *, variables: bool = False):
    """apply_fn(params, noisy, t, encoder_hidden_states, added_cond) -> prediction (fp32).

    variables=True: the first argument is the full variables dict (e.g. {"params": base, "lora": adapters})."""
    def apply_fn(params, noisy, t, ehs, added):
        out = module.apply(params if variables else {"params": params}, noisy.astype(module.dtype), t,
                           ehs.astype(module.dtype), added)
        return out.astype(jnp.float32)
    return apply_fn


def param_shapes(module: UNet2DConditionModel) -> tuple[dict, dict]:
    """(ShapeDtypeStruct tree, logical PartitionSpec tree) without allocating. The tree depends on the
    config alone (traced once per config); every param is created in the module's param_dtype."""
    from jaxsd.convert.unet import unet_param_specs

    shapes, logical = unet_param_specs(module.config)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, module.param_dtype), shapes), logical


def initial_params(cfg: ModelConfig, module: UNet2DConditionModel, seed: int,
                   shardings: Any = None, dtype: Any = None) -> tuple[dict, str]:
    """(params, where from): from `model.pretrained`, else a random init. Params in `dtype` (default
    param_dtype), placed with `shardings` (a random init is created sharded, never as a full replica first)."""
    if cfg.kind == "vae":  # the autoencoder (jaxsd/train/vae_model.py)
        from jaxsd.train.vae_model import initial_vae_params
        return initial_vae_params(cfg, module, seed, shardings, dtype)
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    if cfg.pretrained:
        from jaxsd.convert.unet import load_unet
        folder = unet_folder(cfg.pretrained)
        _, params = load_unet(folder, dtype=dtype, variant=cfg.variant)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        from jaxsd.convert.single_file.to_folder import view_source
        source = view_source(folder)
        return params, (f"pretrained single file {source}" if source else f"pretrained diffusers folder {folder}")

    def init(key):  # cast inside the program: e.g. a bf16 base never exists as an fp32 tree outside it
        return jax.tree.map(lambda x: x.astype(dtype), init_params(module, key, *example_inputs(module.config)))

    params = run_once(init, jax.random.key(seed), out_shardings=shardings)
    return params, f"from scratch (model.unet, seed {seed})"


def describe(params: Any) -> str:
    """"859.52M params", or the exact count under a million (a tiny model's would round to 0.0xM)."""
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    return f"{n / 1e6:.2f}M params" if n >= 1_000_000 else f"{n:,} params"
