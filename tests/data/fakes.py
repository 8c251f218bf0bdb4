"""Tiny stand-in encoders saved as real component folders (config.json + safetensors), so caching,
fingerprints and manifests are exercised for real without waiting for a VAE/CLIP to compile."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.data.config import DataConfig
from jaxsd.data.encoders import Encoder, latent_spec, text_spec
from jaxsd.data.manifest import fingerprint_folder

SCALE, SHIFT, LENGTH, WIDTH = 0.5, 0.1, 8, 16


def save_fake_vae(folder, seed: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.normal(size=(3, 4)).astype(np.float32), "logvar": np.float32(-2.0) + np.zeros(4, np.float32)},
              folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"scaling_factor": SCALE, "shift_factor": SHIFT, "latent_channels": 4}))
    return folder


def fake_vae_apply(params, inputs):
    x = inputs["pixels"]
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // 8, 8, w // 8, 8, c).mean((2, 4))
    mu = pooled @ params["w"]
    logvar = jnp.broadcast_to(params["logvar"], mu.shape)
    return {"latent_mean": (mu - SHIFT) * SCALE, "latent_logvar": logvar + 2 * jnp.log(SCALE)}


def fake_vae(folder, cfg: DataConfig) -> Encoder:
    f = SafetensorsFile(Path(folder) / "diffusion_pytorch_model.safetensors")
    params = {k: np.array(f[k]) for k in f}
    spec = latent_spec(fingerprint=fingerprint_folder(folder), scaling_factor=SCALE, shift_factor=SHIFT,
                       latent_channels=4, cfg=cfg)
    return Encoder(spec, params, fake_vae_apply)


def save_fake_text(folder, seed: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    emb = np.random.default_rng(seed).normal(size=(256, WIDTH)).astype(np.float32)
    save_file({"embed": emb}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"width": WIDTH}))
    return folder


def tokenize(captions):
    ids = np.zeros((len(captions), LENGTH), np.int32)
    for i, c in enumerate(captions):
        b = c.encode()[:LENGTH]
        ids[i, : len(b)] = list(b)
    return {"ids": ids}


def fake_text_apply(params, inputs):
    h = params["embed"][inputs["ids"]]
    return {"encoder_hidden_states": h, "pooled": h.mean(1)}


def fake_text(folder, cfg: DataConfig) -> Encoder:
    params = {"embed": np.array(SafetensorsFile(Path(folder) / "model.safetensors")["embed"])}
    spec = text_spec(producer="fake_te", fingerprint=fingerprint_folder(folder), max_length=LENGTH, cfg=cfg)
    return Encoder(spec, params, fake_text_apply, tokenize)


def make_images(root, n: int = 24) -> Path:
    """`n` clean images of three aspect ratios (64x64, 96x64, 64x96) with captions."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True)
    sizes = [(64, 64), (96, 64), (64, 96)]
    for i in range(n):
        w, h = sizes[i % 3]
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"caption {i}")
    return root


def small_config(*roots, **overrides) -> DataConfig:
    from jaxsd.data.config import BucketConfig, CacheConfig, ImageConfig, LoaderConfig

    return DataConfig(roots=tuple(str(r) for r in roots),
                      image=ImageConfig(resolution=64, random_flip=True, buckets=BucketConfig(True, 32, 128, 16)),
                      cache=CacheConfig(dtype="float32", batch_size=8),
                      loader=LoaderConfig(batch_size=4, threads=2, prefetch=2), **overrides)


def make_cached(base, n: int = 24) -> tuple[DataConfig, Encoder, Encoder]:
    """A small clean dataset, cached with the fake encoders."""
    from jaxsd.data.cache import build_cache

    base = Path(base)
    cfg = small_config(make_images(base / "ds", n))
    vae = fake_vae(save_fake_vae(base / "vae", 0), cfg)
    te = fake_text(save_fake_text(base / "te", 0), cfg)
    build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    return cfg, vae, te
