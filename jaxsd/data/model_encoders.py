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
from jaxsd.data.encoders import Encoder, latent_spec, text_spec
from jaxsd.data.manifest import combine_fingerprints, fingerprint_folder
from jaxsd.errors import ConfigError, InputError, InputNotFoundError

# Pipeline subfolders of each text conditioning, in the order they are fingerprinted.
TEXT_COMPONENTS = {
    "clip": ("text_encoder", "tokenizer"),
    "sdxl": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "t5": ("text_encoder", "tokenizer"),
    "t5_projected": ("text_encoder", "tokenizer", "text_projection"),
}


def vae_folder(path: str | os.PathLike) -> Path:
    """A VAE component folder: `path` itself, or `path/vae` for a pipeline folder."""
    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    if (path / "config.json").is_file():
        return path
    raise InputNotFoundError(f"data.cache.vae={str(path)!r}: neither a VAE folder (config.json + weights) "
                             "nor a pipeline folder with vae/")


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


def _text_components(cfg: DataConfig) -> list[Path]:
    root = Path(cfg.cache.text_encoder)
    names = TEXT_COMPONENTS[cfg.cache.text]
    if (root / names[0]).is_dir():
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise InputNotFoundError(f"data.cache.text_encoder={str(root)!r} lacks {', '.join(missing)} "
                                     f"(needed for data.cache.text={cfg.cache.text!r})")
        return [root / n for n in names]
    if (root / "config.json").is_file() and len(names) == 2:
        return [root]  # a single text-encoder folder holding its tokenizer files too
    raise InputNotFoundError(f"data.cache.text_encoder={str(root)!r}: expected a pipeline folder with "
                             f"{', '.join(names)}")


def text_producer(cfg: DataConfig, encoder_config: dict) -> str:
    """Sidecar suffix naming the text conditioning: clip_l / clip_h / clip_g, sdxl_te, t5xxl, ..."""
    kind = cfg.cache.text
    if kind == "sdxl":
        return "sdxl_te"
    width = encoder_config.get("hidden_size") or encoder_config.get("d_model") or 0
    if kind == "clip":
        return {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}.get(width, f"clip_{width}")
    name = "t5xxl" if width == 4096 else f"t5_{width}"
    return name + ("_proj" if kind == "t5_projected" else "")


DEFAULT_MAX_LENGTH = {"clip": 77, "sdxl": 77, "t5": 256, "t5_projected": 256}


def max_length(cfg: DataConfig) -> int:
    return cfg.cache.max_length or DEFAULT_MAX_LENGTH[cfg.cache.text]


def text_encoder_spec(cfg: DataConfig) -> dict:
    """The "text" manifest section for `cfg.cache.text_encoder` / `cfg.cache.text`."""
    if not cfg.cache.text_encoder:
        raise ConfigError("data.cache.text_encoder is not set: the pipeline folder whose text encoder(s) "
                          "make (or made) the cached text embeddings")
    comps = _text_components(cfg)
    producer = text_producer(cfg, read_config(comps[0]))
    return text_spec(producer=producer, fingerprint=combine_fingerprints([fingerprint_folder(c) for c in comps]),
                     max_length=max_length(cfg), cfg=cfg, conditioning=cfg.cache.text)


def expected_specs(cfg: DataConfig) -> tuple[dict | None, dict | None]:
    """(latents spec, text spec) a cache made under `cfg` must have; None where not configured."""
    return (vae_spec(cfg) if cfg.cache.vae else None,
            text_encoder_spec(cfg) if cfg.cache.text_encoder else None)


def text_encoder(cfg: DataConfig) -> Encoder:
    """The configured text conditioning (jaxsd/text/prompts.py's components) as a caching `Encoder`.

    The same computation as `PromptEncoder.encode(captions)` (no clip-skip), but as one pure
    function of (params, token ids) so the caching engine can jit and shard it:
    clip: last hidden state; sdxl: both encoders' penultimate hidden states concatenated +
    encoder 2's projected embeds as "pooled"; t5: last hidden state (t5_projected: through
    the projection).
    """
    from jaxsd.models.clip import CLIPTextModel
    from jaxsd.text.prompts import PromptEncoder

    kind = cfg.cache.text
    length = max_length(cfg)
    pe = PromptEncoder.from_pipeline(cfg.cache.text_encoder, kind, max_length=length if kind.startswith("t5") else None,
                                     variant=cfg.cache.variant or None, dtype=jnp.dtype(cfg.cache.compute_dtype))
    comps = pe.components
    for c in comps:  # one truncation summary at the end of the run, not a warning per batch
        c.tokenizer.warn_each_call = False
    for c in comps:
        if c.tokenizer.max_length != length:
            raise InputError(f"{cfg.cache.text_encoder}: tokenizer length {c.tokenizer.max_length} != "
                             f"data.cache.max_length {length}")
    # diffusers gives CLIP a padding mask only when its config asks for it (`use_attention_mask`)
    use_mask = [not isinstance(c.model, CLIPTextModel) or bool(dict(c.model.config.extra).get("use_attention_mask"))
                for c in comps]
    params = {"components": [c.params for c in comps], "projection": pe.projection[1] if pe.projection else None}

    def prepare(captions):
        out = {}
        for i, c in enumerate(comps):
            batch = c.tokenizer(list(captions))
            out[f"ids{i}"], out[f"mask{i}"] = batch.input_ids, batch.attention_mask
        return out

    def run(p, inputs, i):
        mask = inputs[f"mask{i}"] if use_mask[i] else None
        return comps[i].model.apply({"params": p["components"][i]}, inputs[f"ids{i}"], mask)

    def apply(p, inputs):
        if kind == "clip":
            return {"encoder_hidden_states": run(p, inputs, 0).last_hidden_state}
        if kind == "sdxl":
            a, b = run(p, inputs, 0), run(p, inputs, 1)
            h = jnp.concatenate([a.hidden_states[-2], b.hidden_states[-2].astype(a.hidden_states[-2].dtype)], -1)
            return {"encoder_hidden_states": h, "pooled": b.text_embeds}
        h = run(p, inputs, 0).last_hidden_state
        if kind == "t5_projected":
            h = pe.projection[0].apply({"params": p["projection"]}, h)
        return {"encoder_hidden_states": h}

    def summary():
        stats = comps[0].tokenizer.truncation
        return stats.summary(length) if stats.truncated else None

    return Encoder(text_encoder_spec(cfg), params, apply, prepare, summary)
