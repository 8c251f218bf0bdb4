"""`StableDiffusion`: txt2img and img2img over a loaded diffusers pipeline folder.

    pipe = StableDiffusion.from_folder("path/to/pipeline")
    images = pipe.generate(["a cat"], steps=20, guidance=7.5, sampler="dpmpp_2m", seed=0)   # uint8 [N,H,W,3]
    pipe.load_loras(["style.safetensors"], [0.7])   # LoRA files on the UNet and text encoders

Covers SD1.x, SD2.x (v-prediction comes from the scheduler config), SDXL (pooled
embeddings + micro-conditioning) and the T5 hybrid. Host work per call is
tokenizing, drawing the initial noise and building the sampler tables (cached per
(sampler, steps)); the rest is one jitted program per (GenerateSpec, shapes).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.convert.lora import LoraWeights
from jaxsd.diffusion.samplers import img2img_start, make_sampler, resolve_sampler_name
from jaxsd.errors import InputError
from jaxsd.host_memory import release_freed_host_memory
from jaxsd.models.token_merging import TokenMerging
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.models.vae import AutoencoderKL
from jaxsd.models.vae_tiling import TileSettings, tiled_decode
from jaxsd.pipelines import data_parallel
from jaxsd.pipelines.generate import GenerateSpec, compiled_generate, progress_hook, to_uint8
from jaxsd.pipelines.inpaint import inpaint_method, prepare_mask
from jaxsd.pipelines.loading import LoadedPipeline, load_pipeline
from jaxsd.pipelines.lora import apply_loras, lora_scales, read_loras
from jaxsd.text.prompts import PromptEmbeddings

logger = logging.getLogger(__name__)
# samplers whose tables take an eta (jaxsd/diffusion/samplers), with their default: DDIM deterministic,
# euler_a as diffusers (k-diffusion's eta = 1)
ETA_SAMPLERS = {"ddim": 0.0, "euler_a": 1.0}


def generation_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(initial-noise key, run key) of a seed. The run key splits into (VAE posterior sample, sampler noise)."""
    noise_key, run_key = jax.random.split(jax.random.key(seed))
    return noise_key, run_key


class StableDiffusion:
    """A generation pipeline over Flax params. See `generate`."""

    def __init__(self, pipe: LoadedPipeline, *, dtype=jnp.float32, attention_impl: str = "auto",
                 token_merging: TokenMerging | None = None):
        """token_merging: ToMe in the UNet's transformer blocks (None or ratio 0: off)."""
        self.pipe = pipe
        self.family = pipe.family
        self.dtype = dtype
        tm = token_merging if token_merging is not None and token_merging.active else None
        self.unet = UNet2DConditionModel(pipe.unet_config, dtype=dtype, attention_impl=attention_impl,
                                         token_merging=tm)
        self.vae = AutoencoderKL(pipe.vae_config, dtype=dtype)  # fp16 runs force_upcast VAEs in fp32
        self.vae_factor = pipe.vae_config.downscale
        self.text = pipe.text
        self._tables: dict[tuple, tuple] = {}
        self.last_compile_seconds = 0.0  # of the latest `generate` call (0 when its program was cached)
        self.last_run_seconds = 0.0
        self.loras: list[LoraWeights] = []
        self._unet_lora: dict | None = None
        self._replicated: tuple | None = None  # (devices, unet params, vae params, their copies on every device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, param_dtype=None, variant: str | None = None,
                    dtype=jnp.float32, attention_impl: str = "auto",
                    text_max_length: int | None = None, config_dir: str | os.PathLike | None = None,
                    vae_folder: str | os.PathLike | None = None,
                    token_merging: TokenMerging | None = None, weights: bool = True) -> StableDiffusion:
        """text_max_length: tokens prompts are padded to; None: the length the folder records.
        folder may be a single-file checkpoint (config_dir: as `load_pipeline`).
        dtype: compute dtype of every model; param_dtype: storage dtype of the weights (None: fp32).
        variant: weights variant, e.g. "fp16" (`*.fp16.safetensors`). vae_folder: a diffusers
        AutoencoderKL folder used instead of the pipeline's vae/ (e.g. an fp16-fix SDXL VAE).
        token_merging: as __init__. weights: False loads the UNet's and VAE's weights only at
        `load_weights()`, so `generate(..., compile_only=True)` compiles first (the lower peak memory)."""
        pipe = load_pipeline(folder, dtype=param_dtype, compute_dtype=dtype, variant=variant,
                             attention_impl=attention_impl, text_max_length=text_max_length, config_dir=config_dir,
                             vae_folder=vae_folder, weights=weights)
        return cls(pipe, dtype=dtype, attention_impl=attention_impl, token_merging=token_merging)

    def load_weights(self) -> None:
        """Read the UNet's and VAE's weights after `from_folder(weights=False)` (else nothing to do), then
        return the compile's freed heap to the OS first, so the weights do not land on top of it."""
        if not self.pipe.weights_loaded:
            release_freed_host_memory()
            self.pipe.load_weights()

    # ---- LoRA ---------------------------------------------------------------------

    def load_loras(self, files: Sequence[str | os.PathLike], scales: Sequence[float] | None = None) -> None:
        """Apply LoRA files (PEFT/diffusers or kohya, LoCon included) to the UNet and CLIP text encoders
        at `scales` (default 1.0 each), replacing any loaded before. An empty list removes them."""
        loras = read_loras(self.pipe, files)
        scales = lora_scales(len(loras), scales)
        self.loras = loras
        self.set_lora_scales(scales)

    def set_lora_scales(self, scales: Sequence[float]) -> None:
        """New scales for the loaded LoRA files (new values only: no recompilation)."""
        self._unet_lora = apply_loras(self.pipe, self.loras, lora_scales(len(self.loras), scales))

    # ---- compiled pieces ----------------------------------------------------------

    def sampler_tables(self, sampler: str, steps: int, eta: float | None = None):
        """(sampler, tables); eta (None: the sampler's default) is a table value (another eta: other
        tables, the same program)."""
        if sampler in ETA_SAMPLERS and eta is None:
            eta = ETA_SAMPLERS[sampler]
        key = (sampler, steps, eta)
        if key not in self._tables:
            options = {"eta": eta} if sampler in ETA_SAMPLERS else {}
            self._tables[key] = make_sampler(sampler, self.pipe.schedule, steps, **options)
        return self._tables[key]

    @property
    def default_size(self) -> tuple[int, int]:
        s = self.pipe.unet_config.sample_size or 64
        h, w = (s, s) if isinstance(s, int) else s
        return h * self.vae_factor, w * self.vae_factor

    # ---- generation ---------------------------------------------------------------

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        """diffusers' `latents` shape (NCHW) for n images of height × width."""
        return (n, self.pipe.vae_config.latent_channels, height // self.vae_factor, width // self.vae_factor)

    def check_size(self, height: int, width: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % self.vae_factor:
                raise InputError(f"{name} {v} must be a positive multiple of {self.vae_factor} (the VAE's "
                                 f"downscale factor): try {max(self.vae_factor, v // self.vae_factor * self.vae_factor)}")

    def generate(self, prompt: str | Sequence[str] | None = None, *,
                 negative_prompt: str | Sequence[str] | None = None,
                 prompt_2: str | Sequence[str] | None = None, negative_prompt_2: str | Sequence[str] | None = None,
                 prompt_embeds: PromptEmbeddings | None = None, negative_prompt_embeds: PromptEmbeddings | None = None,
                 clip_skip: int | None = None,
                 steps: int = 30, guidance: float = 7.5, guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m",
                 seed: int = 0, height: int | None = None, width: int | None = None, num_images: int = 1,
                 latents: np.ndarray | None = None, init_image: np.ndarray | None = None, strength: float = 0.8,
                 mask: np.ndarray | None = None, eta: float | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 tiled_vae: bool | TileSettings = False, return_latents: bool = False,
                 progress: Callable[[int], None] | None = None,
                 devices: Sequence[jax.Device] | None = None,
                 compile_only: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray] | None:
        """Generate images; returns uint8 [len(prompts) * num_images, H, W, 3] (prompt-major, as diffusers),
        and with return_latents also the final latents, NCHW float32 [N, C, H/f, W/f] (diffusers'
        output_type="latent": scaled, not decoded).

        prompt_2, negative_prompt_2: SDXL's second text encoder's prompts (default: prompt, negative_prompt).
        prompt_embeds, negative_prompt_embeds: instead of `prompt` / `negative_prompt`, both from
          `PromptEncoder.encode_with_negative` (one row per prompt, N = its batch): what diffusers calls
          by the same names. The text encoders are not used, so they may be unloaded (`self.text = None`).
        clip_skip: CLIP layers to skip from the end (diffusers' clip_skip; None = 0 = its default layer).
        latents: NCHW float32 initial noise [N, C, H/f, W/f] (diffusers' `latents`); default drawn from `seed`.
          With init_image it is the noise added to the image latents (diffusers draws it internally).
        sampler: a `jaxsd sample --scheduler` name or A1111 display name (docs/sampling.md), or "auto": the
          folder's own scheduler (scheduler_config.json's class and options).
        init_image: uint8 [H, W, 3] or [N, H, W, 3] → img2img with `strength` in [0, 1].
        mask: with init_image, inpainting: [H, W] or [N, H, W] in [0, 1], 1 (white) = repaint
          (jaxsd/pipelines/inpaint.py: an inpainting UNet, or a plain one by latent blending).
        eta: the noise of ddim (default 0 = deterministic) and euler_a (default 1 = diffusers'; 0 = plain
          Euler steps): k-diffusion's / A1111's eta. None = the sampler's default.
        original_size, crops_coords_top_left, target_size: SDXL micro-conditioning (default (H, W), (0, 0), (H, W)).
        tiled_vae: decode in overlapping tiles (True: diffusers' enable_tiling() settings) to bound memory.
        progress: called with the step index after every denoising step (once per device with `devices`).
        devices: split the batch over these devices (data parallel, jaxsd/pipelines/data_parallel.py; padded to
          a multiple of their count, the padding dropped). None or one device: the default single-device program.
        compile_only: compile (or find compiled) the program of these arguments and return None without
          running it; the UNet's and VAE's weights need not be loaded yet (`from_folder(weights=False)`),
          and a later call with the same shapes runs that program.
        Prompts, seed, guidance, rescale, clip skip, eta and strength are values of the compiled programs:
        changing them never recompiles.
        """
        if not (compile_only or self.pipe.weights_loaded):
            raise InputError("the UNet's and VAE's weights are not loaded yet (from_folder(weights=False)): call "
                             "load_weights() first, or generate(..., compile_only=True) to compile")
        sampler = resolve_sampler_name(sampler, self.pipe.schedule.config)  # A1111 names; auto: the folder's
        if eta and sampler not in ETA_SAMPLERS:
            raise InputError(f"eta={eta} applies to the {' and '.join(ETA_SAMPLERS)} samplers only (got sampler "
                             f"{sampler!r})")
        if eta is not None and not eta >= 0:
            raise InputError(f"eta must be >= 0 (0 = no added noise), got {eta}")
        if mask is not None and init_image is None:
            raise InputError("a mask needs the image to inpaint: give init_image (--init-image) too")
        inpaint = inpaint_method(self.pipe.unet_config.in_channels, self.pipe.vae_config.latent_channels) \
            if mask is not None else None
        if inpaint is None and self.pipe.unet_config.in_channels != self.pipe.vae_config.latent_channels:
            raise InputError(f"this UNet takes {self.pipe.unet_config.in_channels} input channels (an inpainting "
                             "UNet): give an init image and a mask (--init-image, --mask)")
        cond, uncond = self._embeddings(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                        prompt_2, negative_prompt_2, clip_skip)
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        img2img = init_image is not None
        sampler_obj, tables = self.sampler_tables(sampler, steps, eta)
        # second-order samplers make `order` model calls per step; the tables list calls (diffusers' layout)
        start = img2img_start(steps, strength) * sampler_obj.order if img2img else 0
        if img2img:
            init_image = self._check_init_image(init_image, height, width)
            height, width = height or init_image.shape[1], width or init_image.shape[2]
        dh, dw = self.default_size
        height, width = height or dh, width or dw
        self.check_size(height, width)
        n = cond.encoder_hidden_states.shape[0] * num_images
        cond, uncond = cond.repeat(num_images), uncond.repeat(num_images)

        noise_key, run_key = generation_keys(seed)
        context = jnp.concatenate([uncond.encoder_hidden_states, cond.encoder_hidden_states], axis=0)
        inputs = {"unet": self.pipe.unet_params, "unet_lora": self._unet_lora, "vae": self.pipe.vae_params,
                  "tables": tables, "key": run_key, "context": context,
                  "added": self._added_conditioning(cond, uncond, n, height, width, original_size,
                                                    crops_coords_top_left, target_size),
                  "guidance": jnp.float32(guidance), "guidance_rescale": jnp.float32(guidance_rescale),
                  "noise": self._initial_noise(noise_key, latents, n, height, width), "start": jnp.int32(start)}
        if img2img:
            image = jnp.asarray(init_image, jnp.float32) / 255.0 * 2.0 - 1.0
            inputs["image"] = jnp.broadcast_to(image, (n,) + image.shape[1:]) if image.shape[0] == 1 else image
            if inputs["image"].shape[0] != n:
                raise InputError(f"{init_image.shape[0]} init images for {n} outputs; give one image or {n}")
        if inpaint:
            inputs["mask"] = jnp.asarray(prepare_mask(mask, n, height, width))
        spec = GenerateSpec(sampler_obj, img2img and not inpaint, inpaint, decode=not tiled_vae)
        n_kept = None  # data parallel: the images before padding
        if devices is not None and len(devices) > 1:
            if compile_only:
                raise InputError("compile_only compiles the one-device program; give devices=None")
            mesh = data_parallel.generation_mesh(devices)
            inputs, n_kept = data_parallel.split_inputs(inputs, len(devices))
            inputs = data_parallel.place_inputs(inputs, mesh, self._replicated_params(mesh))
            fn, self.last_compile_seconds = data_parallel.compiled_data_parallel(
                self.unet, self.vae, self.pipe.vae_config, spec, inputs, mesh)
        else:
            fn, self.last_compile_seconds = compiled_generate(self.unet, self.vae, self.pipe.vae_config, spec, inputs)
        if compile_only:
            return None
        t0 = time.perf_counter()
        with progress_hook(progress):
            out = fn(inputs)
            if n_kept is not None:
                out = {k: v[:n_kept] for k, v in out.items()}
            if tiled_vae:
                settings = tiled_vae if isinstance(tiled_vae, TileSettings) else None
                decoded = tiled_decode(self.vae, self.pipe.vae_params,
                                       self.pipe.vae_config.unscale_latents(out["latents"]), settings)
                out["images"] = to_uint8(decoded)
            images = np.asarray(out["images"])
        self.last_run_seconds = time.perf_counter() - t0
        if return_latents:
            return images, np.asarray(out["latents"], np.float32).transpose(0, 3, 1, 2)
        return images

    def _replicated_params(self, mesh) -> dict:
        """The UNet and VAE params replicated over `mesh`'s devices, copied once per mesh (not per batch)."""
        devices, unet, vae = tuple(mesh.devices.flat), self.pipe.unet_params, self.pipe.vae_params
        cached = self._replicated
        if cached is None or cached[0] != devices or cached[1] is not unet or cached[2] is not vae:
            self._replicated = (devices, unet, vae, {"unet": data_parallel.replicate(unet, mesh),
                                                     "vae": data_parallel.replicate(vae, mesh)})
        return self._replicated[3]

    def _check_init_image(self, init_image: np.ndarray, height: int | None, width: int | None) -> np.ndarray:
        """init_image as uint8 [N, H, W, 3], checked against the requested size."""
        init_image = np.asarray(init_image)
        if init_image.ndim == 3:
            init_image = init_image[None]
        if init_image.ndim != 4 or init_image.shape[-1] != 3:
            raise InputError(f"init_image must be [H, W, 3] or [N, H, W, 3] RGB, got shape {init_image.shape}")
        height, width = height or init_image.shape[1], width or init_image.shape[2]
        if init_image.shape[1:3] != (height, width):
            raise InputError(f"init_image is {init_image.shape[2]}x{init_image.shape[1]} (WxH) but the run is "
                             f"{width}x{height}; resize it first")
        return init_image

    def _initial_noise(self, key: jax.Array, latents: np.ndarray | None, n: int, height: int,
                       width: int) -> jnp.ndarray:
        """Initial noise NHWC [n, h, w, C]: drawn from `key`, or the given NCHW `latents` (checked)."""
        shape = self.latent_shape(n, height, width)
        if latents is None:
            return jax.random.normal(key, (n, shape[2], shape[3], shape[1]), jnp.float32)
        latents = np.asarray(latents)
        if latents.shape != shape:
            raise InputError(f"latents have shape {latents.shape}; this run needs {shape} (NCHW float32: "
                             f"prompts x num_images = {n}, {shape[1]} latent channels, height/{self.vae_factor}, "
                             f"width/{self.vae_factor})")
        return jnp.asarray(latents.astype(np.float32).transpose(0, 2, 3, 1))

    def _added_conditioning(self, cond: PromptEmbeddings, uncond: PromptEmbeddings, n: int, height: int, width: int,
                            original_size, crops_coords_top_left, target_size) -> dict | None:
        """SDXL's added conditioning for [uncond; cond] (pooled text embeddings, micro-conditioning), else None."""
        if self.pipe.unet_config.addition_embed_type != "text_time":
            return None
        if cond.pooled is None:
            raise InputError("this UNet needs pooled text embeddings (SDXL) but the text encoders give none")
        ids = list(original_size or (height, width)) + list(crops_coords_top_left) + list(target_size or (height, width))
        return {"text_embeds": jnp.concatenate([uncond.pooled, cond.pooled], axis=0),
                "time_ids": jnp.broadcast_to(jnp.asarray(ids, jnp.float32), (2 * n, 6))}

    def _embeddings(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, prompt_2=None,
                    negative_prompt_2=None, clip_skip=None) -> tuple[PromptEmbeddings, PromptEmbeddings]:
        """(conditional, unconditional) embeddings, one row per prompt, from prompts or as given."""
        if prompt_embeds is None:
            if negative_prompt_embeds is not None:
                raise InputError("negative_prompt_embeds without prompt_embeds; give both, or prompts")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts:
                raise InputError("no prompt given")
            if self.text is None:
                raise InputError("this pipeline's text encoders were unloaded; pass prompt_embeds and "
                                 "negative_prompt_embeds instead of prompts")
            return self.text.encode_with_negative(prompts, negative_prompt, prompts_2=prompt_2,
                                                  negative_prompts_2=negative_prompt_2, clip_skip=clip_skip)
        if prompt is not None or negative_prompt is not None or prompt_2 is not None or negative_prompt_2 is not None:
            raise InputError("give prompts or prompt_embeds, not both")
        if clip_skip is not None:
            raise InputError("clip_skip applies to prompts; prompt_embeds are already encoded")
        if negative_prompt_embeds is None:
            raise InputError("prompt_embeds needs negative_prompt_embeds (classifier-free guidance uses both); "
                             "PromptEncoder.encode_with_negative makes the pair")
        got, want = negative_prompt_embeds.encoder_hidden_states.shape, prompt_embeds.encoder_hidden_states.shape
        if got != want:
            raise InputError(f"negative_prompt_embeds {got} and prompt_embeds {want} differ in shape")
        return prompt_embeds, negative_prompt_embeds
