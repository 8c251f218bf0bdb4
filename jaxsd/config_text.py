"""Checks of the `jaxsd train` config's text-side and validation-loss settings (`jaxsd.config` runs them).

`train.text_encoder` has two spellings of one mechanism: `lora.text_encoder: true` is `train.text_encoder:
lora`; `resolve_text_encoder` makes both fields agree when a config is read (so a run's config.yaml and a
checkpoint's stored config say the same), and refuses a pair that contradicts itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from jaxsd.errors import ConfigError

if TYPE_CHECKING:  # jaxsd.config_schema imports this module
    from jaxsd.config_schema import Config

TEXT_ENCODER_MODES = ("frozen", "lora", "full")


def check_text_encoder(cfg: Config) -> None:
    """train.text_encoder (already resolved by `resolve_text_encoder`) against the rest of the config."""
    mode = cfg.train.text_encoder
    if mode not in TEXT_ENCODER_MODES:
        raise ConfigError(f"train.text_encoder = {mode!r} is not one of {TEXT_ENCODER_MODES}")
    if mode == "frozen":
        return
    if not (cfg.train.data_source == "cache" and cfg.data.cache.tokens):
        spelling = "lora.text_encoder: " if mode == "lora" else ""  # (the older spelling of train.text_encoder=lora)
        raise ConfigError(f"{spelling}train.text_encoder={mode}: the text encoders train with the captions encoded in "
                          "the train step, from a cache of token ids: set data.cache.text_mode: tokens (or "
                          "data.cache.text: tokens) and run jaxsd cache again, or train.text_encoder=frozen")
    if mode == "lora" and not cfg.lora.enabled:
        raise ConfigError("train.text_encoder=lora trains adapters of lora.rank (and lora.alpha) on the text "
                          "encoders beside the UNet's: set lora.rank > 0, or train.text_encoder=full")
    if mode == "full" and cfg.lora.enabled:
        raise ConfigError("train.text_encoder=full with a LoRA UNet (lora.rank > 0) is not supported: use "
                          "train.text_encoder=lora (adapters on both), or lora.rank=0 (both fine-tuned in full)")
    lr = cfg.train.text_encoder_lr
    if lr is not None and (lr < 0 or mode != "full" or cfg.optimizer.learning_rate <= 0):
        raise ConfigError(f"train.text_encoder_lr = {lr}: set it only with train.text_encoder=full, >= 0, and with "
                          f"optimizer.learning_rate > 0 (it scales that schedule; now {cfg.optimizer.learning_rate})")


def resolve_text_encoder(cfg: Config) -> Config:
    """One mechanism, two spellings: `lora.text_encoder: true` is `train.text_encoder: lora`. After this
    both fields agree (the run's config.yaml records them so); a pair that disagrees is an error."""
    mode, legacy = cfg.train.text_encoder, cfg.lora.text_encoder
    if legacy and mode not in (None, "lora"):
        raise ConfigError(f"lora.text_encoder=true (adapters on the text encoders) contradicts train.text_encoder="
                          f"{mode}: set one of them (train.text_encoder: lora is the same as lora.text_encoder: "
                          "true)")
    mode = mode or ("lora" if legacy else "frozen")
    return replace(cfg, train=replace(cfg.train, text_encoder=mode),
                   lora=replace(cfg.lora, text_encoder=mode == "lora"))


def check_validation(cfg: Config) -> None:
    """The `validation:` section (the held-out loss, jaxsd.train.validation)."""
    vc = cfg.validation
    if vc.every < 0:
        raise ConfigError(f"validation.every = {vc.every} must be >= 0 (0 = no validation loss)")
    if not vc.every:
        return
    if cfg.train.data_source != "cache" or not vc.roots:
        raise ConfigError(f"validation.every = {vc.every}: the validation loss is computed on held-out folders "
                          "cached by `jaxsd cache` (train.data_source: cache); set validation.roots=[DIR, ...]")
    if not vc.timesteps:
        raise ConfigError("validation.timesteps is empty: give the timesteps to evaluate at, e.g. [100, 500, 900]")
    n = cfg.diffusion.num_train_timesteps
    bad = [t for t in vc.timesteps if not 0 <= t < n]
    if bad:
        raise ConfigError(f"validation.timesteps {bad} are outside 0..{n - 1} (diffusion.num_train_timesteps={n})")
    if vc.batch_size is not None and vc.batch_size < 1:
        raise ConfigError(f"validation.batch_size = {vc.batch_size} must be >= 1 (or null = train.batch_size)")
