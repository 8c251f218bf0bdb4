"""Gram-matrix style loss (Gatys et al. 2016) over chosen VGG16 layers.

For a feature map F of a tap, [B, H, W, C] seen as [B, HW, C]:

    G = Fᵀ F / (C · H · W)          [B, C, C]

normalised by the number of entries of F (the common recipe of neural style transfer code), so a
layer's Gram values do not grow with the image size or its width. The loss is

    L = Σ_l weight_l · mean_{b,i,j} (G_l(x) − G_l(y))²

— per-layer weights default to 1; `loss.perceptual.style_weight` multiplies L in the UNet objective.
Gram matrices are computed in fp32 whatever the trunk's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.losses.lpips import scale_input
from jaxsd.losses.taps import check_taps
from jaxsd.losses.vgg import VGG16Features


def gram_matrix(features: jax.Array) -> jax.Array:
    """[B, H, W, C] → [B, C, C] = FᵀF / (C·H·W)."""
    b, h, w, c = features.shape
    f = features.astype(jnp.float32).reshape(b, h * w, c)
    return jnp.einsum("bnc,bnd->bcd", f, f, precision=jax.lax.Precision.HIGHEST) / (c * h * w)


def gram_loss(features_x: Mapping[str, jax.Array], features_y: Mapping[str, jax.Array],
              layer_weights: Mapping[str, float]) -> jax.Array:
    """Σ_l weight_l · mean((G_l(x) − G_l(y))²) over the layers of `layer_weights`; a scalar."""
    total = jnp.zeros((), jnp.float32)
    for layer, weight in layer_weights.items():
        d = gram_matrix(features_x[layer]) - gram_matrix(features_y[layer])
        total = total + weight * jnp.mean(d * d)
    return total


def gram_distance(features: Mapping[str, jax.Array], grams: Mapping[str, jax.Array],
                  layer_weights: Mapping[str, float]) -> jax.Array:
    """Per image: Σ_l weight_l · mean_{i,j} (G_l(x_b) − T_l)², features [B, H, W, C] against fixed target Gram
    matrices T_l [C, C] (e.g. a style reference set's mean); → [B]."""
    total = 0.0
    for layer, weight in layer_weights.items():
        d = gram_matrix(features[layer]) - grams[layer].astype(jnp.float32)[None]
        total = total + weight * jnp.mean(d * d, axis=(1, 2))
    return total


def style_loss(vgg_params: Mapping, x: jax.Array, y: jax.Array, layers: Sequence[str],
               layer_weights: Sequence[float] | None = None) -> jax.Array:
    """Style loss between image batches x, y [B, H, W, 3] in [-1, 1] (scaled as LPIPS scales its input).

    vgg_params: VGG16Features params (`jaxsd.losses.weights.load_vgg16`); layers: tap names
    (relu1_2 … relu5_3); layer_weights: one per layer (default 1 each).
    """
    check_taps(layers, "style layers")
    weights = [1.0] * len(layers) if layer_weights is None else list(layer_weights)
    if len(weights) != len(layers):
        raise InputError(f"style loss: {len(weights)} layer weights for {len(layers)} layers {list(layers)}")
    vgg = VGG16Features(taps=tuple(layers))
    both = vgg.apply({"params": vgg_params}, scale_input(jnp.concatenate([x, y], axis=0)))
    fx = {k: v[: x.shape[0]] for k, v in both.items()}
    fy = {k: v[x.shape[0]:] for k, v in both.items()}
    return gram_loss(fx, fy, dict(zip(layers, weights)))
