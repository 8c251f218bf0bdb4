"""The jitted generation function: (img2img / inpaint encode) → guided denoising loop → VAE decode → uint8.

One program per static `GenerateSpec` (sampler algorithm, img2img or not, inpainting method, decode
in the program or not) and model architecture. Everything a user changes between images — prompt embeddings,
seed (a key array), guidance scale, guidance rescale, strength (as a start index),
the scheduler tables (including the prediction type), LoRA weights and their scales — is a
traced argument, so only new shapes (batch, resolution, steps, LoRA ranks) compile again.
Classifier-free guidance always runs the UNet on [uncond; cond] (diffusers skips the uncond
half when guidance ≤ 1; with the traced scale we keep one program and get
uncond + 1·(cond - uncond) ≈ cond).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from jaxsd.diffusion.samplers import Sampler, denoise, noise_to_start
from jaxsd.host_memory import release_freed_host_memory
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.models.vae import AutoencoderKL, VAEConfig
from jaxsd.pipelines.inpaint import InpaintBlend, inpaint_setup


def rescale_guidance(guided: jnp.ndarray, cond: jnp.ndarray, rescale: jnp.ndarray) -> jnp.ndarray:
    """Guidance rescale (arXiv 2305.08891 §3.4): match the guided prediction's std to the conditional one's,
    then mix by `rescale` (0 = plain CFG). Per sample, std over all other axes (unbiased, as torch.std)."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    # where(): rescale 0 must give plain CFG even if the std ratio is not finite
    return jnp.where(rescale > 0, rescale * rescaled + (1 - rescale) * guided, guided)


def to_uint8(images: jnp.ndarray) -> jnp.ndarray:
    """[-1, 1] float images → uint8 exactly as diffusers' postprocess + numpy_to_pil."""
    x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1)
    return jnp.round(x * 255).astype(jnp.uint8)


def split_run_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(VAE posterior-sample key, sampler-noise key) of a generation's run key."""
    encode_key, sample_key = jax.random.split(key)
    return encode_key, sample_key


@dataclasses.dataclass(frozen=True)
class GenerateSpec:
    """The static part of a generation: what decides the compiled program (besides shapes).

    inpaint: None, "concat" (an inpainting UNet: mask and masked-image latents are extra input
      channels) or "blend" (a plain UNet: the unmasked region is reset to the noised image latents
      after every step). Either implies img2img. decode: False returns latents only (the caller
      decodes, e.g. tiled: jaxsd/models/vae_tiling.py).
    """

    sampler: Sampler
    img2img: bool = False
    inpaint: str | None = None
    decode: bool = True


# The host function the compiled loop calls after every step. Compiled programs are shared between
# pipelines (see `compiled_generate`), so the hook is looked up at call time, not baked in.
_progress_hook: Callable[[int], None] | None = None


def _report_step(i) -> None:
    if _progress_hook is not None:
        _progress_hook(int(i))


@contextlib.contextmanager
def progress_hook(fn: Callable[[int], None] | None) -> Iterator[None]:
    """Call `fn(step_index)` after every denoising step of generations run inside this block."""
    global _progress_hook
    previous, _progress_hook = _progress_hook, fn
    try:
        yield
    finally:
        _progress_hook = previous


def make_generate(unet: UNet2DConditionModel, vae: AutoencoderKL, vae_config: VAEConfig,
                  spec: GenerateSpec) -> Callable:
    """Build `generate(inputs) -> {"latents": [N,h,w,C] float32 (final, scaled as the UNet sees them),
    "images": uint8 [N,H,W,3] (when spec.decode)}` (pure; jit it, see `compiled_generate`).

    inputs (a dict, every entry traced):
      unet, vae: params.   unet_lora: None, or the UNet's "lora" variables (LoRA files at their scales;
      `jaxsd.models.lora`).   tables: the sampler's tables.   key: PRNG key (posterior sample, sampler noise).
      context [2N,L,D]: [uncond; cond] encoder hidden states.   added: None | {"text_embeds" [2N,P],
      "time_ids" [2N,6]}.   guidance, guidance_rescale: float32 scalars.
      noise [N,h,w,C]: initial noise (txt2img: scaled by the sampler's init sigma; img2img: added to
      the image latents at the level of step `start`).   start: int32 first step (0 for txt2img).
      image [N,H,W,3] in [-1,1] (img2img and inpainting).   mask [N,H,W,1] (inpainting: 1 = repaint, binary).
    """
    sampler = spec.sampler

    def generate(inputs: dict) -> dict:
        def encode(image: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
            """Scaled latents of images [N,H,W,3] in [-1,1], sampled from the posterior (as diffusers)."""
            posterior = vae.apply({"params": inputs["vae"]}, image, method="encode")
            return vae_config.scale_latents(posterior.sample(key).astype(jnp.float32))

        tables, key = inputs["tables"], inputs["key"]
        encode_key, sample_key = split_run_key(key)
        noise = inputs["noise"].astype(jnp.float32)
        extra = None  # inpainting's extra UNet input channels [2N,h,w,1+C]
        if spec.img2img or spec.inpaint:
            z0 = encode(inputs["image"], encode_key)
            x = noise_to_start(tables, z0, noise, inputs["start"])
            start = inputs["start"]
            if spec.inpaint:
                x, tables, extra = inpaint_setup(spec.inpaint, tables, inputs, z0, noise, x, encode,
                                                 jax.random.fold_in(encode_key, 1), vae_config.downscale)
        else:
            x = noise * tables["init_sigma"]
            start = 0
        context, added = inputs["context"], inputs.get("added")
        guidance, rescale = inputs["guidance"], inputs["guidance_rescale"]
        variables = {"params": inputs["unet"]}
        if inputs.get("unet_lora") is not None:
            variables["lora"] = inputs["unet_lora"]

        def model_fn(x_in: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
            both = jnp.concatenate([x_in, x_in], axis=0)
            if extra is not None:  # diffusers' order: latents, mask, masked-image latents
                both = jnp.concatenate([both, extra.astype(both.dtype)], axis=-1)
            out = unet.apply(variables, both, t, context, added).astype(jnp.float32)
            uncond, cond = jnp.split(out, 2, axis=0)
            guided = uncond + guidance * (cond - uncond)
            return rescale_guidance(guided, cond, rescale)

        step_sampler = InpaintBlend(sampler) if spec.inpaint == "blend" else sampler
        x = denoise(step_sampler, tables, model_fn, x, start=start, key=sample_key, progress=_report_step)
        if not spec.decode:
            return {"latents": x}
        images = vae.apply({"params": inputs["vae"]}, vae_config.unscale_latents(x), method="decode")
        return {"latents": x, "images": to_uint8(images)}

    return generate


_COMPILED: dict[tuple, Any] = {}


def signature(tree: Any) -> tuple:
    """What a jit cache keys on for all-traced inputs: the tree structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef,) + tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def compiled_generate(unet: UNet2DConditionModel, vae: AutoencoderKL, vae_config: VAEConfig, spec: GenerateSpec,
                      inputs: dict) -> tuple[Callable, float]:
    """(compiled generate for these input shapes, seconds spent compiling — 0 when cached).

    Ahead-of-time compiled so `jaxsd sample` can report compile and generation time apart;
    cached per process on (models' configs, spec, input signature), so another pipeline over
    the same architecture reuses the program.
    """
    key = (unet.config, unet.dtype, unet.attention_impl, unet.token_merging, vae_config, spec, signature(inputs))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    compiled = jax.jit(make_generate(unet, vae, vae_config, spec)).lower(inputs).compile()
    # compiling leaves freed heap behind (`small` at 256 px: 0.2 GB) that the first run's
    # temporaries would not reuse: the peak RSS grows by it unless it goes back to the OS
    release_freed_host_memory()
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - t0
