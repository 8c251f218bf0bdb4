"""Phase 1 of latent diffusion: train the tiny `AutoencoderKL` from scratch.

Loss = mean squared reconstruction error of decode(sample(encode(x))) +
kl_weight · KL(q(z|x) ‖ N(0, I)) per latent element. (The perceptual and
adversarial terms of SD's VAE come in a later issue; on flat-coloured shapes
MSE alone reconstructs well.) After training, the latent scaling factor is set
the way SD's was chosen: 1 / std of the training latents, so the diffusion
model sees latents of unit variance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclass(frozen=True)
class VAETraining:
    """Settings of the phase-1 autoencoder training."""

    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-4
    """weight of the per-element KL term (small: reconstruction first, latents only mildly regularised).
    1e-4 is what the measured defaults were trained with; 1e-3 gave the same PSNR (docs/demo.md)."""
    seed: int = 0


def _to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def train_vae(model, params, images_uint8: np.ndarray, settings: VAETraining,
              log: Callable[[str], None] = print) -> tuple[dict, list[float]]:
    """Train `model` (an `AutoencoderKL`) on images uint8 [N, H, W, 3]. Returns (params, loss per step)."""
    data = _to_model_range(images_uint8)
    n = len(data)
    if n < settings.batch_size:
        raise ValueError(f"VAE training needs at least batch_size={settings.batch_size} images, got {n}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, settings.warmup_steps,
                                                  max(settings.steps, settings.warmup_steps + 1),
                                                  settings.learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)

    def loss_fn(p, x, key):
        posterior = model.apply({"params": p}, x, method="encode")
        z = posterior.sample(key)
        recon = model.apply({"params": p}, z, method="decode")
        mse = jnp.mean((recon.astype(jnp.float32) - x) ** 2)
        kl = jnp.mean(0.5 * (posterior.mean**2 + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar))
        return mse + settings.kl_weight * kl, (mse, kl)

    @jax.jit
    def step(p, o, x, key):
        (loss, (mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss, mse, kl

    rng = np.random.default_rng(settings.seed)
    key = jax.random.key(settings.seed)
    losses = []
    start = time.perf_counter()
    order = rng.permutation(n)
    cursor = 0
    for i in range(settings.steps):
        if cursor + settings.batch_size > n:
            order, cursor = rng.permutation(n), 0
        batch = jnp.asarray(data[order[cursor:cursor + settings.batch_size]])
        cursor += settings.batch_size
        params, opt_state, loss, mse, kl = step(params, opt_state, batch, jax.random.fold_in(key, i))
        if i % 100 == 0 or i == settings.steps - 1:
            mse_f = float(mse)
            losses.append(float(loss))
            log(f"  vae step {i + 1}/{settings.steps}: loss {float(loss):.4f} (mse {mse_f:.4f}, "
                f"kl {float(kl):.3f}) {time.perf_counter() - start:.0f}s")
    return params, losses


def evaluate(model, params, images_uint8: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(posterior means [N, h, w, C] (unscaled latents), reconstructions decode(mode(encode(x))) in [-1, 1]
    [N, H, W, 3]) of images uint8 [N, H, W, 3] — one jitted program for both (one compile)."""
    def f(p, x):
        mean = model.apply({"params": p}, x, method="encode").mode()
        return mean, model.apply({"params": p}, mean, method="decode").astype(jnp.float32)
    f = jax.jit(f)
    data = _to_model_range(images_uint8)
    means, recons = [], []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        pad = batch_size - len(chunk)  # a fixed batch shape: the last chunk is padded, not recompiled
        m, r = f(params, jnp.asarray(np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk))
        means.append(np.asarray(m)[:len(chunk)])
        recons.append(np.asarray(r)[:len(chunk)])
    return np.concatenate(means), np.concatenate(recons)


def latent_scaling_factor(means: np.ndarray) -> float:
    """1 / std of the training latents (how SD's 0.18215 was chosen)."""
    return float(1.0 / np.std(means))
