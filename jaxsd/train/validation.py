"""The validation loss: the training objective on held-out cached samples, at fixed timesteps and fixed noise.

With DreamBooth's few images the training loss (fresh noise and timesteps every step) says little about
overfitting; this one changes only when the params do. The `validation:` section (`ValidationLossConfig`):

  roots      held-out folders cached by `jaxsd cache` with the training data's settings (the loader
             checks their manifests against the run's VAE and text encoder, as the training cache's)
  every      evaluate every N steps, and once before the first step of a fresh run (step 0: the
             baseline, as diffusers' scripts validate before training)
  timesteps  the fixed timesteps; every sample is evaluated at each of them
  seed       sample i's noise is normal(fold_in(key(seed), i)) — the same noise at every evaluation,
             whatever the batch it is in

Logged (metrics.jsonl and TensorBoard) as `val/loss` (the mean over timesteps) and `val/loss_t{T}` (the
mean over samples at timestep T): the unweighted (`loss_raw`) objective of `loss.loss_type`, without
conditioning dropout, noise offset or input perturbation, LoRA dropout off. It evaluates `state.params`
(not the EMA). The held-out batches are read once and kept on the devices as global arrays (meant for
small held-out sets); each evaluation is one jitted call per batch, so on several processes each
evaluates its shard of every batch and XLA reduces the means across them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import Config
from jaxsd.data.config import TFDSConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import ConfigError, InputError
from jaxsd.train.loss import diffusion_loss
from jaxsd.train.model import make_apply_fn
from jaxsd.train.plan import StatePlan

log = logging.getLogger("jaxsd.train")


def fixed_draws(batch: dict[str, jax.Array], seed: int, timestep: int) -> dict[str, jax.Array]:
    """The draws of `diffusion_loss` for a held-out batch: per-sample noise (and latent sample) from
    key(seed) folded with the sample's index (batch["index"] [B]), t = `timestep`, nothing dropped."""
    ref = batch["latents"] if "latents" in batch else batch["latent_mean"]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(batch["index"])
    normal = jax.vmap(lambda k: jax.random.normal(k, ref.shape[1:], jnp.float32))
    b = ref.shape[0]
    draws = {"noise": normal(keys), "t": jnp.full((b,), timestep, jnp.int32), "drop": jnp.zeros((b,), bool)}
    if "latents" not in batch:
        draws["latent_eps"] = normal(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
    return draws


def make_eval_fn(cfg: Config, plan: StatePlan) -> Callable:
    """`evaluate(trainable, frozen, batch) -> [len(timesteps)]` f32: the batch's mean raw loss at each of
    `validation.timesteps` (no gradient; the conditioning as the train step makes it, without dropout)."""
    schedule = NoiseSchedule.from_config(cfg.diffusion.to_scheduler_config())
    apply_fn = make_apply_fn(plan.module, variables=plan.adapters is not None)
    encode_text = plan.conditioning()
    vc = cfg.validation

    def evaluate(trainable: Any, frozen: Any, batch: dict[str, jax.Array]) -> jax.Array:
        if encode_text is not None:
            drop = jnp.zeros((batch["index"].shape[0],), bool)
            batch = encode_text(trainable, frozen, batch, drop)
        variables = plan.variables(trainable, frozen)
        losses = []
        for t in vc.timesteps:
            _, raw = diffusion_loss(apply_fn, variables, batch, fixed_draws(batch, vc.seed, t), schedule, cfg.loss)
            losses.append(raw)
        return jnp.stack(losses)

    return evaluate


def held_out_batches(cfg: Config, mesh: Any) -> list[dict[str, jax.Array]]:
    """Every whole batch of `validation.roots` (one unshuffled epoch) as global arrays on `mesh`."""
    from jaxsd.data.loader import GlobalBatches, training_loader

    vc = cfg.validation
    size = vc.batch_size or cfg.train.batch_size
    data = dataclasses.replace(cfg.data, roots=tuple(vc.roots), packed=(), tfds=TFDSConfig(),
                               loader=dataclasses.replace(cfg.data.loader, shuffle=False))
    try:
        loader = training_loader(data, mesh=mesh, batch_size=size)
    except InputError as e:  # the loader's words are about data.loader.batch_size: say which data this is
        raise ConfigError(f"validation.roots {list(vc.roots)}, validation.batch_size={size}: {e} (for the held-out "
                          "set: lower validation.batch_size, divisible by the mesh's batch shards)") from None
    steps, samples = loader.steps_per_epoch, len(loader.store)
    if steps * size < samples:
        log.warning("validation: %d of %d held-out samples are left out (not a whole batch of %d in their bucket)",
                    samples - steps * size, samples, size)
    batches = GlobalBatches(loader)
    return [next(batches) for _ in range(steps)]


@dataclasses.dataclass
class Validator:
    """Evaluates and logs the validation loss of a train state every `validation.every` steps."""

    every: int
    timesteps: tuple[int, ...]
    batches: list[dict[str, jax.Array]]
    evaluate: Callable  # jitted: (trainable, frozen, batch) -> [T] f32, replicated

    @classmethod
    def from_config(cls, cfg: Config, plan: StatePlan, mesh: Any) -> Validator | None:
        """None when `validation.every` is 0."""
        if not cfg.validation.every:
            return None
        replicated = NamedSharding(mesh, P())
        evaluate = jax.jit(make_eval_fn(cfg, plan), out_shardings=replicated)
        return cls(cfg.validation.every, tuple(cfg.validation.timesteps), held_out_batches(cfg, mesh), evaluate)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def losses(self, trainable: Any, frozen: Any) -> dict[str, float]:
        """{"val/loss": mean over timesteps, "val/loss_t{T}": mean over the held-out samples at T}."""
        per_batch = [self.evaluate(trainable, frozen, b) for b in self.batches]
        per_t = np.mean(np.stack(jax.device_get(per_batch)), axis=0)  # equal batch sizes: the sample mean
        return {"val/loss": float(np.mean(per_t)), **{f"val/loss_t{t}": float(v) for t, v in zip(self.timesteps, per_t)}}

    def __call__(self, step: int, state: Any, logger: Any) -> dict[str, float]:
        metrics = self.losses(state.params, state.frozen)
        logger.log_scalars(step, metrics)
        return metrics


__all__ = ["Validator", "fixed_draws", "held_out_batches", "make_eval_fn"]
