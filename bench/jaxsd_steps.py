"""The jaxsd train steps the UNet benchmarks time, behind one small interface.

  "train"   jaxsd's real training step (`jaxsd.train.step.make_train_step`): noise and
            timesteps drawn inside the step, DDPM noising, MSE to the target, gradient
            clipping, the trainer's optimizer (`jaxsd.train.optimizers`), the NaN guard —
            what `jaxsd train` runs, with default loss/optimizer settings and no EMA,
            compiled with the trainer's XLA options (`jaxsd.train.compile`).
  "simple"  bare forward + backward + optax update on pre-noised inputs with a fixed
            target. Deterministic, so jaxsd's and torch's first losses must agree: the
            proof that both frameworks run the same network on the same weights.
  "grad"    forward + backward only (loss and gradients, no optimizer, nothing donated):
            the model itself, as `bench/unet_step.py` measures it.

A `StepKit` packages a step as `step(*state, batch) -> (*state, aux)` with the
function that builds its state from params, which arguments are donated, and how
the benchmark batch (keys of `bench.presets.numpy_batch`) maps to the step's batch.
It works on arrays and on `jax.ShapeDtypeStruct`s alike (flops, FSDP memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from bench import jaxsd_unet as J

STEP_KINDS = ("train", "simple", "grad")


@dataclass(frozen=True)
class StepKit:
    kind: str
    step: Callable[..., tuple]
    init: Callable[[Any], tuple]
    donate: tuple[int, ...]
    to_batch: Callable[[dict], dict]
    loss: Callable[[Any], jax.Array]
    updates_state: bool = True
    """False: step(*state, batch) -> aux only (the state is reused unchanged, e.g. "grad")."""
    compiler_options: dict | None = None
    """XLA options the step is compiled with (the trainer's, for "train")."""

    def abstract_state(self, abstract_params: Any) -> tuple:
        return jax.eval_shape(self.init, abstract_params)


def make_kit(kind: str, model, optimizer: str, clip: float = 1.0) -> StepKit:
    """clip: global-norm clipping of the "train" step (0 = off: the trainer then streams the update,
    except with 8-bit AdamW — `jaxsd.train.optimizers.streams_updates`)."""
    if kind == "simple":
        tx = J.make_optimizer(optimizer)
        return StepKit("simple", J.make_train_step(model, tx), lambda p: (p, tx.init(p)), (0, 1),
                       lambda b: b, lambda aux: aux)
    if kind == "grad":
        grad_fn = jax.value_and_grad(J.make_loss_fn(model))
        return StepKit("grad", grad_fn, lambda p: (p,), (), lambda b: b, lambda aux: aux[0],
                       updates_state=False)
    if kind == "train":
        return _trainer_kit(model, optimizer, clip)
    raise ValueError(f"unknown step kind {kind!r}; choose one of {STEP_KINDS}")


def _trainer_batch(b: dict) -> dict:
    """Benchmark batch → the data loader's batch layout (latents, encoder_hidden_states, pooled, time_ids)."""
    out = {"latents": b["sample"], "encoder_hidden_states": b["encoder_hidden_states"]}
    if "text_embeds" in b:
        out["pooled"] = b["text_embeds"]
        out["time_ids"] = b["time_ids"]
    return out


def _trainer_kit(model, optimizer: str, clip: float) -> StepKit:
    from jaxsd.config import DiffusionConfig, LossConfig, OptimizerConfig
    from jaxsd.diffusion.schedule import NoiseSchedule
    from jaxsd.train.compile import train_step_compiler_options
    from jaxsd.train.model import make_apply_fn
    from jaxsd.train.optimizers import make_optimizer, streams_updates
    from jaxsd.train.step import init_state, make_train_step
    from jaxsd.train.trainable import split_params

    opt_cfg = OptimizerConfig(name=optimizer, clip_grad_norm=clip or None)
    tx, lr_fn = make_optimizer(opt_cfg, total_steps=1000)
    schedule = NoiseSchedule.from_config(DiffusionConfig().to_scheduler_config())
    step = make_train_step(make_apply_fn(model), schedule, LossConfig(), tx, lr_fn, streamed=streams_updates(opt_cfg))

    def init(params):
        trainable, frozen = split_params(params)
        return (init_state(trainable, frozen, tx, seed=0, ema=False),)

    return StepKit("train", step, init, (0,), _trainer_batch, lambda metrics: metrics["loss"],
                   compiler_options=train_step_compiler_options())
