"""Files the perceptual-loss tests train with, torch-free: a random VGG16 backbone + LPIPS heads in the real key
layout (`bench.perceptual_files.save_random_lpips`, shared with the bench) and style reference images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.perceptual_files import save_random_lpips

__all__ = ["save_random_lpips", "save_style_images"]


def save_style_images(folder: Path, count: int = 2, size: tuple[int, int] = (24, 20), seed: int = 1) -> Path:
    """`count` random RGB PNGs (height, width = size) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"style{i}.png")
    return folder
