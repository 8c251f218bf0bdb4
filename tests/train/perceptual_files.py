"""Files the perceptual-loss tests train with, torch-free: a random VGG16 backbone + LPIPS heads saved as one
`.safetensors` in the real key layout (torchvision's `features.N.weight/bias`, the lpips package's
`linN.model.1.weight`: what `jaxsd.losses.weights.save_lpips_safetensors` writes), and style reference images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jaxsd.convert.safetensors_io import save_file
from jaxsd.losses.vgg import VGG16Features
from jaxsd.models.params import abstract_params


def save_random_lpips(path: Path, seed: int = 0) -> Path:
    """He-initialised VGG16 convs (OIHW) and non-negative heads ([1, C, 1, 1]), as one .safetensors."""
    rng = np.random.default_rng(seed)
    shapes, _ = abstract_params(VGG16Features(), np.zeros((1, 32, 32, 3), np.float32))
    state = {}
    for name, leaves in shapes.items():  # features_N: {"kernel": [3, 3, I, O], "bias": [O]}
        index = name.split("_")[1]
        h, w, i, o = leaves["kernel"].shape
        state[f"features.{index}.weight"] = (rng.standard_normal((o, i, h, w)) * np.sqrt(2.0 / (h * w * i))
                                             ).astype(np.float32)
        state[f"features.{index}.bias"] = (0.01 * rng.standard_normal(o)).astype(np.float32)
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.model.1.weight"] = np.abs(rng.standard_normal((1, c, 1, 1)) / c).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, {"format": "pt", "jaxsd": "lpips-vgg16-v0.1"})
    return path


def save_style_images(folder: Path, count: int = 2, size: tuple[int, int] = (24, 20), seed: int = 1) -> Path:
    """`count` random RGB PNGs (height, width = size) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"style{i}.png")
    return folder
