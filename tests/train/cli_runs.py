"""Shared by the tests that run `jaxsd train` on data made by `jaxsd cache` (test_buckets_cli.py,
test_multihost_cli.py): a tiny pipeline folder, a few random images with captions, the run config
over them, the cache, and reading a run's per-step records back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import jaxsd_command
from tests.train.tiny_pipeline import tiny_pipeline

# every compiled program goes to the run's persistent XLA cache, however small or quick to compile
ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_yaml(base: Path, pipe: Path, images: Path, *, steps: int, batch_size: int, image: str) -> str:
    """A `jaxsd train` + `jaxsd cache` config: fine-tune `pipe`'s UNet on the cached `images`, a metrics
    record every step, checkpoints every 2 steps. image: the data.image section (YAML flow mapping)."""
    return f"""
model:
  pretrained: {pipe}
train:
  run_dir: {base / 'straight'}
  steps: {steps}
  batch_size: {batch_size}
  data_source: cache
  compilation_cache: {base / 'xla_cache'}
checkpoint: {{every: 2, keep: 10}}
logging: {{every: 1, progress_bar: false}}
data:
  roots: [{images}]
  image: {image}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: clip, dtype: float32, batch_size: 4}}
  loader: {{batch_size: {batch_size}, threads: 1, prefetch: 1}}
"""


def cached_dataset(base: Path, sizes: list[tuple[int, int]], *, steps: int, batch_size: int, image: str) -> Path:
    """Under `base`: a tiny pipeline, one random image of each (height, width) in `sizes` with its
    caption, the run config (returned: base/run.yaml) and the cache `jaxsd cache` makes from it."""
    pipe = tiny_pipeline(base / "pipe")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a picture number {i}")
    yaml = base / "run.yaml"
    yaml.write_text(run_yaml(base, pipe, images, steps=steps, batch_size=batch_size, image=image))
    jaxsd_command("cache", yaml, "--no-progress")
    return yaml


def records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl: one dict per logged step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
