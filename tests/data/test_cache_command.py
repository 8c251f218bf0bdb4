"""`jaxsd cache` end to end with a tiny real VAE (saved by jaxsd's save_vae), and the trainer-side refusal."""

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.cli import main
from jaxsd.convert.vae import save_vae
from jaxsd.data.config import load_data_config
from jaxsd.data.images import decode, prepare, read_bytes, to_rgb
from jaxsd.data.loader import Loader, training_loader
from jaxsd.data.manifest import CacheMismatch, read_manifest, verify_manifest
from jaxsd.data.model_encoders import expected_specs
from jaxsd.data.records import read_sidecar
from jaxsd.models.params import abstract_params
from jaxsd.models.vae import AutoencoderKL, VAEConfig
from tests.helpers import jaxsd_command, rel_err

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
TINY = VAEConfig(block_out_channels=(8, 16), down_block_types=(DOWN,) * 2, up_block_types=(UP,) * 2,
                 layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=16)


def save_tiny_vae(folder, seed):
    model = AutoencoderKL(TINY)
    # random weights from the abstract shapes: no init to compile (that takes a minute on a busy CPU)
    shapes, _ = abstract_params(model, np.zeros((1, 8, 8, 3), np.float32))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    save_vae(folder, TINY, params)
    return model, params


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmd")
    model, params = save_tiny_vae(base / "pipe" / "vae", 0)
    root = base / "imgs"
    root.mkdir()
    for i, (w, h) in enumerate([(32, 32), (48, 32), (32, 48), (40, 40)] * 2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i}")
    (root / "broken.png").write_bytes(b"nope")
    (root / "broken.txt").write_text("broken")
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model:
  dtype: float32
data:
  roots: [{root}]
  image:
    resolution: 32
    buckets: {{enabled: true, min_side: 16, max_side: 64, step: 16}}
  cache:
    vae: {base / 'pipe'}
    dtype: float32
    batch_size: 4
  loader:
    batch_size: 2
""")
    code = main(["cache", str(yaml), "train.steps=3", "--only", "latents", "--no-progress"])
    assert code == 0
    return base, root, yaml, model, params


def test_cache_command_writes_correct_latents(cached, capsys):
    base, root, yaml, model, params = cached
    manifest = read_manifest(root)
    assert manifest["latents"]["suffix"] == "sd_vae" and manifest["text"] is None
    assert set(manifest["entries"]) == {str(i) for i in range(8)}
    assert "broken.png" in (root / "jaxsd_validation.json").read_text()
    # the cached posterior equals the model run directly on the same preprocessed pixels
    rgb, _ = to_rgb(decode(read_bytes(root / "1.png")))  # 48x32 -> bucket 32x32, center crop
    assert manifest["entries"]["1"]["bucket"] == [32, 32]
    p = prepare(rgb, 32, 32)
    post = jax.jit(lambda x: model.apply({"params": params}, x, method="encode"))(p.pixels[None])
    side = read_sidecar(root / "1.sd_vae")
    assert rel_err(side["latent_mean"], TINY.scale_latents(post.mean)[0]) <= 1e-5
    assert rel_err(side["latent_logvar"], post.logvar[0] + 2 * np.log(TINY.scaling_factor)) <= 1e-5
    # re-running is a no-op; --pack writes ArrayRecord shards the loader reads like the sidecars
    packed = base / "packed"
    assert main(["cache", str(yaml), "--only", "latents", "--no-progress", "--pack", str(packed)]) == 0
    assert "latents 0 encoded / 8 reused" in capsys.readouterr().out
    cfg = load_data_config(str(yaml))
    a = next(Loader(cfg))
    b = next(Loader(dataclasses.replace(cfg, packed=(str(packed),))))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_trainer_configured_with_another_vae_is_refused(cached, tmp_path):
    base, root, yaml, _, _ = cached
    cfg = load_data_config(str(yaml))
    latents, _ = expected_specs(cfg)
    Loader(cfg, latents=latents)  # same VAE: accepted
    with pytest.raises(ValueError, match="set data.cache.text_encoder"):
        training_loader(cfg)  # training needs both producers configured, or nothing would be checked
    save_tiny_vae(tmp_path / "other" / "vae", 1)
    other = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, vae=str(tmp_path / "other")))
    latents_other, _ = expected_specs(other)
    with pytest.raises(CacheMismatch) as e:
        Loader(other, latents=latents_other, rebuild=f"jaxsd cache {yaml}")
    msg = str(e.value)
    assert "vae_fingerprint" in msg and f"jaxsd cache {yaml} --only latents" in msg
    # a changed preprocessing setting is refused the same way
    res = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, resolution=64))
    with pytest.raises(CacheMismatch, match="resolution: cache has 32, this run expects 64"):
        verify_manifest(root, latents=expected_specs(res)[0])


def test_bad_config_and_missing_encoder_are_clear(cached, capsys):
    base, root, yaml, _, _ = cached
    assert main(["cache", str(yaml), "data.image.resolutoin=64"]) == 2
    assert "ConfigError: " in (err := capsys.readouterr().err) and "data.image.resolutoin" in err
    assert main(["cache", str(yaml), "--only", "text"]) == 2
    assert "ConfigError: set data.cache.text_encoder" in capsys.readouterr().err


def test_cache_accepts_a_preset_name(cached, tmp_path):
    """`jaxsd cache PRESET data.key=value ...`, as `jaxsd train` takes it: the preset's data section and the
    overrides make the cache, through the installed `jaxsd` script."""
    base, root, _, _, _ = cached
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("0", "1"):
        for suffix in (".png", ".txt"):
            (imgs / f"{name}{suffix}").write_bytes((root / f"{name}{suffix}").read_bytes())
    jaxsd_command("cache", "tiny", f"data.roots=[{imgs}]", f"data.cache.vae={base / 'pipe'}",
                  "data.image.resolution=32", "data.cache.dtype=float32", "--only", "latents", "--no-progress")
    manifest = read_manifest(imgs)
    assert set(manifest["entries"]) == {"0", "1"} and manifest["latents"]["resolution"] == 32
    # 0.png is 32x32: the same pixels reach the same VAE with or without the fixture's buckets
    ours, theirs = read_sidecar(imgs / "0.sd_vae"), read_sidecar(root / "0.sd_vae")
    assert rel_err(ours["latent_mean"], theirs["latent_mean"]) == 0.0
