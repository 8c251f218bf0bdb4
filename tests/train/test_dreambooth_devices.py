"""DreamBooth's class images generated data parallel over a process's devices (`jaxsd dreambooth-classes` with 2 fake
CPU devices) are the images of a 1-device run (this pytest process's one CPU device, the same function without the
caching step): image i is a function of seed + i, not of the device count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jaxsd.config import load_config
from jaxsd.train.dreambooth import generate_class_images
from tests.helpers import jaxsd_command
from tests.train.cli_runs import ENV
from tests.train.tiny_pipeline import tiny_pipeline

NUM = 3  # odd: on 2 devices the last batch is padded


def _config(base: Path, pipe: Path) -> Path:
    yaml = base / "classes.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
dreambooth: {{class_prompt: a photo of a dog, class_dir: {base / 'classes'}, num_class_images: {NUM},
             steps: 2, batch_size: 1, sampler: ddim}}
data:
  subsets: [{{roots: [{base / 'instance'}], caption: a photo of sks dog}}]
  image: {{resolution: 16}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: clip, dtype: float32, batch_size: 4}}
""")
    return yaml


def _images(folder: Path) -> list[np.ndarray]:
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(NUM)]
    return [np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(NUM)]


def test_class_images_on_two_devices_equal_one_device_run(tmp_path):
    pipe = tiny_pipeline(tmp_path / "pipe")
    (tmp_path / "instance").mkdir()
    yaml = _config(tmp_path, pipe)
    two = jaxsd_command("dreambooth-classes", yaml, f"dreambooth.class_dir={tmp_path / 'two'}", "--no-progress",
                        env=ENV, devices=2).stdout
    assert f"generates {NUM} class images on 2 devices (batch 2)" in two, two
    db = load_config(yaml, [f"dreambooth.class_dir={tmp_path / 'one'}"]).dreambooth
    logged: list[str] = []
    assert generate_class_images(db, model=str(pipe), resolution=16, progress=False, log_fn=logged.append) == NUM
    assert logged == [f"dreambooth: process 0 generates {NUM} class images on 1 device (batch 1)"]
    # pixel-exact: every device runs the 1-device program on its own images (shard_map, no cross-device sums)
    for i, (a, b) in enumerate(zip(_images(tmp_path / "two"), _images(tmp_path / "one"))):
        np.testing.assert_array_equal(a, b, err_msg=f"class image {i}")
