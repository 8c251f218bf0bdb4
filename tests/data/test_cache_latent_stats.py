"""`jaxsd cache` with a VAE whose config has latents_mean / latents_std (SDXL-pipeline VAEs such as
Playground v2.5's): latents are stored normalised per channel as diffusers does, and the manifest
records the statistics so a cache made without them is refused."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.cli import main
from jaxsd.data.config import load_data_config
from jaxsd.data.images import decode, prepare, read_bytes, to_rgb
from jaxsd.data.manifest import CacheMismatch, read_manifest, verify_manifest
from jaxsd.data.model_encoders import expected_specs
from jaxsd.data.records import read_sidecar
from jaxsd.models.vae import AutoencoderKL
from tests.data.test_cache_command import save_tiny_vae
from tests.helpers import rel_err

MEAN, STD, SCALE = [0.4, -0.7, 0.1, 0.9], [1.8, 0.6, 1.1, 2.5], 0.5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base, plain VAE folder, the same weights + latents_mean/std, images, config)."""
    base = tmp_path_factory.mktemp("stats")
    _, params = save_tiny_vae(base / "plain", 0)
    stats = base / "stats"
    shutil.copytree(base / "plain", stats)
    config = json.loads((stats / "config.json").read_text())
    config.update(latents_mean=MEAN, latents_std=STD, scaling_factor=SCALE)
    (stats / "config.json").write_text(json.dumps(config))
    root = base / "imgs"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i}")
    yaml = base / "run.yaml"
    yaml.write_text(f"""
data:
  roots: [{root}]
  image: {{resolution: 32, random_flip: false}}
  cache: {{vae: {base / 'plain'}, dtype: float32, batch_size: 4}}
""")
    return base, params, stats, root, yaml


def test_cache_without_statistics_is_refused_by_a_vae_with_them(folders):
    _, _, stats, root, yaml = folders
    assert main(["cache", str(yaml), "--only", "latents", "--no-progress"]) == 0
    cfg = load_data_config(str(yaml))
    assert read_manifest(root)["latents"]["latents_mean"] is None
    verify_manifest(root, latents=expected_specs(cfg)[0])
    with_stats = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, vae=str(stats)))
    with pytest.raises(CacheMismatch) as e:
        verify_manifest(root, latents=expected_specs(with_stats)[0], rebuild=f"jaxsd cache {yaml}")
    msg = str(e.value)
    assert f"latents_mean: cache has null, this run expects {json.dumps(MEAN)}" in msg
    assert f"latents_std: cache has null, this run expects {json.dumps(STD)}" in msg
    assert f"jaxsd cache {yaml} --only latents" in msg


def test_cli_cache_normalises_latents_per_channel_as_diffusers(folders):
    base, params, stats, root, yaml = folders
    out = base / "out"
    shutil.copytree(root, out, ignore=shutil.ignore_patterns("*.sd_vae", "*.vae_*", "jaxsd_*"))
    assert main(["cache", str(yaml), "--only", "latents", "--no-progress", f"data.roots=[{out}]",
                 f"data.cache.vae={stats}"]) == 0  # in-process: tests/train/tiny_run.py runs the command
    spec = read_manifest(out)["latents"]
    assert (spec["latents_mean"], spec["latents_std"], spec["scaling_factor"]) == (MEAN, STD, SCALE)
    cfg = load_data_config(str(yaml), [f"data.roots=[{out}]", f"data.cache.vae={stats}"])
    verify_manifest(out, latents=expected_specs(cfg)[0])
    # the cached posterior is the VAE's, normalised with diffusers' SDXL img2img formula per channel
    from tests.data.test_cache_command import TINY
    model = AutoencoderKL(TINY)
    rgb, _ = to_rgb(decode(read_bytes(out / "1.png")))
    post = jax.jit(lambda x: model.apply({"params": params}, x, method="encode"))(prepare(rgb, 32, 32).pixels[None])
    side = read_sidecar(next(out.glob("1.vae_*")))
    m, s = np.asarray(MEAN), np.asarray(STD)
    assert rel_err(side["latent_mean"], (np.asarray(post.mean[0]) - m) * SCALE / s) <= 1e-5
    assert rel_err(side["latent_logvar"], np.asarray(post.logvar[0]) + 2 * np.log(SCALE / s)) <= 1e-5
    # decoding goes back through the same statistics: the cached mean decodes like the raw posterior mean
    stats_config = dataclasses.replace(TINY, latents_mean=tuple(MEAN), latents_std=tuple(STD), scaling_factor=SCALE)
    decode_fn = jax.jit(lambda z: model.apply({"params": params}, z, method="decode"))
    z = stats_config.unscale_latents(side["latent_mean"][None])
    assert rel_err(decode_fn(z), decode_fn(post.mean)) <= 1e-4
