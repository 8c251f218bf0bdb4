"""One tiny fine-tuning run made as a user makes it, shared by the tests that only read it
(test_export.py, test_sampling.py, test_bf16_params.py): once per test run, for every xdist worker
(tests/shared_dirs.py).

A tiny pipeline folder (tests/train/tiny_pipeline.py, its UNet's output conv scaled so the UNet visibly
shapes the images) is `model.pretrained`; `jaxsd cache` encodes 6 images with its VAE and text encoder;
`jaxsd train` runs 4 steps: EMA on, conv_in frozen, a large learning rate (the trained UNet draws visibly
other images than the base one), a sample grid of the EMA params every 2 steps with its CLIP score (when
transformers is installed), a checkpoint at the end.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import jaxsd_command
from tests.shared_dirs import shared_dir
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEPS = 4
SAMPLE_PROMPTS = ["a cat", "a dog on the moon"]


@dataclass(frozen=True)
class TinyRun:
    base: Path  # the shared folder: read only (copy what a test changes)
    pipe: Path
    images: Path  # the cached dataset
    yaml: Path  # the run's config (train.run_dir=run_dir)
    run_dir: Path
    clip: Path | None  # logging.sample_clip's CLIP folder (None without transformers)
    stdout: str  # what `jaxsd train` printed


def sensitive_pipeline(folder: Path) -> Path:
    """The tiny pipeline with its UNet's conv_out × 5."""
    from jaxsd.convert.unet import load_unet, save_unet

    tiny_pipeline(folder)
    config, params = load_unet(folder / "unet")
    params = {**params, "conv_out": {k: np.asarray(v) * 5 for k, v in params["conv_out"].items()}}
    save_unet(folder / "unet", config, params)
    return folder


def _yaml(base: Path, clip: Path | None) -> str:
    return f"""
model: {{pretrained: {base / 'pipe'}}}
optimizer: {{learning_rate: 0.01}}
train: {{run_dir: {base / 'run'}, steps: {STEPS}, batch_size: 2, data_source: cache, frozen: ['^conv_in/'],
         ema: {{enabled: true}}}}
checkpoint: {{every: 100, async_save: false}}
logging:
  every: 1
  progress_bar: false
  sample_every: 2
  sample_prompts: {json.dumps(SAMPLE_PROMPTS)}
  sample_steps: 2
  sample_guidance_scale: 3.0
  sample_clip: {clip or 'null'}
data:
  roots: [{base / 'images'}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {base / 'pipe'}, text_encoder: {base / 'pipe'}, text: clip, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 2, threads: 1, prefetch: 1}}
"""


def _clip(base: Path) -> Path | None:
    return base / "clip" if importlib.util.find_spec("transformers") is not None else None


def _make(base: Path) -> None:
    from tests.data.fakes import make_images

    sensitive_pipeline(base / "pipe")
    make_images(base / "images", 6)
    clip = _clip(base)
    if clip is not None:
        from tests.metrics.tiny_clip import build_clip_folder
        build_clip_folder(clip)
    (base / "run.yaml").write_text(_yaml(base, clip))
    jaxsd_command("cache", base / "run.yaml", "--no-progress")
    (base / "train.out").write_text(jaxsd_command("train", base / "run.yaml").stdout)


def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    base = shared_dir(tmp_path_factory, "tiny_run", _make)
    return TinyRun(base, base / "pipe", base / "images", base / "run.yaml", base / "run", _clip(base),
                   (base / "train.out").read_text())
