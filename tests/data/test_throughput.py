"""Throughput (slow; run with -m slow -s): cache images/s with a tiny VAE + tiny SDXL text encoders, and
the loader's batches/s at SD1.5 shapes (64x64x4 latent posterior + 77x768 text, bf16) — the loader must
outpace the train step at the same batch size. The rates are printed; what is asserted is what they are
rates of: every image encoded (or reused on a resume), every sample delivered once per epoch."""

import time

import numpy as np
import pytest
from PIL import Image

from jaxsd.data.cache import build_cache
from jaxsd.data.config import CacheConfig, DataConfig, ImageConfig, LoaderConfig
from jaxsd.data.loader import Loader
from jaxsd.data.manifest import write_manifest
from jaxsd.data.model_encoders import text_encoder, vae_encoder
from jaxsd.data.records import STORAGE_DTYPES, sidecar_path, write_sidecar
from tests.data.test_cache_command import save_tiny_vae
from tests.data.test_cache_text import tiny_sdxl_pipeline

pytestmark = pytest.mark.slow


def test_cache_throughput(tmp_path):
    """Images/s of a cold and a warm `build_cache`; every image encoded each time, nothing on a resume."""
    pipe = tiny_sdxl_pipeline(tmp_path / "pipe")
    save_tiny_vae(pipe / "vae", 0)
    root = tmp_path / "imgs"
    root.mkdir()
    n = 128
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (80, 64, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        (root / f"{i}.txt").write_text(f"a photo of a cat number {i}")
    cfg = DataConfig(roots=(str(root),), image=ImageConfig(resolution=64),
                     cache=CacheConfig(vae=str(pipe), text_encoder=str(pipe), text="sdxl", batch_size=16))
    vae, te = vae_encoder(cfg), text_encoder(cfg)
    everything = {"latents": n, "text": n + 1}  # + the empty caption's embedding
    t0 = time.perf_counter()
    r = build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    first = time.perf_counter() - t0
    assert r.encoded == everything and r.report.counts["kept"] == n
    print(f"\ncache: {n} images 64x64 + captions, tiny VAE + tiny SDXL text: {first:.2f}s incl. compile "
          f"= {n / first:.1f} images/s")
    removed = [f.unlink() for suffix in (vae.suffix, te.suffix) for f in root.glob(f"*.{suffix}")]
    assert len(removed) == n + n + 1
    vae, te = vae_encoder(cfg), text_encoder(cfg)
    t0 = time.perf_counter()
    r = build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    again = time.perf_counter() - t0
    assert r.encoded == everything
    print(f"cache (fresh encoders, warm process): {again:.2f}s = {n / again:.1f} images/s")
    t0 = time.perf_counter()
    r = build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    assert r.encoded == {"latents": 0, "text": 0} and r.reused == {"latents": n, "text": n}
    print(f"resume with everything current: {time.perf_counter() - t0:.2f}s")


def test_loader_throughput_at_sd15_shapes(tmp_path):
    """Batches/s at SD1.5 shapes with 1 and 4 grain threads. Each epoch delivers every sample exactly once,
    each row holding the sample its index names, in the same order whatever the thread count; and faster
    than the ≈1 step/s of an SD1.5 train step at batch 64 on one large GPU (docs/data.md)."""
    root = tmp_path / "ds"
    root.mkdir()
    bf16 = STORAGE_DTYPES["bfloat16"]
    rng = np.random.default_rng(0)
    n, batch = 512, 64
    lat_spec, txt_spec = {"suffix": "sd_vae"}, {"suffix": "clip_l"}
    mean = rng.standard_normal((64, 64, 4)).astype(bf16)
    text = rng.standard_normal((77, 768)).astype(bf16)
    for i in range(n):  # time_ids carry the sample number, so a row can be matched to its index
        write_sidecar(sidecar_path(root, f"{i:04d}", "sd_vae"),
                      {"latent_mean": mean, "latent_logvar": mean, "time_ids": np.full(6, i, np.float32)},
                      spec=lat_spec, source="x")
        write_sidecar(sidecar_path(root, f"{i:04d}", "clip_l"), {"encoder_hidden_states": text}, spec=txt_spec,
                      source="x")
    write_manifest(root, {"latents": lat_spec, "text": txt_spec,
                          "entries": {f"{i:04d}": {"bucket": [512, 512]} for i in range(n)}})
    orders = {}
    for threads in (1, 4):
        loader = Loader(DataConfig(roots=(str(root),), loader=LoaderConfig(batch_size=batch, threads=threads,
                                                                           prefetch=4)))
        assert loader.steps_per_epoch == n // batch
        t0 = time.perf_counter()
        epoch = [next(loader) for _ in range(loader.steps_per_epoch)]
        dt = time.perf_counter() - t0
        for b in epoch:
            assert b["latent_mean"].shape == (batch, 64, 64, 4) and b["encoder_hidden_states"].shape == (batch, 77, 768)
            # sidecar keys are zero-padded sample numbers, so a sample's index is its number
            np.testing.assert_array_equal(b["time_ids"][:, 0], b["index"])
        orders[threads] = np.concatenate([b["index"] for b in epoch])
        assert sorted(orders[threads]) == list(range(n)), "an epoch must deliver every sample exactly once"
        rate = len(epoch) / dt
        print(f"\nloader, batch {batch} at SD1.5 shapes, {threads} thread(s): {rate:.1f} batches/s "
              f"= {rate * batch:.0f} samples/s")
        assert rate > 1.0, f"{rate:.2f} batches/s: slower than an SD1.5 train step at batch {batch} on one GPU"
    np.testing.assert_array_equal(orders[1], orders[4])
