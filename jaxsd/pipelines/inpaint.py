"""Inpainting, as diffusers' `StableDiffusionInpaintPipeline`: repaint where the mask is white.

Two methods, chosen by the UNet:

* ``"concat"`` — an inpainting UNet (9 input channels = 4 latents + 1 mask + 4 masked-image
  latents): the mask at latent resolution and the VAE latents of the image with the repainted
  region blacked out (set to 0 in [-1, 1]) are concatenated to the latents at every step.
* ``"blend"`` — a plain 4-channel UNet: after every step, the region to keep is replaced by the
  image latents noised to the next step's level (the clean latents after the last step).

Start: strength 1 begins from pure noise (× the sampler's init sigma), any lower strength from the
image latents noised to the first step run, as diffusers' inpaint `prepare_latents`. The mask is
binarised at 0.5 and brought to latent size by nearest-neighbour sampling (`torch`'s default
`interpolate`), as diffusers' mask processor does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.diffusion.samplers import Sampler, Tables, noise_to_start
from jaxsd.errors import InputError

METHODS = ("concat", "blend")


def inpaint_method(unet_in_channels: int, latent_channels: int) -> str:
    """"concat" for an inpainting UNet (latents + mask + masked-image latents), "blend" for a plain one."""
    if unet_in_channels == 2 * latent_channels + 1:
        return "concat"
    if unet_in_channels == latent_channels:
        return "blend"
    raise InputError(f"a UNet with {unet_in_channels} input channels cannot inpaint {latent_channels}-channel "
                     f"latents: it needs {latent_channels} (plain) or {2 * latent_channels + 1} (an inpainting UNet)")


def prepare_mask(mask: np.ndarray, n: int, height: int, width: int) -> np.ndarray:
    """A mask in [0, 1] ([H, W], [H, W, 1] or [N, H, W]; white/1 = repaint) → binary float32 [n, H, W, 1]."""
    mask = np.asarray(mask, np.float32)
    given = mask.shape
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[1:] != (height, width):
        raise InputError(f"mask has shape {given}; this run needs [{height}, {width}] or [N, {height}, {width}] "
                         "(the init image's size)")
    if mask.shape[0] not in (1, n):
        raise InputError(f"{mask.shape[0]} masks for {n} outputs; give one mask or {n}")
    if mask.min() < 0 or mask.max() > 1:
        raise InputError(f"mask values must be in [0, 1] (white = 1 = repaint), got [{mask.min()}, {mask.max()}]")
    binary = (mask >= 0.5).astype(np.float32)
    return np.broadcast_to(binary, (n, height, width))[..., None].copy()


def inpaint_setup(method: str, tables: Tables, inputs: dict, z0: jnp.ndarray, noise: jnp.ndarray, x: jnp.ndarray,
                  encode: Callable[[jnp.ndarray, jax.Array], jnp.ndarray], masked_key: jax.Array,
                  factor: int) -> tuple[jnp.ndarray, Tables, jnp.ndarray | None]:
    """(start latents, tables, extra UNet input [2N,h,w,1+C] or None) inside the jitted generation.

    x: the img2img start (z0 noised to step `start`); strength 1 (start 0) uses pure noise instead.
    encode(images, key): scaled VAE latents. factor: the VAE's downscale.
    """
    if method not in METHODS:
        raise ValueError(f"inpaint method {method!r}; one of {METHODS}")
    mask = inputs["mask"]  # [N,H,W,1] binary
    mask_latent = mask[:, ::factor, ::factor, :]  # nearest-neighbour downscale by an integer factor
    x = jnp.where(inputs["start"] == 0, noise * tables["init_sigma"], x)
    if method == "blend":
        return x, {**tables, "inpaint": {"mask": mask_latent, "x0": z0, "noise": noise}}, None
    masked_latents = encode(inputs["image"] * (mask < 0.5), masked_key)
    extra = jnp.concatenate([mask_latent, masked_latents], axis=-1)
    return x, tables, jnp.concatenate([extra, extra], axis=0)  # the same for [uncond; cond]


@dataclasses.dataclass(frozen=True)
class InpaintBlend(Sampler):
    """`inner`'s steps, each followed by diffusers' 4-channel inpainting blend: latents outside the mask
    become the image latents at the next step's noise level (`tables["inpaint"]`: mask, x0, noise)."""

    inner: Sampler

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def stochastic(self) -> bool:
        return self.inner.stochastic

    def init_state(self, x):
        return self.inner.init_state(x)

    def model_input(self, tables: Tables, i, x):
        return self.inner.model_input(tables, i, x)

    def step(self, state, model_output, tables: Tables, i, noise):
        new = dict(self.inner.step(state, model_output, tables, i, noise))
        blend = tables["inpaint"]
        # the image noised to step i+1's level; after the last step (i+1 = n) the clean latents
        proper = noise_to_start(tables, blend["x0"], blend["noise"], i + 1)
        new["x"] = (1 - blend["mask"]) * proper + blend["mask"] * new["x"]
        return new


__all__ = ["METHODS", "InpaintBlend", "inpaint_method", "inpaint_setup", "prepare_mask"]
