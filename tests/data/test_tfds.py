"""A TFDS dataset (tfds.testing.mock_data, read via tfds.data_source — no TensorFlow) validates, caches
and loads; and `jaxsd cache` + `jaxsd train` run on it as a user runs them."""

import json
import math
import sys

import tensorflow_datasets as tfds

from jaxsd.cli import main
from jaxsd.data.cache import build_cache
from jaxsd.data.config import (
    CacheConfig,
    DataConfig,
    ImageConfig,
    LoaderConfig,
    TFDSConfig,
    ValidationConfig,
    load_data_config,
)
from jaxsd.data.loader import Loader
from jaxsd.data.manifest import read_manifest
from jaxsd.data.sources import open_sources, tfds_cache_root
from tests.data.fakes import fake_text, fake_vae, save_fake_text, save_fake_vae
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline


def test_tfds_mock_caches_and_loads(tmp_path):
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

    batch = next(Loader(cfg, latents=vae.spec, text=te.spec))
    assert batch["latent_mean"].shape == (4, 4, 4, 4) and batch["encoder_hidden_states"].shape == (4, 8, 16)
    assert len(set(batch["index"].tolist())) == 4  # four distinct samples


def test_jaxsd_cache_and_train_on_a_tfds_source(tmp_path, capsys):
    """`jaxsd cache` encodes the TFDS split with a (tiny) pipeline's VAE and text encoder; `jaxsd train` then
    trains the pipeline's UNet on that cache: every step's loss finite and an update applied."""
    pipe = tiny_pipeline(tmp_path / "pipe")
    cache_dir, run_dir = tmp_path / "tfds", tmp_path / "run"
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {run_dir}, steps: 2, batch_size: 4, data_source: cache}}
checkpoint: {{every: 100, async_save: false}}
logging: {{every: 1, progress_bar: false, tensorboard: false}}
data:
  tfds: {{name: oxford_flowers102, split: train, cache_dir: {cache_dir}}}
  validation: {{too_small: upscale}}
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: clip, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
""")
    with tfds.testing.mock_data(num_examples=8):
        assert main(["cache", str(yaml), "--no-progress"]) == 0
        assert main(["train", str(yaml)]) == 0
    out = capsys.readouterr().out
    assert "latents 8 encoded / 0 reused, text 9 encoded / 0 reused" in out, out
    assert len(read_manifest(tfds_cache_root(load_data_config(str(yaml)).tfds))["entries"]) == 8
    assert "jaxsd train: done at step 2" in out, out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # the TFDS batches reached the step: finite losses, non-zero gradients, updates applied (not skipped)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] > 0 and r["skipped"] == 0
               for r in records), records
