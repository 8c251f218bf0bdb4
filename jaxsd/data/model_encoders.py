"""The real encoders for `jaxsd cache`, and the specs a trainer checks a cache against.

`vae_encoder` wraps a diffusers VAE folder (jaxsd/convert/vae.py) as an
`Encoder`; `expected_specs(cfg)` computes, without loading any model, the
manifest sections a cache made under `cfg` must have — what `jaxsd train` passes
to `verify_manifest` / `Loader`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from jaxsd.convert.folder import read_config
from jaxsd.data.config import DataConfig
from jaxsd.data.encoders import Encoder, latent_spec, text_spec, token_spec
from jaxsd.data.manifest import combine_fingerprints, fingerprint_folder
from jaxsd.errors import ConfigError, InputError, InputNotFoundError

# Pipeline subfolders of each text conditioning, in the order they are fingerprinted.
TEXT_COMPONENTS = {
    "clip": ("text_encoder", "tokenizer"),
    "sdxl": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "t5": ("text_encoder", "tokenizer"),
    "t5_projected": ("text_encoder", "tokenizer", "text_projection"),
}
# The tokenizer folders of each family: what a token-id cache (data.cache.text_mode=tokens) is made with.
TOKENIZERS = {"clip": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2"), "t5": ("tokenizer",),
              "t5_projected": ("tokenizer",)}


def text_root(cfg: DataConfig) -> Path:
    """`data.cache.text_encoder` as a folder: itself, or a single-file checkpoint's folder view (its text
    encoders, and the project's copies of the standard CLIP tokenizers: jaxsd/convert/single_file)."""
    from jaxsd.convert.single_file.to_folder import model_folder

    return model_folder(cfg.cache.text_encoder)


def vae_folder(path: str | os.PathLike, key: str = "data.cache.vae") -> Path:
    """A VAE component folder: `path` itself, or `path/vae` for a pipeline folder (or a single-file
    checkpoint's, through its folder view). key: the config key that named it (for the error)."""
    from jaxsd.convert.single_file.to_folder import model_folder

    path = model_folder(path)
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    if (path / "config.json").is_file():
        return path
    raise InputNotFoundError(f"{key}={str(path)!r}: neither a VAE folder (config.json + weights), "
                             "a pipeline folder with vae/ nor a single-file .safetensors checkpoint")


def vae_spec(cfg: DataConfig) -> dict:
    """The "latents" manifest section for `cfg.cache.vae` under `cfg` (reads config.json + fingerprints)."""
    if not cfg.cache.vae:
        raise ConfigError("data.cache.vae is not set: the VAE folder that makes (or made) the cached latents")
    folder = vae_folder(cfg.cache.vae)
    conf = read_config(folder)
    return latent_spec(fingerprint=fingerprint_folder(folder), scaling_factor=conf.get("scaling_factor", 0.18215),
                       shift_factor=conf.get("shift_factor"), latent_channels=conf.get("latent_channels", 4), cfg=cfg,
                       latents_mean=conf.get("latents_mean"), latents_std=conf.get("latents_std"))


def vae_encoder(cfg: DataConfig) -> Encoder:
    """The configured VAE as a caching `Encoder` (fp32 compute; outputs in diffusion-model latent space)."""
    from jaxsd.convert.vae import load_vae
    from jaxsd.models.vae import AutoencoderKL

    folder = vae_folder(cfg.cache.vae)
    dtype = jnp.dtype(cfg.cache.compute_dtype)
    config, params = load_vae(folder, dtype=dtype, variant=cfg.cache.variant or None)
    model = AutoencoderKL(config, dtype=dtype, param_dtype=dtype)
    for side in (cfg.image.resolution, cfg.image.buckets.step if cfg.image.buckets.enabled else cfg.image.resolution):
        if side % config.downscale:
            raise InputError(f"image sides must be multiples of the VAE's downscale factor {config.downscale}; "
                             f"data.image.resolution / buckets.step gives {side}")

    def apply(p, inputs):
        posterior = model.apply({"params": p}, inputs["pixels"], method="encode")
        mean = config.scale_latents(posterior.mean.astype(jnp.float32))
        return {"latent_mean": mean, "latent_logvar": config.scale_logvar(posterior.logvar.astype(jnp.float32))}

    return Encoder(vae_spec(cfg), params, apply)


def text_family(cfg: DataConfig) -> str:
    """The conditioning family ("clip", "sdxl", "t5", "t5_projected") of `cfg`'s text cache:
    `data.cache.text`, or for `text: tokens` the family of the `text_encoder` folder's layout."""
    if cfg.cache.text != "tokens":
        return cfg.cache.text
    from jaxsd.text.prompts import guess_kind

    if not cfg.cache.text_encoder:
        raise ConfigError("data.cache.text=tokens reads the model family from data.cache.text_encoder, which is "
                          "not set (or name the family: data.cache.text=clip|sdxl|t5|t5_projected with "
                          "data.cache.text_mode=tokens)")
    return guess_kind(text_root(cfg))


def _text_components(cfg: DataConfig) -> list[Path]:
    root = text_root(cfg)
    family = text_family(cfg)
    names = TEXT_COMPONENTS[family]
    if (root / names[0]).is_dir():
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise InputNotFoundError(f"data.cache.text_encoder={str(root)!r} lacks {', '.join(missing)} "
                                     f"(needed for data.cache.text={family!r})")
        return [root / n for n in names]
    if (root / "config.json").is_file() and len(names) == 2:
        return [root]  # a single text-encoder folder holding its tokenizer files too
    raise InputNotFoundError(f"data.cache.text_encoder={str(root)!r}: expected a pipeline folder with "
                             f"{', '.join(names)}")


def _tokenizer_folders(cfg: DataConfig) -> list[Path]:
    """The tokenizer folders a token-id cache is made with (tokenizer/, and tokenizer_2/ for SDXL)."""
    root = text_root(cfg)
    names = TOKENIZERS[text_family(cfg)]
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise InputNotFoundError(f"data.cache.text_encoder={str(root)!r} lacks {', '.join(missing)}: a token-id "
                                 "cache (data.cache.text_mode=tokens) needs the pipeline folder's tokenizer "
                                 "folders")
    return [root / n for n in names]


def text_producer(cfg: DataConfig, encoder_config: dict) -> str:
    """Sidecar suffix naming the text conditioning: clip_l / clip_h / clip_g, sdxl_te, t5xxl, ...;
    for token ids: clip_ids, sdxl_ids, t5_ids."""
    kind = text_family(cfg)
    if cfg.cache.tokens:
        return ("t5" if kind.startswith("t5") else kind) + "_ids"
    if kind == "sdxl":
        return "sdxl_te"
    width = encoder_config.get("hidden_size") or encoder_config.get("d_model") or 0
    if kind == "clip":
        return {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}.get(width, f"clip_{width}")
    name = "t5xxl" if width == 4096 else f"t5_{width}"
    return name + ("_proj" if kind == "t5_projected" else "")


DEFAULT_MAX_LENGTH = {"clip": 77, "sdxl": 77, "t5": 256, "t5_projected": 256}


def max_length(cfg: DataConfig) -> int:
    return cfg.cache.max_length or DEFAULT_MAX_LENGTH[text_family(cfg)]


def text_encoder_spec(cfg: DataConfig) -> dict:
    """The "text" manifest section for `cfg.cache.text_encoder` / `cfg.cache.text` (/ `text_mode`)."""
    if not cfg.cache.text_encoder:
        raise ConfigError("data.cache.text_encoder is not set: the pipeline folder whose text encoder(s) "
                          "make (or made) the cached text embeddings")
    if cfg.cache.tokens:
        folders = _tokenizer_folders(cfg)
        return token_spec(producer=text_producer(cfg, {}), max_length=max_length(cfg), cfg=cfg,
                          tokenizers={f.name: fingerprint_folder(f) for f in folders})
    comps = _text_components(cfg)
    producer = text_producer(cfg, read_config(comps[0]))
    return text_spec(producer=producer, fingerprint=combine_fingerprints([fingerprint_folder(c) for c in comps]),
                     max_length=max_length(cfg), cfg=cfg, conditioning=text_family(cfg))


def expected_specs(cfg: DataConfig) -> tuple[dict | None, dict | None]:
    """(latents spec, text spec) a cache made under `cfg` must have; None where not configured."""
    return (vae_spec(cfg) if cfg.cache.vae else None,
            text_encoder_spec(cfg) if cfg.cache.text_encoder else None)


def _check_lengths(tokenizers, length: int, where: str) -> None:
    for tok in tokenizers:  # one truncation summary at the end of the run, not a warning per batch
        tok.warn_each_call = False
        if tok.max_length != length:
            raise InputError(f"{where}: tokenizer length {tok.max_length} != data.cache.max_length {length}")


def _truncation_summary(tokenizer, length: int):
    def summary():
        stats = tokenizer.truncation
        return stats.summary(length) if stats.truncated else None
    return summary


def text_encoder(cfg: DataConfig) -> Encoder:
    """The configured text conditioning as a caching `Encoder`: embeddings, or (data.cache.text_mode=tokens)
    token ids.

    Embeddings are `jaxsd.text.encode.encode_token_ids` over `tokenize(captions)` with the pipeline's
    text encoders — the computation of `PromptEncoder.encode(captions)` (no clip-skip).
    """
    if cfg.cache.tokens:
        return token_encoder(cfg)
    from functools import partial

    from jaxsd.text.encode import encode_token_ids, tokenize
    from jaxsd.text.prompts import PromptEncoder

    kind = text_family(cfg)
    length = max_length(cfg)
    pe = PromptEncoder.from_pipeline(text_root(cfg), kind, max_length=length if kind.startswith("t5") else None,
                                     variant=cfg.cache.variant or None, dtype=jnp.dtype(cfg.cache.compute_dtype))
    _check_lengths(pe.tokenizers, length, cfg.cache.text_encoder)
    return Encoder(text_encoder_spec(cfg), pe.params, partial(encode_token_ids, pe.encoders),
                   lambda captions: tokenize(pe.tokenizers, list(captions)),
                   _truncation_summary(pe.tokenizers[0], length))


def token_encoder(cfg: DataConfig) -> Encoder:
    """The configured tokenizers as a host-only caching `Encoder` (no apply): each caption's token dict
    of `jaxsd.text.encode.tokenize` — input_ids / attention_mask [L] int32 (+ "_2" keys for SDXL)."""
    from jaxsd.text.encode import tokenize
    from jaxsd.text.tokenizers import load_tokenizer

    length = max_length(cfg)
    t5 = text_family(cfg).startswith("t5")
    tokenizers = [load_tokenizer(f, max_length=length if t5 else None) for f in _tokenizer_folders(cfg)]
    _check_lengths(tokenizers, length, cfg.cache.text_encoder)
    return Encoder(text_encoder_spec(cfg), None, None, lambda captions: tokenize(tokenizers, list(captions)),
                   _truncation_summary(tokenizers[0], length))
