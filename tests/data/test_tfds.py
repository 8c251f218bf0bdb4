"""A TFDS dataset (tfds.testing.mock_data, read via tfds.data_source — no TensorFlow) validates, caches,
loads and trains for a step."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from jaxsd.data.cache import build_cache
from jaxsd.data.config import (
    CacheConfig,
    DataConfig,
    ImageConfig,
    LoaderConfig,
    TFDSConfig,
    ValidationConfig,
)
from jaxsd.data.loader import Loader
from jaxsd.data.sources import open_sources
from jaxsd.diffusion.schedule import NoiseSchedule
from tests.data.fakes import fake_text, fake_vae, save_fake_text, save_fake_vae


def test_tfds_mock_caches_loads_and_trains_a_step(tmp_path):
    cfg = DataConfig(tfds=TFDSConfig(name="oxford_flowers102", split="train", cache_dir=str(tmp_path / "tfds")),
                     validation=ValidationConfig(too_small="upscale"),  # mock images are tiny (e.g. 47x17)
                     image=ImageConfig(resolution=32), cache=CacheConfig(dtype="float32", batch_size=4),
                     loader=LoaderConfig(batch_size=4, threads=2))
    vae = fake_vae(save_fake_vae(tmp_path / "vae", 0), cfg)
    te = fake_text(save_fake_text(tmp_path / "te", 0), cfg)
    with tfds.testing.mock_data(num_examples=8):
        src = open_sources(cfg)[0]
        items, _ = src.scan()
        caption, _ = src.read_caption(items[0])
        label = int(src.data[0]["label"])
        assert caption == f"a photo of a {src.label_names[label]}"  # the label through the template
        result = build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    assert "tensorflow" not in sys.modules  # tfds.data_source needs no TensorFlow
    assert result.encoded == {"latents": 8, "text": 9} and result.report.counts["kept"] == 8
    assert result.report.counts["altered"] == 8  # every mock image was upscaled, and the report says so

    loader = Loader(cfg, latents=vae.spec, text=te.spec)
    batch = next(loader)
    assert batch["latent_mean"].shape == (4, 4, 4, 4) and batch["encoder_hidden_states"].shape == (4, 8, 16)

    # one training step of a tiny denoiser on this batch, with the real noise schedule
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
    params = {"w": jnp.zeros((4 + 16, 4))}
    tx = optax.sgd(0.1)

    def loss_fn(p, b, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = b["latent_mean"] + jnp.exp(0.5 * b["latent_logvar"]) * jax.random.normal(k1, b["latent_mean"].shape)
        noise = jax.random.normal(k2, x0.shape)
        t = jax.random.randint(k3, (x0.shape[0],), 0, 1000)
        noisy = schedule.add_noise(x0, noise, t)
        text = jnp.broadcast_to(b["pooled"][:, None, None, :], noisy.shape[:3] + (16,))
        pred = jnp.concatenate([noisy, text], -1) @ p["w"]
        return jnp.mean((pred - schedule.target(x0, noise, t)) ** 2)

    @jax.jit
    def step(p, opt, b, key):
        loss, g = jax.value_and_grad(loss_fn)(p, b, key)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    jbatch = {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}
    new, _, loss = step(params, tx.init(params), jbatch, jax.random.key(0))
    assert np.isfinite(float(loss)) and float(jnp.abs(new["w"]).sum()) > 0
