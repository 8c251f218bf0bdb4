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
from jaxsd.diffusion.samplers import check_sampler_name, img2img_start, make_sampler
from jaxsd.errors import InputError
from jaxsd.models.token_merging import TokenMerging
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.models.vae import AutoencoderKL
from jaxsd.pipelines.generate import GenerateSpec, compiled_generate, progress_hook
from jaxsd.pipelines.loading import LoadedPipeline, load_pipeline
from jaxsd.pipelines.lora import apply_loras, lora_scales, read_loras
from jaxsd.text.prompts import PromptEmbeddings

logger = logging.getLogger(__name__)


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
        tm = token_merging if token_merging is not None and token_merging.active else None
        self.unet = UNet2DConditionModel(pipe.unet_config, dtype=dtype, attention_impl=attention_impl,
                                         token_merging=tm)
        self.vae = AutoencoderKL(pipe.vae_config)
        self.vae_factor = pipe.vae_config.downscale
        self.text = pipe.text
        self._tables: dict[tuple, tuple] = {}
        self.last_compile_seconds = 0.0  # of the latest `generate` call (0 when its program was cached)
        self.last_run_seconds = 0.0
        self.loras: list[LoraWeights] = []
        self._unet_lora: dict | None = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, param_dtype=None, variant: str | None = None,
                    dtype=jnp.float32, attention_impl: str = "auto", text_max_length: int | None = None,
                    config_dir: str | os.PathLike | None = None,
                    token_merging: TokenMerging | None = None) -> StableDiffusion:
        """text_max_length: tokens prompts are padded to; None: the length the folder records.
        folder may be a single-file checkpoint (config_dir: as `load_pipeline`). token_merging: as __init__."""
        pipe = load_pipeline(folder, dtype=param_dtype, compute_dtype=dtype, variant=variant,
                             attention_impl=attention_impl, text_max_length=text_max_length, config_dir=config_dir)
        return cls(pipe, dtype=dtype, attention_impl=attention_impl, token_merging=token_merging)

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

    def sampler_tables(self, sampler: str, steps: int, eta: float = 0.0):
        key = (sampler, steps, eta)
        if key not in self._tables:
            options = {"eta": eta} if sampler == "ddim" else {}
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
        return (n, self.pipe.unet_config.in_channels, height // self.vae_factor, width // self.vae_factor)

    def check_size(self, height: int, width: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % self.vae_factor:
                raise InputError(f"{name} {v} must be a positive multiple of {self.vae_factor} (the VAE's "
                                 f"downscale factor): try {max(self.vae_factor, v // self.vae_factor * self.vae_factor)}")

    def generate(self, prompt: str | Sequence[str] | None = None, *,
                 negative_prompt: str | Sequence[str] | None = None,
                 prompt_embeds: PromptEmbeddings | None = None, negative_prompt_embeds: PromptEmbeddings | None = None,
                 steps: int = 30, guidance: float = 7.5, guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m",
                 seed: int = 0, height: int | None = None, width: int | None = None, num_images: int = 1,
                 latents: np.ndarray | None = None, init_image: np.ndarray | None = None, strength: float = 0.8,
                 eta: float = 0.0, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Generate images; returns uint8 [len(prompts) * num_images, H, W, 3] (prompt-major, as diffusers).

        prompt_embeds, negative_prompt_embeds: instead of `prompt` / `negative_prompt`, both from
          `PromptEncoder.encode_with_negative` (one row per prompt, N = its batch): what diffusers calls
          by the same names. The text encoders are not used, so they may be unloaded (`self.text = None`).

        latents: NCHW float32 initial noise [N, C, H/f, W/f] (diffusers' `latents`); default drawn from `seed`.
          With init_image it is the noise added to the image latents (diffusers draws it internally).
        init_image: uint8 [H, W, 3] or [N, H, W, 3] → img2img with `strength` in [0, 1].
        original_size, crops_coords_top_left, target_size: SDXL micro-conditioning (default (H, W), (0, 0), (H, W)).
        progress: called with the step index after every denoising step.
        """
        check_sampler_name(sampler)
        if eta and sampler != "ddim":
            raise InputError(f"eta={eta} applies to the ddim sampler only (got sampler {sampler!r})")
        cond, uncond = self._embeddings(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        img2img = init_image is not None
        start = img2img_start(steps, strength) if img2img else 0
        if init_image is not None:
            init_image = np.asarray(init_image)
            if init_image.ndim == 3:
                init_image = init_image[None]
            if init_image.ndim != 4 or init_image.shape[-1] != 3:
                raise InputError(f"init_image must be [H, W, 3] or [N, H, W, 3] RGB, got shape {init_image.shape}")
            height = height or init_image.shape[1]
            width = width or init_image.shape[2]
            if init_image.shape[1:3] != (height, width):
                raise InputError(f"init_image is {init_image.shape[2]}x{init_image.shape[1]} (WxH) but the run is "
                                 f"{width}x{height}; resize it first")
        dh, dw = self.default_size
        height, width = height or dh, width or dw
        self.check_size(height, width)
        n = cond.encoder_hidden_states.shape[0] * num_images
        cond, uncond = cond.repeat(num_images), uncond.repeat(num_images)

        noise_key, run_key = generation_keys(seed)
        shape = self.latent_shape(n, height, width)
        if latents is None:
            noise = jax.random.normal(noise_key, (n, shape[2], shape[3], shape[1]), jnp.float32)
        else:
            latents = np.asarray(latents)
            if latents.shape != shape:
                raise InputError(f"latents have shape {latents.shape}; this run needs {shape} (NCHW float32: "
                                 f"prompts x num_images = {n}, {shape[1]} latent channels, height/{self.vae_factor}, "
                                 f"width/{self.vae_factor})")
            noise = jnp.asarray(latents.astype(np.float32).transpose(0, 2, 3, 1))

        context = jnp.concatenate([uncond.encoder_hidden_states, cond.encoder_hidden_states], axis=0)
        added = None
        if self.pipe.unet_config.addition_embed_type == "text_time":
            if cond.pooled is None:
                raise InputError("this UNet needs pooled text embeddings (SDXL) but the text encoders give none")
            ids = list(original_size or (height, width)) + list(crops_coords_top_left) + list(target_size or (height, width))
            time_ids = jnp.broadcast_to(jnp.asarray(ids, jnp.float32), (2 * n, 6))
            added = {"text_embeds": jnp.concatenate([uncond.pooled, cond.pooled], axis=0),
                     "time_ids": time_ids}

        sampler_obj, tables = self.sampler_tables(sampler, steps, eta)
        inputs = {"unet": self.pipe.unet_params, "unet_lora": self._unet_lora, "vae": self.pipe.vae_params,
                  "tables": tables, "key": run_key,
                  "context": context, "added": added, "guidance": jnp.float32(guidance),
                  "guidance_rescale": jnp.float32(guidance_rescale), "noise": noise, "start": jnp.int32(start)}
        if img2img:
            image = jnp.asarray(init_image, jnp.float32) / 255.0 * 2.0 - 1.0
            inputs["image"] = jnp.broadcast_to(image, (n,) + image.shape[1:]) if image.shape[0] == 1 else image
            if inputs["image"].shape[0] != n:
                raise InputError(f"{init_image.shape[0]} init images for {n} outputs; give one image or {n}")
        fn, self.last_compile_seconds = compiled_generate(self.unet, self.vae, self.pipe.vae_config,
                                                          GenerateSpec(sampler_obj, img2img), inputs)
        t0 = time.perf_counter()
        with progress_hook(progress):
            images = np.asarray(fn(inputs))
        self.last_run_seconds = time.perf_counter() - t0
        return images

    def _embeddings(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                    ) -> tuple[PromptEmbeddings, PromptEmbeddings]:
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
            return self.text.encode_with_negative(prompts, negative_prompt)
        if prompt is not None or negative_prompt is not None:
            raise InputError("give prompts or prompt_embeds, not both")
        if negative_prompt_embeds is None:
            raise InputError("prompt_embeds needs negative_prompt_embeds (classifier-free guidance uses both); "
                             "PromptEncoder.encode_with_negative makes the pair")
        got, want = negative_prompt_embeds.encoder_hidden_states.shape, prompt_embeds.encoder_hidden_states.shape
        if got != want:
            raise InputError(f"negative_prompt_embeds {got} and prompt_embeds {want} differ in shape")
        return prompt_embeds, negative_prompt_embeds
