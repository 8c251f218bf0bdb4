"""What `jaxsd cache` runs: a model-agnostic encoder and the specs that name its output.

An `Encoder` is a pure function of (params, inputs) plus host-side input
preparation, and a `spec` dict that goes into the cache manifest verbatim. The
caching engine batches, pads, jits and shards it over the local devices; it
never needs to know whether it runs a VAE, CLIP or T5. The concrete encoders
(diffusers VAE folders, the text engineer's prompt encoders) are built in
`jaxsd/data/model_encoders.py`.

Spec dicts are also what a trainer passes to `verify_manifest`:
`latent_spec(...)` / `text_spec(...)` / `token_spec(...)` build them from the model it
trains with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxsd.data.config import DataConfig

# inputs: name -> [B, ...] numpy; outputs: name -> [B, ...] arrays.
ApplyFn = Callable[[Any, Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class Encoder:
    """A batch encoder for caching.

    spec: JSON-able description of the producer; must contain "suffix" (sidecar suffix
      without the dot). Stored in the manifest and checked on resume and by trainers.
    apply: pure, jittable `apply(params, inputs) -> outputs`, batch-leading arrays; None for a
      host-only encoder whose `prepare` output is what is cached (token ids).
      For latents: inputs {"pixels": [B,H,W,3] in [-1,1]} -> {"latent_mean", "latent_logvar"}
      [B,h,w,C], ALREADY in diffusion-model space (`VAEConfig.scale_latents` / `scale_logvar`):
      mean = (mu - shift) * scale, logvar = log(sigma^2) + 2 log(scale) — with latents_mean/std
      mean = (mu - m) * scale / s, logvar = log(sigma^2) + 2 log(scale / s) per channel.
      For text: inputs from `prepare` -> {"encoder_hidden_states": [B,L,D], optional "pooled": [B,P]}.
    prepare: host-side `prepare(batch_of_raw_inputs) -> inputs` (e.g. tokenization);
      None for latents (pixels go in as they are). Integer arrays are cached as they are, floating
      ones in `data.cache.dtype`.
    """

    spec: Mapping[str, Any]
    params: Any
    apply: ApplyFn | None
    prepare: Callable[[Sequence[Any]], Mapping[str, np.ndarray]] | None = None
    summary: Callable[[], str | None] | None = None  # one line logged after a caching run (e.g. truncation)

    @property
    def suffix(self) -> str:
        return str(self.spec["suffix"])


def default_latent_suffix(scaling_factor: float, latent_channels: int, fingerprint: str) -> str:
    """Sidecar suffix naming the VAE family: sd_vae, sdxl_vae, sd3_vae, flux_vae, else vae_<hash>."""
    known = {(4, 0.18215): "sd_vae", (4, 0.13025): "sdxl_vae", (16, 1.5305): "sd3_vae", (16, 0.3611): "flux_vae"}
    for (ch, scale), name in known.items():
        if latent_channels == ch and abs(scaling_factor - scale) < 1e-6:
            return name
    return f"vae_{fingerprint[:8]}"


def latent_spec(*, fingerprint: str, scaling_factor: float, shift_factor: float | None, latent_channels: int,
                cfg: DataConfig, latents_mean: Sequence[float] | None = None,
                latents_std: Sequence[float] | None = None) -> dict:
    """The manifest's "latents" section for a VAE (by fingerprint/config) under `cfg`'s preprocessing.
    latents_mean / latents_std: the VAE config's per-channel statistics (None when it has none)."""
    b = cfg.image.buckets
    return {
        "suffix": cfg.cache.latent_suffix or default_latent_suffix(scaling_factor, latent_channels, fingerprint),
        "vae_fingerprint": fingerprint,
        "scaling_factor": float(scaling_factor),
        "shift_factor": float(shift_factor or 0.0),
        "latent_channels": int(latent_channels),
        # per-channel normalisation (SDXL-pipeline VAEs); None for the usual scaling_factor-only VAEs
        "latents_mean": None if latents_mean is None else [float(v) for v in latents_mean],
        "latents_std": None if latents_std is None else [float(v) for v in latents_std],
        "mode": cfg.cache.latents,
        "dtype": cfg.cache.dtype,
        "compute_dtype": cfg.cache.compute_dtype,
        "resolution": cfg.image.resolution,
        "buckets": [b.min_side, b.max_side, b.step, b.max_aspect] if b.enabled else None,
        "crop": cfg.image.crop,
        "flip": cfg.image.random_flip,
        # seeds only matter (and only invalidate a cache) where randomness is used
        "crop_seed": cfg.image.seed if cfg.image.crop == "random" else None,
        "sample_seed": cfg.cache.seed if cfg.cache.latents == "sample" else None,
    }


def text_spec(*, producer: str, fingerprint: str, max_length: int, cfg: DataConfig, **details) -> dict:
    """The manifest's "text" section. producer: "clip_l", "sdxl_te", "t5xxl", ...; details: e.g.
    projected=True for a T5 passed through a hybrid's projection."""
    return {"suffix": cfg.cache.text_suffix or producer, "producer": producer, "encoder_fingerprint": fingerprint,
            "max_length": int(max_length), "dtype": cfg.cache.dtype, "compute_dtype": cfg.cache.compute_dtype,
            **details}


def token_spec(*, producer: str, tokenizers: Mapping[str, str], max_length: int, cfg: DataConfig) -> dict:
    """The manifest's "text" section of a token-id cache. tokenizers: folder name ("tokenizer",
    "tokenizer_2") -> fingerprint. The ids depend on the tokenizers and the length only, so neither
    the encoder weights nor data.cache.dtype / compute_dtype are part of it."""
    return {"suffix": cfg.cache.text_suffix or producer, "producer": producer, "mode": "tokens",
            "tokenizers": {name: {"fingerprint": fp, "max_length": int(max_length)} for name, fp in tokenizers.items()},
            "max_length": int(max_length), "dtype": "int32"}
