"""The diffusion training objective — "what the loss is", one of the two seams other training methods plug into.

Two halves, so that gradient accumulation is exact: `draw_randomness` draws every
random quantity of a whole batch (noise, timesteps, perturbation, dropout mask,
latent sample) from one key, and `diffusion_loss` is a deterministic function of
(params, batch, draws). Splitting both along the batch gives k micro-batches whose
mean loss is the full batch's loss.

Batch dict (the data loader's, see jaxsd/data):
  "latents" [B,h,w,C]  — or "latent_mean"/"latent_logvar" [B,h,w,C] (a fresh latent is drawn),
  "encoder_hidden_states" [B,L,D], optionally "pooled" [B,P] and "time_ids" [B,6] (SDXL);
  with data.subsets "loss_weight" [B] (each sample's loss is multiplied by it), and with a prior
  subset "prior" [B] (1.0 for DreamBooth's class images: loss = instance mean + class mean).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxsd.config import LossConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import ConfigError, InputError

# apply_fn(params, noisy_latents [B,h,w,C], t [B], encoder_hidden_states [B,L,D], added_cond | None) -> [B,h,w,C]
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], jax.Array]


def sample_timesteps(rng: jax.Array, batch: int, cfg: LossConfig, num_train_timesteps: int) -> jax.Array:
    """int32 [batch] in [min_timestep, max_timestep): uniform, or logit-normal (mid-range biased)."""
    lo = cfg.min_timestep
    hi = num_train_timesteps if cfg.max_timestep is None else cfg.max_timestep
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ConfigError(f"loss.min_timestep={lo} / max_timestep={hi} must satisfy 0 <= min < max <= "
                          f"{num_train_timesteps} (diffusion.num_train_timesteps)")
    if cfg.timestep_sampling == "uniform":
        return jax.random.randint(rng, (batch,), lo, hi, dtype=jnp.int32)
    if cfg.timestep_sampling == "logit_normal":
        u = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch,), jnp.float32))
        return jnp.clip(lo + jnp.floor(u * (hi - lo)), lo, hi - 1).astype(jnp.int32)
    raise ValueError(f"loss.timestep_sampling {cfg.timestep_sampling!r} unknown; use uniform or logit_normal")


def draw_randomness(rng: jax.Array, batch: dict[str, jax.Array], cfg: LossConfig,
                    num_train_timesteps: int) -> dict[str, jax.Array]:
    """Every random draw of one training batch, each with the batch as its leading axis."""
    ref = batch["latents"] if "latents" in batch else batch["latent_mean"]
    b, c = ref.shape[0], ref.shape[-1]
    k_noise, k_offset, k_t, k_perturb, k_drop, k_latent = jax.random.split(rng, 6)
    noise = jax.random.normal(k_noise, ref.shape, jnp.float32)
    if cfg.noise_offset:
        # a per-sample, per-channel constant shift lets the model learn the image's mean brightness
        noise = noise + cfg.noise_offset * jax.random.normal(k_offset, (b, 1, 1, c), jnp.float32)
    draws = {"noise": noise, "t": sample_timesteps(k_t, b, cfg, num_train_timesteps),
             "drop": jax.random.uniform(k_drop, (b,)) < cfg.cond_dropout}
    if cfg.input_perturbation:
        draws["perturb"] = cfg.input_perturbation * jax.random.normal(k_perturb, ref.shape, jnp.float32)
    if "latents" not in batch:
        draws["latent_eps"] = jax.random.normal(k_latent, ref.shape, jnp.float32)
    return draws


def min_snr_weight(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-γ loss weight per sample, for the model's prediction type (Hang et al. 2023, eq. 9 ff.).

    The weight min(SNR, γ) applies to the x0-error; expressed for the target actually
    regressed it is min(SNR,γ)/SNR for ε, min(SNR,γ)/(SNR+1) for v, min(SNR,γ) for x0.
    At SNR = 0 (zero-terminal-SNR schedules) the ε weight takes its limit 1.
    """
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type {prediction_type!r} unknown")


def elementwise_loss(pred: jax.Array, target: jax.Array, loss_type: str, huber_c: float) -> jax.Array:
    """Per-element loss in fp32: l2 (squared error), l1, or Huber with delta huber_c."""
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    if loss_type == "l2":
        return jnp.square(pred - target)
    if loss_type == "l1":
        return jnp.abs(pred - target)
    if loss_type == "huber":
        return optax.huber_loss(pred, target, delta=huber_c)
    raise ValueError(f"loss.loss_type {loss_type!r} unknown; use l2, l1 or huber")


def micro_conditioning(original_size: jax.Array, crop_top_left: jax.Array, target_size: jax.Array) -> jax.Array:
    """SDXL `time_ids` [B,6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), each input [B,2]."""
    return jnp.concatenate([original_size, crop_top_left, target_size], axis=-1).astype(jnp.float32)


def conditioning(batch: dict[str, jax.Array], drop: jax.Array,
                 empty: dict[str, jax.Array] | None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """(encoder_hidden_states, added_cond) with dropped samples replaced by the empty-prompt embedding.

    empty: {"encoder_hidden_states": [L,D], "pooled": [P]} (the cached "" prompt); needed when
    any sample can be dropped. time_ids are never dropped (SDXL keeps micro-conditioning).
    """
    ehs = batch["encoder_hidden_states"]
    pooled = batch.get("pooled")
    if empty is not None:
        keep = ~drop
        ehs = jnp.where(keep[:, None, None], ehs, empty["encoder_hidden_states"][None].astype(ehs.dtype))
        if pooled is not None:
            pooled = jnp.where(keep[:, None], pooled, empty["pooled"][None].astype(pooled.dtype))
    added = None
    if pooled is not None:
        if "time_ids" in batch:
            time_ids = batch["time_ids"]
        elif "original_size" in batch:
            time_ids = micro_conditioning(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        else:
            raise InputError("an SDXL batch (with 'pooled') needs 'time_ids' [B,6] or 'original_size', "
                             "'crop_top_left', 'target_size' [B,2] each")
        added = {"text_embeds": pooled, "time_ids": time_ids.astype(jnp.float32)}
    return ehs, added


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def subset_loss(per_sample: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch loss of per-sample losses [B] under data.subsets' weights: (loss, extra metrics).

    Each sample counts `loss_weight` times (kohya's per-sample weights); with a "prior" mask
    (DreamBooth) the loss is the instance samples' mean + the class samples' mean — a class subset's
    loss_weight being `dreambooth.prior_loss_weight`, that is instance + prior_loss_weight x class
    loss, as diffusers' train_dreambooth computes it. Metrics: the two halves, `loss_instance` and
    `loss_prior` (each weighted).
    """
    weighted = per_sample * batch["loss_weight"].astype(jnp.float32) if "loss_weight" in batch else per_sample
    if "prior" not in batch:
        return weighted.mean(), {}
    prior = batch["prior"].astype(jnp.float32)
    instance, prior_loss = _masked_mean(weighted, 1.0 - prior), _masked_mean(weighted, prior)
    return instance + prior_loss, {"loss_instance": instance, "loss_prior": prior_loss}


def diffusion_loss(apply_fn: ApplyFn, params: Any, batch: dict[str, jax.Array], draws: dict[str, jax.Array],
                   schedule: NoiseSchedule, cfg: LossConfig,
                   empty: dict[str, jax.Array] | None = None, *,
                   extra_loss: Callable | None = None) -> tuple[jax.Array, jax.Array | dict[str, jax.Array]]:
    """(weighted loss, raw loss): scalars, means over the batch of per-sample mean losses.

    The raw loss is the unweighted mean; the weighted one applies Min-SNR-γ when configured, and
    the subsets' weights (`subset_loss`) when the batch has them — the second value is then a dict
    {"loss_raw", and with a prior subset "loss_instance", "loss_prior"} (all become step metrics).
    extra_loss(x0, x0_pred, draws) -> (term, metrics): a term added to the weighted loss, given the clean
    latents and the x0 the model's output implies [B,h,w,C] (`loss.perceptual`, jaxsd/train/perceptual.py);
    its metrics join the second value's dict.
    """
    if "latents" in batch:
        x0 = batch["latents"].astype(jnp.float32)
    else:
        mean = batch["latent_mean"].astype(jnp.float32)
        std = jnp.exp(0.5 * batch["latent_logvar"].astype(jnp.float32))
        x0 = mean + std * draws["latent_eps"]
    noise, t = draws["noise"], draws["t"]
    # input perturbation (Ning et al. 2023): the model sees noise that is not quite the target's
    noisy = schedule.add_noise(x0, noise + draws["perturb"] if "perturb" in draws else noise, t)
    ehs, added = conditioning(batch, draws["drop"], empty)
    pred = apply_fn(params, noisy, t, ehs, added)
    target = schedule.target(x0, noise, t)
    per_sample = elementwise_loss(pred, target, cfg.loss_type, cfg.huber_c).reshape(x0.shape[0], -1).mean(axis=1)
    raw = per_sample.mean()
    if cfg.min_snr_gamma is not None:
        per_sample_w = min_snr_weight(schedule.snr(t), cfg.min_snr_gamma, schedule.prediction_type) * per_sample
    else:
        per_sample_w = per_sample
    subsets = "loss_weight" in batch or "prior" in batch
    loss, parts = subset_loss(per_sample_w, batch) if subsets else (per_sample_w.mean(), {})
    if extra_loss is not None:
        term, more = extra_loss(x0, schedule.predict_x0(noisy, pred, t), draws)
        loss, parts = loss + term, {**parts, **more}
    return (loss, {"loss_raw": raw, **parts}) if subsets or parts else (loss, raw)
