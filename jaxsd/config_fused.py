"""The check of `train.fused_update` against the rest of the `jaxsd train` config (`jaxsd.config_checks` runs it).

The fused update (`jaxsd.train.fused_update`) runs each UNet block's AdamW step inside its backward pass;
what needs every gradient before the first update, or an optimizer state not laid out as the params, is
refused by name rather than silently run unfused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxsd.errors import ConfigError

if TYPE_CHECKING:  # jaxsd.config_checks imports this module
    from jaxsd.config_schema import Config


def check_fused_update(cfg: Config) -> None:
    """train.fused_update against the rest of the config: what the fused path does not support is refused."""
    if not cfg.train.fused_update:
        return
    needs = {"model.segmented_backward: true (the blocks whose backward passes run the updates)":
             cfg.model.segmented_backward,
             "optimizer.name: adamw (8-bit AdamW's moments are packed across params; the others are optax's)":
             cfg.optimizer.name == "adamw",
             "optimizer.clip_grad_norm: null (clipping needs the global gradient norm before any update)":
             cfg.optimizer.clip_grad_norm is None,
             "train.grad_accum_steps: 1 (accumulation needs every micro-batch's gradient before the update)":
             cfg.train.grad_accum_steps == 1,
             "model.param_dtype: float32 (bfloat16 params round their updates stochastically)":
             cfg.model.param_dtype == "float32",
             "lora.rank: 0 (a LoRA run's adapters are not laid out as the UNet's params)": not cfg.lora.enabled,
             "train.text_encoder: frozen (only the UNet's params train here)": cfg.train.text_encoder in (None, "frozen"),
             "model.kind: unet": cfg.model.kind == "unet"}
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise ConfigError("train.fused_update: true needs " + "; ".join(missing))
