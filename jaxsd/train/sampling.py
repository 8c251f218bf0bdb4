"""Sample grids during `jaxsd train` (`logging.sample_every`).

Every `sample_every` steps (never at step 0) the UNet being trained — its EMA params when
`train.ema.enabled`, else the current params — generates `logging.sample_prompts` through
`StableDiffusion.generate` with `sample_seed`, so the grids of a run differ only by training.
Process 0 writes <run_dir>/samples/step_000123.png (local or gs://, through epath) (one labelled row per prompt,
`sample_images_per_prompt` columns) and the TensorBoard image `samples/ema` or `samples/params`.

Components: VAE, text encoder(s), tokenizer(s) and scheduler come from the pipeline folder
`jaxsd.config.sample_components_folder` names (`logging.sample_components`, else a pipeline
`model.pretrained`); that folder's own UNet is never loaded. Prompts are padded to the length the
UNet trains with: a T5 cache's `data.cache.max_length`, not the folder's tokenizer default. The scheduler keeps its spacing and
offsets, but its betas and prediction type are the `diffusion` section's: they are what the UNet learns.
Every process loads and checks the components at start-up, so a bad folder fails before step 1
everywhere instead of at step `sample_every` on one process. The prompts are encoded then, once, and
the text encoders unloaded before the train state exists: they would otherwise stay resident for the
whole run (SDXL's two CLIPs: 3.3 GB fp32; a T5-XXL hybrid: 19 GB).

When the text encoders train (adapters: `lora.text_encoder`; fine-tuned: `train.text_encoder: full`), the
prompts are encoded again at every grid by the train state's text encoders (EMA or current, as the UNet), through the
same `PromptEncoder.encode_with_negative`; the components' own text encoders only check at start-up
that the embeddings fit the UNet.

Multi-process / sharded params: one jitted reshard gathers the params to a replicated layout; it is a
collective, so every process calls `TrainingSampler.__call__`. Process 0 then generates on its first
local device; the others go on and wait for it in the next step's collectives. Cost: one full copy of
the UNet params per device while sampling.

With `logging.sample_clip` (a CLIPModel folder, loaded at start-up and kept for the run) each grid's
images are scored against their prompts (`jaxsd.metrics.clip_score`, as `jaxsd eval --clip`) and the mean
logged as the scalar `samples/clip_score` (metrics.jsonl and TensorBoard).

Training is not disturbed: the train state is only read (sampling happens between steps, before the
state is donated again), the generation's randomness comes from `sample_seed` alone, and the data
iterator is not touched — resumed runs stay bitwise identical. The reshard is jitted once here and the
generation program is compiled at the first sampling step and then reused from generate.py's cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import Config, DiffusionConfig, LoggingConfig, sample_components_folder
from jaxsd.errors import ConfigError, InputError
from jaxsd.metrics.clip_score import CLIPScorer
from jaxsd.models.unet import UNetConfig
from jaxsd.pipelines.grids import label_grid
from jaxsd.pipelines.loading import LoadedPipeline, load_pipeline
from jaxsd.pipelines.pipeline import StableDiffusion
from jaxsd.text.encode import ENCODER_NAMES
from jaxsd.text.prompts import PromptEmbeddings
from jaxsd.train.run_dir import run_path
from jaxsd.train.text import StepText
from jaxsd.train.trainable import merge_params

log = logging.getLogger("jaxsd.train")
LABEL_CHARS = 48  # longer prompts are cut in the grid's label column (the image keeps the full prompt)
GRID_CELL_PIXELS = 256  # small images are upscaled (nearest) towards this size so a grid of 16-px tests is visible


def load_components(folder: str | Path, unet_config: UNetConfig, diffusion: DiffusionConfig, *,
                    variant: str | None = None, dtype: Any = jnp.float32, attention_impl: str = "auto",
                    text_max_length: int | None = None) -> LoadedPipeline:
    """A pipeline folder's VAE, text side and scheduler around the trained UNet's architecture.

    unet_params is None: the caller sets the trained params for each generation. The folder's
    scheduler gives spacing/offsets; the training schedule decides betas and prediction type.
    text_max_length: the training text's token length (`training_text_length`); None: the folder's.
    """
    return load_pipeline(folder, compute_dtype=dtype, variant=variant, attention_impl=attention_impl,
                         unet=(unet_config, None), scheduler_overrides=diffusion.to_scheduler_config(),
                         text_max_length=text_max_length)


def training_text_length(cfg: Config) -> int | None:
    """The token length the UNet is trained with when it is not the components' own: a T5 text cache's
    `data.cache.max_length` (default 256; checked against every root's manifest by the loader).
    None (the components' length) for CLIP caches (fixed 77) and synthetic data."""
    if cfg.train.data_source != "cache":
        return None
    from jaxsd.data.model_encoders import max_length, text_family
    return max_length(cfg.data) if text_family(cfg.data).startswith("t5") else None


def check_compatible(pipe: StableDiffusion, cond: PromptEmbeddings, height: int, width: int) -> None:
    """Refuse components that cannot condition or decode this UNet (raises ValueError naming both sides).

    cond: the sample prompts' embeddings from these components' text encoders."""
    unet, vae, where = pipe.pipe.unet_config, pipe.pipe.vae_config, f"sample-grid components {pipe.pipe.folder}"
    if vae.latent_channels != unet.in_channels:
        raise InputError(f"{where}: its VAE has {vae.latent_channels} latent channels but the trained UNet takes "
                         f"in_channels={unet.in_channels}; use the components of the model being trained")
    pipe.check_size(height, width)
    levels = 2 ** (len(unet.block_out_channels) - 1) * pipe.vae_factor
    if height % levels or width % levels:
        raise ConfigError(f"logging.sample_height/width = {height}x{width}: must be multiples of {levels} (VAE factor "
                          f"{pipe.vae_factor} × the UNet's {len(unet.block_out_channels) - 1} downsamplings)")
    width_ctx = cond.encoder_hidden_states.shape[-1]
    if isinstance(unet.cross_attention_dim, int) and width_ctx != unet.cross_attention_dim:
        raise InputError(f"{where}: its text encoders give {width_ctx}-wide embeddings but the trained UNet has "
                         f"cross_attention_dim={unet.cross_attention_dim}; use the components of the model being "
                         "trained")
    if unet.addition_embed_type == "text_time" and cond.pooled is None:
        raise InputError(f"{where}: the trained UNet is an SDXL one (addition_embed_type text_time) and needs "
                         "pooled text embeddings, but these text encoders give none (use an SDXL pipeline folder)")


def _label(prompt: str) -> str:
    return prompt if len(prompt) <= LABEL_CHARS else prompt[:LABEL_CHARS - 1] + "…"


@dataclasses.dataclass(frozen=True)
class StateText:
    """Text encoders that train (adapters or in full): what the train state holds of them.

    step_text: the step's encoders and tokenizers (`jaxsd.train.text.StepText`); parts(trainable, frozen)
    -> (params, {"lora": ...}) within the state's trees (`StatePlan.text_parts`)."""

    step_text: StepText
    parts: Callable[[Any, Any], tuple[dict, dict | None]]


class TrainingSampler:
    """Writes a sample grid when `due(step)`; build with `TrainingSampler.from_config` (None when off)."""

    def __init__(self, cfg: LoggingConfig, pipe: StableDiffusion, run_dir: str | os.PathLike, *, ema: bool, mesh: Any,
                 merge: Callable[[Any, Any], Any] = merge_params, text: StateText | None = None,
                 scorer: CLIPScorer | None = None):
        """Encodes the sample prompts once, then unloads `pipe`'s text encoders (they are not needed again).
        text: the prompts are encoded again at each grid by the state's text encoders (see module doc).
        scorer: each grid's CLIP score against its prompts is logged (`logging.sample_clip`)."""
        self.cfg, self.pipe, self.ema, self.scorer = cfg, pipe, ema, scorer
        negative = cfg.sample_negative_prompt or None
        self.embeddings = pipe.text.encode_with_negative(list(cfg.sample_prompts), negative)
        pipe.text = pipe.pipe.text = None
        self.out_dir = run_path(run_dir) / "samples"
        self.tag = "samples/ema" if ema else "samples/params"
        self.which = "EMA params" if ema else "current params (train.ema is off)"
        dh, dw = pipe.default_size
        self.height, self.width = cfg.sample_height or dh, cfg.sample_width or dw
        # One reshard program for the whole run: (trainable, frozen) → the full UNet tree (LoRA: the
        # adapters folded in), replicated.
        self._gather = jax.jit(merge, out_shardings=NamedSharding(mesh, P()))
        self._text = None if text is None else (text.step_text.prompt_encoder(),
                                                jax.jit(text.parts, out_shardings=NamedSharding(mesh, P())))

    @classmethod
    def from_config(cls, cfg: Config, unet_config: UNetConfig, run_dir: str | os.PathLike, mesh: Any,
                    merge: Callable[[Any, Any], Any] = merge_params,
                    text: StateText | None = None) -> TrainingSampler | None:
        """Load and check the components (before training starts); None when logging.sample_every is 0.
        VAE training (model.kind vae): its reconstruction grids instead (jaxsd/train/vae_sampling.py)."""
        if not cfg.logging.sample_every:
            return None
        if cfg.model.kind == "vae":
            from jaxsd.train.vae_sampling import ReconstructionSampler
            return ReconstructionSampler.from_config(cfg, unet_config, run_dir, mesh, merge)  # a VAEConfig
        folder = sample_components_folder(cfg)
        if folder is None:  # load_config refuses this already; a hand-built Config may not have been checked
            raise ValueError("logging.sample_every > 0 needs logging.sample_components or a pipeline model.pretrained")
        variant = cfg.model.variant if folder == cfg.model.pretrained else None
        dtype = jnp.dtype(cfg.model.dtype)
        components = load_components(folder, unet_config, cfg.diffusion, variant=variant, dtype=dtype,
                                     attention_impl=cfg.model.attention_impl,
                                     text_max_length=training_text_length(cfg))
        pipe = StableDiffusion(components, dtype=dtype, attention_impl=cfg.model.attention_impl,
                               token_merging=cfg.model.token_merging)
        scorer = CLIPScorer.from_folder(cfg.logging.sample_clip) if cfg.logging.sample_clip else None
        sampler = cls(cfg.logging, pipe, run_dir, ema=cfg.train.ema.enabled, mesh=mesh, merge=merge, text=text,
                      scorer=scorer)
        check_compatible(sampler.pipe, sampler.embeddings[0], sampler.height, sampler.width)
        log.info("sample grids every %d steps from %s with the %s: %d prompts × %d (padded to %d tokens), %dx%d px, "
                 "%d %s steps, CFG %g, seed %d", cfg.logging.sample_every, folder, sampler.which,
                 len(cfg.logging.sample_prompts), cfg.logging.sample_images_per_prompt,
                 sampler.embeddings[0].encoder_hidden_states.shape[1], sampler.width, sampler.height,
                 cfg.logging.sample_steps, cfg.logging.sample_sampler, cfg.logging.sample_guidance_scale,
                 cfg.logging.sample_seed)
        return sampler

    def due(self, step: int) -> bool:
        return step > 0 and step % self.cfg.sample_every == 0

    def path(self, step: int) -> epath.Path:
        return self.out_dir / f"step_{step:06d}.png"

    def generate(self, params: Any) -> np.ndarray:
        """uint8 [prompts × images_per_prompt, H, W, 3] from full UNet params (prompt-major)."""
        c = self.cfg
        self.pipe.pipe.unet_params = params
        try:
            cond, uncond = self.embeddings
            return self.pipe.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, steps=c.sample_steps,
                                      guidance=c.sample_guidance_scale, sampler=c.sample_sampler, seed=c.sample_seed,
                                      height=self.height, width=self.width, num_images=c.sample_images_per_prompt)
        finally:
            self.pipe.pipe.unet_params = None  # never keep a reference to buffers the next step donates

    def _encode_prompts(self, params: dict, variables: dict | None) -> tuple[PromptEmbeddings, PromptEmbeddings]:
        """(cond, uncond) of the sample prompts by the state's text encoders `params` with their adapters."""
        encoder = self._text[0]
        lora = (variables or {}).get("lora", {})
        encoder.params = params
        for name, comp in zip(ENCODER_NAMES, encoder.components):
            comp.lora = lora.get(name)
        try:
            return encoder.encode_with_negative(list(self.cfg.sample_prompts), self.cfg.sample_negative_prompt or None)
        finally:  # no reference to buffers the next step donates
            encoder.params = {}
            for comp in encoder.components:
                comp.lora = None

    def __call__(self, step: int, state: Any, logger: Any) -> epath.Path | None:
        """Sample at `step` (call on every process); returns the grid's path on process 0, else None."""
        t0 = time.perf_counter()
        trained = state.ema if self.ema else state.params
        params = self._gather(trained, state.frozen)
        text = None if self._text is None else self._text[1](trained, state.frozen)
        if jax.process_index() != 0:
            return None
        local = jax.tree.map(lambda x: x.addressable_data(0), params)
        if text is not None:
            self.embeddings = self._encode_prompts(*jax.tree.map(lambda x: x.addressable_data(0), text))
        images = self.generate(local)
        k = self.cfg.sample_images_per_prompt
        rows = [(_label(p), list(images[i * k:(i + 1) * k])) for i, p in enumerate(self.cfg.sample_prompts)]
        grid = label_grid(rows, scale=max(1, GRID_CELL_PIXELS // max(self.height, self.width)))
        path = self.path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # PIL given the path itself would write gs://... to the local disk
            grid.save(f, format="PNG")
        logger.log_image(self.tag, np.asarray(grid), step)
        if self.scorer is not None:  # prompt-major, as the images
            prompts = [p for p in self.cfg.sample_prompts for _ in range(k)]
            logger.log_scalars(step, {"samples/clip_score": float(self.scorer.clip_score(list(images), prompts).mean())})
        logger.message(f"step {step}: sample grid of the {self.which} → {path} ({time.perf_counter() - t0:.1f} s, "
                       f"of which compile {self.pipe.last_compile_seconds:.1f} s)")
        log.info("step %d: sample grid of the %s written to %s (TensorBoard %s)", step, self.which, path, self.tag)
        return path
