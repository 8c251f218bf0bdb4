"""The terms of VAE training (LDM's `LPIPSWithDiscriminator`), as pure functions of arrays.

LDM's autoencoder loss sums its reconstruction terms over every pixel value and averages over the
batch; jaxsd divides the whole loss by the pixel values per image (H·W·3), so each term reads as a
per-value mean and LDM's weights (kl_weight 1e-6, disc_weight 0.5) mean what they meant there:

    nll    = mean |x − x̂|  (or (x − x̂)²)  + lpips_weight · mean_b LPIPS(x, x̂)
    loss   = nll + kl_weight · mean_b KL_b / (H·W·3) + factor · w · g,   g = −mean D(x̂)
    w      = clip(‖∇_last nll‖ / (‖∇_last g‖ + 1e-4), 0, 1e4) · disc_weight   (detached)
    d_loss = factor · hinge / vanilla (D(x), D(x̂))

`last` is the decoder's conv_out kernel; factor is 0 before `disc_start` steps, then 1. LDM's learned
output log-variance (init 0) is left out: with it at 0 the nll is the plain reconstruction term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADAPTIVE_EPS = 1e-4  # LDM's calculate_adaptive_weight
ADAPTIVE_MAX = 1e4


def reconstruction(x: jax.Array, x_rec: jax.Array, kind: str) -> jax.Array:
    """Mean over every value of |x − x̂| (l1) or (x − x̂)² (l2). x, x_rec [B, H, W, 3] → []."""
    diff = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
    return jnp.mean(jnp.abs(diff) if kind == "l1" else jnp.square(diff))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """LDM's generator weight from the gradients of nll and g at the last decoder layer: [] (no gradient)."""
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + ADAPTIVE_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_MAX) * disc_weight)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """−mean D(x̂): the autoencoder's adversarial term (LDM uses it for hinge and vanilla alike). → []."""
    return -jnp.mean(logits_fake)


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str) -> jax.Array:
    """hinge: ½(mean relu(1 − D(x)) + mean relu(1 + D(x̂))); vanilla: ½(mean softplus(−D(x)) + mean softplus(D(x̂)))."""
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def psnr(x: jax.Array, x_rec: jax.Array) -> jax.Array:
    """Mean over the batch of the PSNR (dB) of x̂ against x, both [B, H, W, 3] in [-1, 1] (compared in [0, 1],
    x̂ clipped to the range first). → []."""
    a = (x.astype(jnp.float32) + 1.0) / 2.0
    b = (jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def disc_factor(step: jax.Array, disc_start: int) -> jax.Array:
    """1.0 from optimizer step `disc_start` on (0-based: the step being computed), else 0.0 (LDM's adopt_weight)."""
    return (step >= disc_start).astype(jnp.float32)
