"""The checks of a loaded config beyond its types: allowed values, and combinations of sections.

`check_config` runs when a config loads (`jaxsd/config_loader.py::load_config`), so a bad value stops
`jaxsd train` before any work, with a message naming the key. The sections' own checks live with their
schema (`config_losses.py`, `config_vae.py`, `config_text.py`, `jaxsd/data/config.py`); this file calls
them in order.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from jaxsd.config_fused import check_fused_update
from jaxsd.config_losses import check_perceptual
from jaxsd.config_schema import Config
from jaxsd.config_text import check_text_encoder, check_validation
from jaxsd.config_vae import check_vae
from jaxsd.data.config import check_data_config
from jaxsd.errors import ConfigError, InputError

# Values checked beyond their type: field path -> allowed values.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("auto", "einsum", "xla", "cudnn", "splash"),
    "diffusion.prediction_type": ("epsilon", "v_prediction", "sample"),
    "loss.timestep_sampling": ("uniform", "logit_normal"),
    "loss.loss_type": ("l2", "l1", "huber"),
    "optimizer.name": ("adamw", "adamw8bit", "adafactor", "lion", "sgd"),
    "optimizer.schedule": ("constant", "linear", "cosine"),
    "sharding.distributed": ("auto", "on", "off"),
    "train.data_source": ("cache", "synthetic"),
    "train.resume": ("auto", "params_only"),
    "lora.init": ("peft", "gaussian"),
}


def check_config(cfg: Config) -> None:
    """Every check of a loaded config: its choices, regexes, counts, and each section's own check."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.0)
            raise ConfigError(f"config key {key!r} = {value!r} is not one of {allowed}; did you mean {close[0]!r}?")
    for pattern in (*cfg.train.trainable, *cfg.train.frozen):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"train.trainable/frozen: bad regex {pattern!r}: {e}") from None
    for key in ("every", "keep", "poll_every"):
        if getattr(cfg.checkpoint, key) < 1:
            raise ConfigError(f"checkpoint.{key} = {getattr(cfg.checkpoint, key)} must be >= 1 (to save only at the "
                              "end, set checkpoint.every to train.steps)")
    if cfg.train.steps_in_flight < 0:
        raise ConfigError(f"train.steps_in_flight = {cfg.train.steps_in_flight} must be >= 0 (0 = read each step's "
                          "metrics before dispatching the next)")
    if not 256 <= cfg.optimizer.block_size <= 4096:
        raise ConfigError(f"optimizer.block_size = {cfg.optimizer.block_size} must be within 256..4096")
    check_vae(cfg)
    _check_sampling(cfg)
    _check_lora(cfg)
    check_perceptual(cfg)
    check_text_encoder(cfg)
    check_validation(cfg)
    check_fused_update(cfg)
    if cfg.train.data_source == "cache":
        check_data_config(cfg.data)
        from jaxsd.data.subsets import with_class_subset

        with_class_subset(cfg.data, cfg.dreambooth)  # checks the dreambooth section
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is not divisible by "
                          f"train.grad_accum_steps = {cfg.train.grad_accum_steps}")


def _check_lora(cfg: Config) -> None:
    """What a LoRA run needs, checked when the config loads (the parts not built yet are refused by name)."""
    lc = cfg.lora
    if lc.rank < 0 or lc.conv_rank < 0:
        raise ConfigError(f"lora.rank = {lc.rank} and lora.conv_rank = {lc.conv_rank} must be >= 0")
    if not lc.enabled:
        return
    if not cfg.model.pretrained:
        raise ConfigError("lora.rank > 0 trains adapters on a pretrained UNet: set model.pretrained")
    if not 0 <= lc.dropout < 1:
        raise ConfigError(f"lora.dropout = {lc.dropout} must be in [0, 1) (the probability of zeroing an adapter "
                          "input value; 0 = off)")
    if lc.base_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"lora.base_dtype = {lc.base_dtype!r}: use float32, bfloat16, float16 or null")


def sample_components_folder(cfg: Config) -> str | None:
    """The pipeline folder sample grids take their VAE, text side and scheduler from (None: there is none).

    `logging.sample_components` when set, else `model.pretrained` when that is a pipeline folder
    (has model_index.json; a bare UNet folder has no text encoder to sample with).
    """
    if cfg.logging.sample_components:
        return cfg.logging.sample_components
    if cfg.model.pretrained and (Path(cfg.model.pretrained) / "model_index.json").is_file():
        return cfg.model.pretrained
    return None


def _check_sampling(cfg: Config) -> None:
    """Sample-grid settings are checked when the config loads, not at step `sample_every`."""
    lg = cfg.logging
    if lg.sample_every < 0:
        raise ConfigError(f"logging.sample_every = {lg.sample_every} must be >= 0 (0 = no sample grids)")
    if not lg.sample_every or cfg.model.kind == "vae":  # every sample_* key, sample_clip too, rests with the grids;
        # a VAE's grids are reconstructions of its data
        return
    if lg.sample_clip and not (Path(lg.sample_clip) / "config.json").is_file():
        raise ConfigError(f"logging.sample_clip = {lg.sample_clip!r}: no config.json there — point it at a "
                          "transformers CLIPModel folder (CLIPModel + CLIPProcessor save_pretrained)")
    from jaxsd.diffusion.names import SCHEDULER_CHOICES, canonical_sampler_name  # jax-free

    if not lg.sample_prompts:
        raise ConfigError(f"logging.sample_every = {lg.sample_every} but logging.sample_prompts is empty; "
                          "give the prompts, e.g. logging.sample_prompts='[a photo of a cat]'")
    try:
        canonical_sampler_name(lg.sample_sampler)
    except InputError:
        close = difflib.get_close_matches(lg.sample_sampler, SCHEDULER_CHOICES, n=1, cutoff=0.0)
        raise ConfigError(f"config key 'logging.sample_sampler' = {lg.sample_sampler!r} is not one of "
                          f"{SCHEDULER_CHOICES}; did you mean {close[0]!r}?") from None
    for key in ("sample_steps", "sample_images_per_prompt"):
        if getattr(lg, key) < 1:
            raise ConfigError(f"logging.{key} = {getattr(lg, key)} must be >= 1")
    for key in ("sample_height", "sample_width"):
        if getattr(lg, key) is not None and getattr(lg, key) <= 0:
            raise ConfigError(f"logging.{key} = {getattr(lg, key)} must be a positive number of pixels (or null)")
    folder = sample_components_folder(cfg)
    if folder is None:
        why = (f"model.pretrained={cfg.model.pretrained!r} is not a pipeline folder (no model_index.json)"
               if cfg.model.pretrained else "model.pretrained is not set")
        raise ConfigError(f"logging.sample_every = {lg.sample_every}: sample grids need a VAE, text encoder(s), "
                          f"tokenizer(s) and scheduler, and there are none ({why}). Set "
                          "logging.sample_components=PATH to a diffusers pipeline folder (its unet is ignored), "
                          "or logging.sample_every=0")
    if not (Path(folder) / "model_index.json").is_file():
        raise ConfigError(f"logging.sample_components={folder!r}: no model_index.json there — point it at a diffusers "
                          "pipeline folder (model_index.json, vae/, text_encoder/, tokenizer/, scheduler/)")
