"""`model.attention_impl: splash` through the commands a user types, on CPU.

`jaxsd cache` encodes 4 images with a tiny pipeline's VAE and CLIP; `jaxsd train` runs 2 steps of a
one-level UNet with attention (self-attention over 8×8 latents, cross-attention over CLIP's 77
tokens, both padded to the kernel's 128) with the splash kernel
(Pallas interpret mode off TPU): its custom VJP under the real jitted, sharded, donated train step.
The slow test runs the same 2 steps with the einsum attention: every step's loss agrees within
1e-5 relative (fp32; the kernel's blocked softmax differs by rounding only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jaxsd.cli import main
from tests.helpers import jaxsd_command
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

# one level: self-attention over 8×8 latents and cross-attention over CLIP's 77 tokens in the down,
# mid and up blocks (4 transformer blocks), both lengths padded to the kernel's 128
UNET = """{sample_size: 8, in_channels: 4, out_channels: 4, block_out_channels: [16],
         down_block_types: [CrossAttnDownBlock2D], up_block_types: [CrossAttnUpBlock2D],
         layers_per_block: 1, attention_head_dim: 2, cross_attention_dim: 32, norm_num_groups: 4}"""


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    from tests.data.fakes import make_images

    base = tmp_path_factory.mktemp("splash_cli")
    pipe = tiny_pipeline(base / "pipe")
    images = make_images(base / "images", 4)
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{unet: {UNET}}}
train: {{steps: 2, batch_size: 2, data_source: cache}}
checkpoint: {{every: 100, async_save: false}}
logging: {{every: 1, progress_bar: false}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: clip, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 2, threads: 1, prefetch: 1}}
""")
    assert main(["cache", str(yaml), "--no-progress"]) == 0  # in-process: tests/train/tiny_run.py runs the command
    return base, yaml


@pytest.fixture(scope="module")
def splash_run(cached) -> Path:
    base, yaml = cached
    jaxsd_command("train", yaml, f"train.run_dir={base / 'splash'}", "model.attention_impl=splash")
    return base / "splash"


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_runs_with_splash_attention(splash_run):
    losses = _losses(splash_run)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "attention_impl: splash" in (splash_run / "config.yaml").read_text()


@pytest.mark.slow
def test_train_with_splash_attention_equals_einsum(cached, splash_run):
    base, yaml = cached
    jaxsd_command("train", yaml, f"train.run_dir={base / 'einsum'}", "model.attention_impl=einsum")
    splash, einsum = _losses(splash_run), _losses(base / "einsum")
    assert len(splash) == len(einsum) == 2
    for s, e in zip(splash, einsum, strict=True):
        assert abs(s - e) <= 1e-5 * abs(e), (splash, einsum)
