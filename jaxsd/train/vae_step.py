"""The pure train step of VAE training (`model.kind: vae`): autoencoder and discriminator in one step.

    state, metrics = step(state, {"pixels": [B, H, W, 3] in [-1, 1]})

The state is the UNet's `TrainState` with the trees keyed by part:
  params  {"vae": the autoencoder's trained params, "disc": the PatchGAN discriminator}
  frozen  {"vae": the autoencoder's frozen params (decoder-only fine-tune: encoder + quant_conv),
           "lpips": the LPIPS network (VGG16 + heads), when lpips_weight > 0}
  opt_state {"vae": ..., "disc": ...}: two optimizers (`keyed_optimizers`)
  ema     the EMA of params["vae"] (the discriminator needs none)

One step: encode → sample the posterior (key: the state's rng folded with the step) → decode. The
autoencoder's gradient is built from vector-Jacobian products so that the adaptive weight costs no
extra pass through the autoencoder: one forward, the cotangents of nll and g at the reconstruction
(one backward through LPIPS, one through the discriminator), their gradients at the decoder's
conv_out kernel (XLA keeps only the last layer's part of those two products), then one backward
of the weighted sum. The discriminator learns from the same reconstructions (detached), in the same
step, before either update: both updates are computed from the state the step started with
(LDM alternates two optimizer passes with a second forward instead). Before `disc_start` the
discriminator's update is skipped (its optimizer state does not move; no weight decay either).
A NaN/inf anywhere skips both updates, as the UNet step does. With `loss.vae.discriminator: false`
params["disc"] is {} and the step is one forward and one backward of reconstruction + KL (+ LPIPS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxsd.config import EMAConfig
from jaxsd.config_vae import VAELossConfig
from jaxsd.train.ema import update_ema
from jaxsd.train.optimizers import applied_updates
from jaxsd.train.rounding import apply_updates, needs_stochastic_rounding
from jaxsd.train.step import TrainState, global_norm
from jaxsd.train.trainable import merge_params
from jaxsd.train.vae_loss import (
    adaptive_weight,
    disc_factor,
    discriminator_loss,
    generator_loss,
    psnr,
    reconstruction,
)

PARTS = ("vae", "disc")
LAST_LAYER = ("decoder", "conv_out", "kernel")  # LDM's last_layer: the decoder's conv_out weight
_ROUNDING_STREAM = 0x526F756E  # as jaxsd.train.step: the stochastic rounding of bfloat16 params


def keyed_optimizers(txs: dict[str, optax.GradientTransformationExtraArgs]) -> optax.GradientTransformationExtraArgs:
    """One optimizer per top-level key of the params ({"vae": ..., "disc": ...}), each with its own state,
    clipping and skip: `update(grads, state, params, grad_norm={key: []}, apply={key: bool []})`."""
    def init(params):
        return {k: tx.init(params[k]) for k, tx in txs.items()}

    def update(grads, state, params=None, *, grad_norm=None, apply=None, **_):
        out = {k: tx.update(grads[k], state[k], params[k], grad_norm=(grad_norm or {}).get(k),
                            apply=(apply or {}).get(k)) for k, tx in txs.items()}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

    return optax.GradientTransformationExtraArgs(init, update)


def init_vae_state(trainable: Any, frozen: Any, disc: Any, lpips: Any, tx: optax.GradientTransformation,
                   seed: int, ema: bool) -> TrainState:
    """A fresh VAE train state (module docstring) from the autoencoder's (trainable, frozen) split,
    the discriminator's params and the LPIPS params ({} without LPIPS)."""
    params = {"vae": trainable, "disc": disc}
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, frozen={"vae": frozen, "lpips": lpips},
                      opt_state=tx.init(params), ema=jax.tree.map(jnp.copy, trainable) if ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)), nonfinite=jnp.zeros([], jnp.int32))


def last_layer(grads: Any) -> jax.Array:
    g = grads
    for k in LAST_LAYER:
        g = g[k]
    return g


def step_key(state: TrainState) -> jax.Array:
    """The key of the step `state` is about to compute: the run's rng folded with the step. The posterior
    sample uses it as is (so another framework can be handed the same draw), stochastic rounding a fold of it."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def make_vae_train_step(vae: Any, disc: Any, lpips: Any, loss_cfg: VAELossConfig,
                        tx: optax.GradientTransformationExtraArgs, lr_fn: optax.Schedule, *,
                        ema_cfg: EMAConfig | None = None) -> Callable:
    """The pure step `(state, batch) -> (state, metrics)`.

    vae: the `AutoencoderKL` module; disc: the `NLayerDiscriminator`, or None (loss.vae.discriminator false:
    params["disc"] is {}); lpips: the `LPIPS` module or None (lpips_weight 0). tx: `keyed_optimizers({"vae":
    ..., "disc": ...})`; lr_fn: the autoencoder's schedule.
    metrics: loss, nll, rec, lpips, kl (Σ over the latent, mean over the batch), psnr, grad_norm (autoencoder),
    lr, skipped; with the discriminator also g_loss, d_loss, adaptive_weight, disc_factor, logits_real,
    logits_fake, disc_grad_norm.
    """
    c = loss_cfg

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        x = batch["pixels"].astype(jnp.float32)
        key = step_key(state)
        factor = disc_factor(state.step, c.disc_start)
        frozen_ae, lpips_params, d_params = state.frozen["vae"], state.frozen["lpips"], state.params["disc"]
        values = x[0].size  # pixel values per image: the loss is LDM's divided by it (jaxsd/train/vae_loss.py)

        def autoencode(trainable):
            p = {"params": merge_params(trainable, frozen_ae)}
            posterior = vae.apply(p, x, method="encode")
            x_rec = vae.apply(p, posterior.sample(key), method="decode").astype(jnp.float32)
            return x_rec, jnp.mean(posterior.kl())

        def nll_of(x_rec):
            rec = reconstruction(x, x_rec, c.reconstruction)
            lp = (jnp.mean(lpips.apply({"params": lpips_params}, x, x_rec)) if lpips is not None
                  else jnp.zeros([], jnp.float32))
            return rec + c.lpips_weight * lp, (rec, lp)

        def g_of(x_rec):
            logits = disc.apply({"params": d_params}, x_rec)
            return generator_loss(logits), logits

        (x_rec, kl), ae_vjp = jax.vjp(autoencode, state.params["vae"])
        nll, nll_vjp, (rec, lp) = jax.vjp(nll_of, x_rec, has_aux=True)
        one = jnp.ones([], jnp.float32)
        (d_nll,) = nll_vjp(one)
        kl_scale = c.kl_weight / values
        loss = nll + kl_scale * kl
        gan = {}
        if disc is None:  # loss.vae.discriminator false: reconstruction + KL (+ LPIPS) only
            (grads,) = ae_vjp((d_nll, jnp.asarray(kl_scale, kl.dtype)))
            d_loss, d_grads = jnp.zeros([], jnp.float32), {}
        else:
            g, g_vjp, _ = jax.vjp(g_of, x_rec, has_aux=True)
            (d_g,) = g_vjp(one)
            no_kl = jnp.zeros_like(kl)
            # only the last layer's part of these two products is used: XLA computes nothing else of them
            weight = adaptive_weight(last_layer(ae_vjp((d_nll, no_kl))[0]), last_layer(ae_vjp((d_g, no_kl))[0]),
                                     c.disc_weight)
            (grads,) = ae_vjp((d_nll + factor * weight * d_g, jnp.asarray(kl_scale, kl.dtype)))
            loss = loss + factor * weight * g

            def d_loss_of(dp):
                real = disc.apply({"params": dp}, x)
                fake = disc.apply({"params": dp}, jax.lax.stop_gradient(x_rec))
                return factor * discriminator_loss(real, fake, c.disc_loss), (jnp.mean(real), jnp.mean(fake))

            (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(d_loss_of, has_aux=True)(d_params)
            gan = {"g_loss": g, "d_loss": d_loss, "adaptive_weight": weight, "disc_factor": factor,
                   "logits_real": logits_real, "logits_fake": logits_fake, "disc_grad_norm": global_norm(d_grads)}

        norms = {"vae": global_norm(grads), "disc": global_norm(d_grads)}
        finite = jnp.isfinite(loss) & jnp.isfinite(d_loss) & jnp.isfinite(norms["vae"]) & jnp.isfinite(norms["disc"])
        apply = {"vae": finite, "disc": finite & (factor > 0)}
        updates, new_opt = tx.update({"vae": grads, "disc": d_grads}, state.opt_state, state.params,
                                     grad_norm=norms, apply=apply)
        rounding = (jax.random.fold_in(key, _ROUNDING_STREAM) if needs_stochastic_rounding(state.params) else None)
        new_params = apply_updates(state.params, updates, rounding)
        new_step = state.step + 1
        new_ema = None if state.ema is None else update_ema(state.ema, new_params["vae"], new_step,
                                                            ema_cfg or EMAConfig(), apply=finite)
        new_state = state.replace(step=new_step, params=new_params, opt_state=new_opt, ema=new_ema,
                                  nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32))
        metrics = {"loss": loss, "nll": nll, "rec": rec, "lpips": lp, "kl": kl, **gan, "psnr": psnr(x, x_rec),
                   "grad_norm": norms["vae"], "lr": lr_fn(applied_updates(state.opt_state["vae"])),
                   "skipped": (~finite).astype(jnp.int32)}
        return new_state, metrics

    return step_fn
