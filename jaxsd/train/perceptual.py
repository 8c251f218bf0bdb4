"""Perceptual terms of the UNet objective (`loss.perceptual`): LPIPS and Gram style loss on the decoded x0 prediction.

For the samples of a batch at timesteps t <= `loss.perceptual.max_timestep`, on steps where step % `every` == 0:

    x̂0 = schedule.predict_x0(x_t, model output, t)                 (ε / v / sample prediction)
    image = VAE.decode(unscale_latents(x̂0))                        [B, H, W, 3], roughly in [-1, 1]
    target = VAE.decode(unscale_latents(x0))                         the batch's clean latents, decoded
    term = lpips_weight · masked_mean(LPIPS(image, target)) + style_weight · masked_mean(style(image, refs))

x0 is the latent the step noised (a posterior sample for a distribution cache), so the target image needs no extra
cache data: it is what the frozen VAE makes of the cached latents, not the original pixels (the cache holds none).
The masked mean is over the qualifying samples (0 when none qualify); the whole computation sits in a `lax.cond`
on "any sample qualifies", so steps off the `every` grid and batches of high timesteps pay no decode, and changing
either never recompiles. With gradient accumulation the mean is per micro-batch. Subset weights (`data.subsets`)
apply to the denoising loss only.

The frozen parts — the VAE decoder (+ post_quant_conv) of `data.cache.vae`, the VGG16 trunk (+ LPIPS heads) of
`loss.lpips`, and the style references' mean Gram matrices (computed once at start) — live in the train state's
frozen tree under "perceptual" (`frozen = {"unet": ..., "perceptual": {"vae", "vgg", "heads", "grams"}}`), stored
in the base dtype, sharded by `sharding.rules`, never checkpointed (reloaded on resume, `jaxsd.train.base`).
Metrics: loss_lpips and loss_style (unweighted masked means, 0 on steps without the terms), perceptual_samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import Config
from jaxsd.config_losses import PerceptualLossConfig, style_reference_files
from jaxsd.errors import InputError
from jaxsd.losses.lpips import LPIPS, normalize_channels, scale_input
from jaxsd.losses.style import gram_distance, gram_matrix
from jaxsd.losses.taps import TAPS
from jaxsd.losses.vgg import VGG16Features
from jaxsd.models.params import abstract_params
from jaxsd.models.vae import AutoencoderKL, VAEConfig
from jaxsd.models.vae import example_inputs as vae_inputs
from jaxsd.train.sharding import param_shardings

PERCEPTUAL = "perceptual"  # key of the perceptual params in the train state's frozen tree
DECODER_PARTS = ("decoder", "post_quant_conv")  # what of the VAE the terms run
METRICS = ("loss_lpips", "loss_style")


@dataclasses.dataclass(frozen=True)
class StepPerceptual:
    """The perceptual terms of a run, before any weight is read. shapes / logical: {"vae", "vgg", "heads"
    (LPIPS only), "grams" (style only)} abstract params and their logical PartitionSpecs."""

    config: PerceptualLossConfig
    vae_folder: Path
    vae: AutoencoderKL
    vgg_taps: tuple[str, ...]
    style_layers: dict[str, float]  # layer -> weight (style only)
    shapes: dict[str, Any]
    logical: dict[str, Any]

    @property
    def lpips(self) -> bool:
        return self.config.lpips_weight > 0

    @property
    def style(self) -> bool:
        return self.config.style_weight > 0

    def stored_shapes(self, dtype: Any) -> dict[str, Any]:
        """`shapes` as the state stores them: in `dtype` (the base dtype), the Gram matrices in fp32."""
        return {k: v if k == "grams" else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), v)
                for k, v in self.shapes.items()}

    def shardings(self, mesh: Any, rules: Mapping[str, Any]) -> dict[str, Any]:
        """Shardings of the frozen "perceptual" tree, by `rules` as the UNet's (the Gram matrices replicated)."""
        out = {k: param_shardings(self.shapes[k], self.logical[k], mesh, dict(rules)) for k in self.shapes
               if k != "grams"}
        if "grams" in self.shapes:
            out["grams"] = jax.tree.map(lambda _: NamedSharding(mesh, P()), self.shapes["grams"])
        return out

    def mask(self, step: jax.Array, t: jax.Array) -> jax.Array:
        """float32 [B]: 1 for the samples that get the terms at this (0-based) step: t <= max_timestep, and
        step % every == 0."""
        on = (step % self.config.every) == 0
        return ((t <= self.config.max_timestep) & on).astype(jnp.float32)

    def images(self, params: Mapping[str, Any], latents: jax.Array) -> jax.Array:
        """Diffusion-model latents [B, h, w, C] → decoded images [B, H, W, 3] (fp32)."""
        z = self.vae.config.unscale_latents(latents.astype(jnp.float32))
        return self.vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)

    def per_sample(self, params: Mapping[str, Any], x0: jax.Array, x0_pred: jax.Array) -> dict[str, jax.Array]:
        """{"loss_lpips" / "loss_style": [B]} of the decoded prediction (gradients flow through it alone)."""
        image = self.images(params, x0_pred)
        vgg = VGG16Features(taps=self.vgg_taps, dtype=self.vae.dtype)
        feats = vgg.apply({"params": params["vgg"]}, scale_input(image))
        out = {}
        if self.lpips:
            target = jax.lax.stop_gradient(self.images(params, x0))
            target_feats = jax.lax.stop_gradient(vgg.apply({"params": params["vgg"]}, scale_input(target)))
            out["loss_lpips"] = lpips_from_features(params["heads"], feats, target_feats)
        if self.style:
            out["loss_style"] = gram_distance(feats, params["grams"], self.style_layers)
        return out

    def term(self, frozen: Mapping[str, Any], x0: jax.Array, x0_pred: jax.Array,
             draws: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(weighted term, metrics) of the diffusion loss's `extra_loss`: x0, x0_pred [B, h, w, C] latents;
        draws["perceptual"] [B] this step's `mask`."""
        params, mask = frozen[PERCEPTUAL], draws["perceptual"]
        names = [n for n, on in zip(METRICS, (self.lpips, self.style)) if on]

        def compute(_):
            per = self.per_sample(params, x0, x0_pred)
            # where, not a product: a left-out sample's value may be inf (a noisy x0 prediction) and inf · 0 is NaN
            return {n: jnp.sum(jnp.where(mask > 0, per[n], 0.0)) / jnp.maximum(jnp.sum(mask), 1.0) for n in names}

        def skip(_):
            return {n: jnp.zeros([], jnp.float32) for n in names}

        terms = jax.lax.cond(jnp.any(mask > 0), compute, skip, None)
        weights = {"loss_lpips": self.config.lpips_weight, "loss_style": self.config.style_weight}
        total = sum(weights[n] * terms[n] for n in names)
        return total, {**terms, "perceptual_samples": jnp.sum(mask)}


def lpips_from_features(heads: Mapping[str, Any], f0: Mapping[str, jax.Array],
                        f1: Mapping[str, jax.Array]) -> jax.Array:
    """LPIPS [B] from the two images' VGG16 taps (all five) and the heads {"lin0".."lin4": {"kernel": [C, 1]}}:
    `jaxsd.losses.lpips.LPIPS` with the trunk run apart, so the target's features need no backward pass."""
    total = 0.0
    for i, tap in enumerate(TAPS):
        diff = (normalize_channels(f0[tap].astype(jnp.float32)) - normalize_channels(f1[tap].astype(jnp.float32))) ** 2
        kernel = heads[f"lin{i}"]["kernel"].astype(jnp.float32)
        total = total + jnp.mean(jnp.einsum("bhwc,co->bhw", diff, kernel, precision=jax.lax.Precision.HIGHEST),
                                 axis=(1, 2))
    return total


def step_perceptual(cfg: Config) -> StepPerceptual | None:
    """The perceptual terms of `cfg`'s step (None when loss.perceptual is off)."""
    pc = cfg.loss.perceptual
    if not pc.active:
        return None
    from jaxsd.convert.folder import read_config
    from jaxsd.data.model_encoders import vae_folder

    folder = vae_folder(cfg.data.cache.vae)
    vae = AutoencoderKL(VAEConfig.from_diffusers(read_config(folder)), dtype=jnp.dtype(cfg.model.dtype),
                        param_dtype=jnp.dtype(cfg.model.param_dtype), attention_impl=cfg.model.attention_impl,
                        remat_policy=cfg.model.remat_policy)
    shapes, logical = abstract_params(vae, *vae_inputs(vae.config))
    shapes = {"vae": {k: shapes[k] for k in DECODER_PARTS if k in shapes}}
    logical = {"vae": {k: logical[k] for k in DECODER_PARTS if k in logical}}
    st = cfg.loss.style
    style_layers = {}
    if pc.style_weight > 0:
        style_layers = dict(zip(st.layers, st.layer_weights or [1.0] * len(st.layers)))
    taps = tuple(TAPS) if pc.lpips_weight > 0 else tuple(st.layers)
    image = np.zeros((1, 32, 32, 3), np.float32)
    vgg_shapes, vgg_logical = abstract_params(VGG16Features(taps=taps), image)
    shapes["vgg"], logical["vgg"] = vgg_shapes, vgg_logical
    if pc.lpips_weight > 0:
        lp_shapes, lp_logical = abstract_params(LPIPS(), image, image)
        shapes["heads"] = {k: v for k, v in lp_shapes.items() if k != "vgg"}
        logical["heads"] = {k: v for k, v in lp_logical.items() if k != "vgg"}
    if style_layers:
        out = jax.eval_shape(VGG16Features(taps=tuple(style_layers)).apply, {"params": vgg_shapes}, image)
        shapes["grams"] = {k: jax.ShapeDtypeStruct((v.shape[-1],) * 2, jnp.float32) for k, v in out.items()}
        logical["grams"] = {k: P(None, None) for k in out}
    return StepPerceptual(pc, folder, vae, taps, style_layers, shapes, logical)


def load_perceptual(cfg: Config, perceptual: StepPerceptual, dtype: Any, shardings: Mapping[str, Any]) -> dict:
    """The frozen "perceptual" tree, read from local files in `dtype` (Gram matrices fp32) and placed with
    `shardings` (`StepPerceptual.shardings`)."""
    from jaxsd.convert.vae import load_vae
    from jaxsd.losses.weights import load_lpips, load_vgg16, read_state

    lc = cfg.loss.lpips
    _, vae = load_vae(perceptual.vae_folder, dtype=dtype, variant=cfg.data.cache.variant or None)
    params = {"vae": {k: vae[k] for k in perceptual.shapes["vae"]}}
    if perceptual.lpips:
        lpips = load_lpips(lc.weights, lc.heads, allow_pickle=lc.allow_pickle)
        vgg = lpips.pop("vgg")
        params["heads"] = lpips
    else:
        vgg = load_vgg16(read_state(lc.weights, allow_pickle=lc.allow_pickle, what="loss.lpips.weights (VGG16 "
                                    "backbone)"), source=str(lc.weights))
    params["vgg"] = {k: vgg[k] for k in perceptual.shapes["vgg"]}  # only the convs up to the deepest tap
    params = jax.tree.map(lambda x: np.asarray(x, dtype), params)  # host arrays: each device takes its part
    if perceptual.style:
        grams = reference_grams(params["vgg"], style_reference_files(list(cfg.loss.style.references)),
                                tuple(perceptual.style_layers), cfg.data.image.resolution)
        params["grams"] = jax.tree.map(np.asarray, jax.device_get(grams))
    return jax.device_put(params, shardings)


def reference_grams(vgg: Mapping[str, Any], files: list[Path], layers: tuple[str, ...], size: int) -> dict:
    """{layer: [C, C] fp32}: the mean Gram matrix over the style references, each resized to cover size × size and
    centre-cropped (as the cache prepares training images), in [-1, 1]."""
    from jaxsd.data.images import decode, prepare, read_bytes, to_rgb

    grams_of = jax.jit(lambda p, x: {k: gram_matrix(f)[0] for k, f in VGG16Features(taps=layers).apply(
        {"params": p}, scale_input(x)).items()})
    total = None
    for path in files:
        try:
            image, _ = to_rgb(decode(read_bytes(path)))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for a damaged or non-image file
            raise InputError(f"loss.style.references: cannot read {path} as an image ({type(e).__name__}: {e})") from None
        pixels = prepare(image, size, size).pixels[None]
        grams = grams_of(vgg, jnp.asarray(pixels))
        total = grams if total is None else jax.tree.map(jnp.add, total, grams)
    return jax.tree.map(lambda g: (g / len(files)).astype(jnp.float32), total)


__all__ = ["PERCEPTUAL", "StepPerceptual", "load_perceptual", "lpips_from_features", "reference_grams",
           "step_perceptual"]
