"""The jaxsd train steps the UNet benchmarks time, behind one small interface.

  "train"   jaxsd's real training step, built from a `jaxsd train` config exactly as the
            trainer builds it (`jaxsd.train.plan`: `plan_state` + `plan_train_step`): noise
            and timesteps drawn inside the step, DDPM noising, MSE to the target, gradient
            clipping, the trainer's optimizer, the NaN guard — default loss/optimizer
            settings, no EMA, compiled with the trainer's XLA options (`jaxsd.train.compile`).
            With `lora=LoRABench(rank, base_dtype)`: a LoRA run's step (`lora: {rank, alpha:
            rank, targets: attn, base_dtype}`): adapters train, the base UNet is frozen.
            With `perceptual=PerceptualBench(vae, lpips)`: the step with `loss.perceptual.lpips_weight: 1`
            on every sample of every step (max_timestep 999): the x0 prediction decoded by that VAE
            folder, LPIPS (that weights file) to the decoded clean latents.
  "simple"  bare forward + backward + optax update on pre-noised inputs with a fixed
            target. Deterministic, so jaxsd's and torch's first losses must agree: the
            proof that both frameworks run the same network on the same weights.
  "grad"    forward + backward only (loss and gradients, no optimizer, nothing donated):
            the model itself, as `bench/unet_step.py` measures it.

A `StepKit` packages a step as `step(*state, batch) -> (*state, aux)` with its initial
state (loaded from the shared diffusers UNet folder, or a random init) and that state's
shapes (nothing allocated: flops, FSDP memory, `--memory-only`), which arguments are
donated, and how the benchmark batch (keys of `bench.presets.numpy_batch`) maps to the
step's batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import jaxsd_unet as J

STEP_KINDS = ("train", "simple", "grad")


@dataclass(frozen=True)
class LoRABench:
    """The LoRA run a "train" kit measures: `lora: {rank, alpha: rank, targets: attn, base_dtype}`."""

    rank: int
    base_dtype: str = "float32"
    targets: str = "attn"  # to_q, to_k, to_v, to_out.0 of attn1/attn2: what the torch side's PEFT config adapts


@dataclass(frozen=True)
class PerceptualBench:
    """The perceptual term a "train" kit adds: the VAE folder that decodes, the LPIPS weights file."""

    vae: str
    lpips: str


@dataclass(frozen=True)
class StepKit:
    kind: str
    step: Callable[..., tuple]
    start: Callable[[], tuple]
    """the initial state (params from the shared folder, or a random init), as device arrays."""
    abstract: Callable[[], tuple]
    """the initial state's ShapeDtypeStructs (nothing allocated)."""
    donate: tuple[int, ...]
    to_batch: Callable[[dict], dict]
    loss: Callable[[Any], jax.Array]
    parts: Callable[[tuple], tuple[Any, Any]]
    """state -> (trained params, frozen params)."""
    updates_state: bool = True
    """False: step(*state, batch) -> aux only (the state is reused unchanged, e.g. "grad")."""
    compiler_options: dict | None = None
    """XLA options the step is compiled with (the trainer's, for "train")."""
    mesh: Any = None
    """"train": the trainer's mesh, and `state_shardings` its state's shardings on it."""
    state_shardings: tuple | None = None

    def abstract_state(self) -> tuple:
        return self.abstract()

    def param_counts(self, state: tuple) -> tuple[int, int]:
        """(UNet params incl. adapters, trained params) of a state of arrays or ShapeDtypeStructs."""
        trained, frozen = self.parts(state)
        n = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
        return n(trained) + n(frozen), n(trained)


def make_kit(kind: str, model, optimizer: str, clip: float = 1.0, *, folder: str | None = None,
             lora: LoRABench | None = None, fsdp: int = 1, perceptual: PerceptualBench | None = None,
             fused_update: bool = False) -> StepKit:
    """clip: global-norm clipping of the "train" step (0 = off: the trainer then streams the update,
    except with 8-bit AdamW — `jaxsd.train.optimizers.streams_updates`). folder: the shared diffusers
    UNet weights (None: a random init). lora, fsdp, perceptual, fused_update ("train" only): a LoRA run; FSDP
    over `fsdp` devices; the perceptual loss term; `train.fused_update`."""
    if kind == "train":
        return _trainer_kit(trainer_config(model, optimizer, clip, folder=folder, lora=lora, fsdp=fsdp,
                                           perceptual=perceptual, fused_update=fused_update))
    if fused_update:
        raise ValueError(f"step {kind!r}: train.fused_update is measured with the trainer's step (--step train) only")
    if lora is not None or fsdp != 1 or perceptual is not None:
        raise ValueError(f"step {kind!r}: LoRA, FSDP and the perceptual loss are measured with the trainer's step "
                         "(--step train) only")
    if kind == "simple":
        tx = J.make_optimizer(optimizer)
        return _params_kit("simple", J.make_train_step(model, tx), lambda p: (p, tx.init(p)), (0, 1), model, folder,
                           lambda aux: aux)
    if kind == "grad":
        return _params_kit("grad", jax.value_and_grad(J.make_loss_fn(model)), lambda p: (p,), (), model, folder,
                           lambda aux: aux[0], updates_state=False)
    raise ValueError(f"unknown step kind {kind!r}; choose one of {STEP_KINDS}")


def _params_kit(kind: str, step: Callable, init: Callable, donate: tuple[int, ...], model, folder: str | None,
                loss: Callable, **kw) -> StepKit:
    """A bench-own step over (params, ...): params loaded with `jaxsd.convert.unet.load_unet`."""

    def start():
        if folder:
            from jaxsd.convert.unet import load_unet

            params = load_unet(folder)[1]
        else:
            params = J.init_params(model)
        return jax.jit(init, donate_argnums=0)(params)  # donated: the state takes over the params' buffers

    return StepKit(kind, step, start, lambda: jax.eval_shape(init, J.abstract_params(model)), donate,
                   lambda b: b, loss, lambda state: (state[0], {}), **kw)


def _trainer_batch(b: dict) -> dict:
    """Benchmark batch → the data loader's batch layout (latents, encoder_hidden_states, pooled, time_ids)."""
    out = {"latents": b["sample"], "encoder_hidden_states": b["encoder_hidden_states"]}
    if "text_embeds" in b:
        out["pooled"] = b["text_embeds"]
        out["time_ids"] = b["time_ids"]
    return out


def trainer_config(model, optimizer: str, clip: float, *, folder: str | None = None,
                   lora: LoRABench | None = None, fsdp: int = 1, perceptual: PerceptualBench | None = None,
                   fused_update: bool = False):
    """The `jaxsd train` config whose step the "train" kit is: `model`'s architecture (or the
    `folder` it was saved to, as `model.pretrained`), precision, attention and remat; default
    loss (+ `perceptual`'s term), optimizer `optimizer` with clipping `clip` (0 = off); one device,
    or FSDP over `fsdp`."""
    from jaxsd.config import (
        Config,
        LoRAConfig,
        LossConfig,
        ModelConfig,
        OptimizerConfig,
        ShardingConfig,
        TrainConfig,
    )
    from jaxsd.config_losses import LPIPSLossConfig, PerceptualLossConfig
    from jaxsd.data.config import CacheConfig, DataConfig

    model_cfg = ModelConfig(pretrained=folder, unet={} if folder else model.config.to_diffusers(),
                            dtype=jnp.dtype(model.dtype).name, param_dtype=jnp.dtype(model.param_dtype).name,
                            attention_impl=model.attention_impl, remat_policy=model.remat_policy,
                            segmented_backward=model.segmented_backward is not None)
    lora_cfg = LoRAConfig() if lora is None else LoRAConfig(rank=lora.rank, alpha=float(lora.rank),
                                                            targets=lora.targets, base_dtype=lora.base_dtype)
    loss, data = LossConfig(), DataConfig()
    if perceptual is not None:
        loss = LossConfig(lpips=LPIPSLossConfig(weights=perceptual.lpips),
                          perceptual=PerceptualLossConfig(lpips_weight=1.0, every=1, max_timestep=999))
        data = DataConfig(cache=CacheConfig(vae=perceptual.vae))
    return Config(model=model_cfg, optimizer=OptimizerConfig(name=optimizer, clip_grad_norm=clip or None),
                  train=TrainConfig(steps=1000, data_source="synthetic", fused_update=fused_update), sharding=ShardingConfig(data=1, fsdp=fsdp),
                  lora=lora_cfg, loss=loss, data=data)


def vae_trainer_kit(cfg) -> StepKit:
    """The "train" kit of a VAE config (`model.kind: vae`): `jaxsd train`'s autoencoder + discriminator step,
    built as the trainer builds it; the benchmark batch is {"pixels": [B, H, W, 3] in [-1, 1]}."""
    return _trainer_kit(cfg, to_batch=lambda b: {"pixels": b["pixels"]})


def _trainer_kit(cfg, to_batch: Callable[[dict], dict] = _trainer_batch) -> StepKit:
    from jaxsd.train.compile import train_step_compiler_options
    from jaxsd.train.model import initial_params
    from jaxsd.train.plan import fresh_state, plan_state, plan_train_step
    from jaxsd.train.sharding import make_mesh

    mesh = make_mesh(cfg.sharding, jax.devices()[:cfg.sharding.fsdp])
    plan = plan_state(cfg, mesh)

    def start():  # as `jaxsd train` starts a run: model.pretrained (or from scratch), then a fresh state
        params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings, dtype=plan.base_dtype)
        return (fresh_state(cfg, plan, params),)

    return StepKit("train", plan_train_step(cfg, plan, mesh), start, lambda: (plan.abstract,), (0,), to_batch,
                   lambda metrics: metrics["loss"], lambda state: (state[0].params, state[0].frozen),
                   compiler_options=train_step_compiler_options(), mesh=mesh,
                   state_shardings=(plan.state_shardings,))
