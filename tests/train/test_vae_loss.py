"""The terms of VAE training (jaxsd/train/vae_loss.py) against hand computations in NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.train.vae_loss import (
    ADAPTIVE_MAX,
    adaptive_weight,
    disc_factor,
    discriminator_loss,
    generator_loss,
    psnr,
    reconstruction,
)


def _two_layer(rng: np.random.Generator):
    """A 2-layer decoder x̂ = W2 tanh(W1 z), a target x and a linear discriminator v."""
    return {"W1": rng.normal(size=(6, 3)), "W2": rng.normal(size=(5, 6))}, rng.normal(size=3), \
        rng.normal(size=5), rng.normal(size=5)


@pytest.mark.parametrize("disc_weight", [0.5, 1.0])
def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms(disc_weight):
    params, z, x, v = _two_layer(np.random.default_rng(0))
    # by hand: x̂ = W2 h, h = tanh(W1 z); nll = mean|x − x̂| → ∂/∂W2 = sign(x̂ − x)/5 ⊗ h; g = −v·x̂ → −v ⊗ h
    h = np.tanh(params["W1"] @ z)
    x_rec = params["W2"] @ h
    grad_nll = np.outer(np.sign(x_rec - x) / 5, h)
    grad_g = np.outer(-v, h)
    expected = np.linalg.norm(grad_nll) / (np.linalg.norm(grad_g) + 1e-4) * disc_weight

    def decoder(p):
        return p["W2"] @ jnp.tanh(p["W1"] @ z)

    nll_grads = jax.grad(lambda p: jnp.mean(jnp.abs(x - decoder(p))))(params)
    g_grads = jax.grad(lambda p: generator_loss(v @ decoder(p)))(params)
    ours = adaptive_weight(nll_grads["W2"], g_grads["W2"], disc_weight)
    np.testing.assert_allclose(np.asarray(nll_grads["W2"]), grad_nll, rtol=1e-5)
    np.testing.assert_allclose(float(ours), expected, rtol=1e-5)
    # no gradient flows through the weight (LDM detaches it)
    assert float(jax.grad(lambda a: adaptive_weight(a * nll_grads["W2"], g_grads["W2"], 1.0))(1.0)) == 0.0


def test_adaptive_weight_is_clipped():
    tiny = np.full((2, 2), 1e-12)
    assert float(adaptive_weight(np.ones((2, 2)), tiny, 0.5)) == pytest.approx(ADAPTIVE_MAX * 0.5)


def test_discriminator_losses_match_numpy():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(2, 3, 3, 1)), rng.normal(size=(2, 3, 3, 1))
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
    np.testing.assert_allclose(float(discriminator_loss(real, fake, "hinge")), hinge, rtol=1e-5)
    np.testing.assert_allclose(float(discriminator_loss(real, fake, "vanilla")), vanilla, rtol=1e-5)
    np.testing.assert_allclose(float(generator_loss(fake)), -np.mean(fake), rtol=1e-5)


def test_reconstruction_psnr_and_disc_factor():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32), rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(float(reconstruction(x, y, "l1")), np.mean(np.abs(x - y)), rtol=1e-5)
    np.testing.assert_allclose(float(reconstruction(x, y, "l2")), np.mean((x - y) ** 2), rtol=1e-5)
    mse = np.mean((((x + 1) / 2) - ((y + 1) / 2)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(float(psnr(x, y)), np.mean(10 * np.log10(1 / mse)), rtol=1e-5)
    assert [float(disc_factor(jnp.asarray(s), 3)) for s in (0, 2, 3, 9)] == [0.0, 0.0, 1.0, 1.0]
