"""PSNR and SSIM of image pairs, in JAX, as torchmetrics computes them.

Images are float [N, H, W, C] in [0, data_range]. SSIM: Gaussian window 11 × 11 (σ 1.5, normalised),
K1 0.01, K2 0.03, the image reflect-padded by 5 on each side so the SSIM map has the image's size, and
averaged over every pixel and channel — torchmetrics' `structural_similarity_index_measure` defaults
(skimage instead crops the border and uses the sample covariance, so its values differ slightly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # int(3.5 σ + 0.5) · 2 + 1, torchmetrics' Gaussian size for σ 1.5
K1, K2 = 0.01, 0.03


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB: [N, H, W, C] × 2 → [N]; 10·log10(range² / MSE), inf for identical images."""
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 2-D Gaussian window [size, size] (outer product of the 1-D one)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g).astype(np.float32)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-image mean SSIM: [N, H, W, C] × 2 (H, W > 5) → [N]."""
    _, h, w, c = a.shape
    pad = SSIM_WINDOW // 2
    if h <= pad or w <= pad:
        raise ValueError(f"SSIM needs images larger than {pad}×{pad} pixels (reflect padding); got {h}×{w}")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    stats = jnp.concatenate([a, b, a * a, b * b, a * b], axis=0)  # [5N, H, W, C]
    stats = jnp.pad(stats, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    window = jnp.broadcast_to(jnp.asarray(gaussian_window())[:, :, None, None], (SSIM_WINDOW, SSIM_WINDOW, 1, c))
    blurred = lax.conv_general_dilated(stats, window, (1, 1), "VALID", feature_group_count=c,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=lax.Precision.HIGHEST)
    mu_a, mu_b, aa, bb, ab = jnp.split(blurred, 5, axis=0)
    var_a = jnp.maximum(aa - mu_a**2, 0.0)
    var_b = jnp.maximum(bb - mu_b**2, 0.0)
    cov = ab - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))
