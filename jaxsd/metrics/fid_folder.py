"""InceptionV3 pool features of every image in a folder (`jaxsd eval --stats`), as pytorch-fid feeds them.

pytorch-fid's dataset gives the model each image as `ToTensor()` makes it — RGB in [0, 1] at its own
size — and the model resizes to 299 × 299. Here consecutive images (sorted by name) of one size form a
batch, padded to `batch_size` so each image size compiles the jitted network once; the padding rows
are dropped again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from jaxsd.errors import InputError
from jaxsd.metrics.inception import FIDInceptionV3
from jaxsd.metrics.pairs import image_files, load_rgb


def _batches(paths: list[Path], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Lists of ≤ batch_size uint8 [H, W, 3] images of one size, in file order."""
    batch: list[np.ndarray] = []
    for path in paths:
        img = load_rgb(path)
        if batch and (len(batch) == batch_size or batch[0].shape != img.shape):
            yield batch
            batch = []
        batch.append(img)
    if batch:
        yield batch


def folder_features(folder: Path, params: dict, batch_size: int = 50,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Pool features [N, 2048] (float32) of the N images directly in `folder` (any sizes)."""
    paths = list(image_files(folder).values())
    if len(paths) < 2:
        raise InputError(f"{folder}: {len(paths)} image(s); FID statistics need at least 2 (a covariance), "
                         "and thousands for a meaningful FID")
    if batch_size < 1:
        raise InputError(f"--batch-size must be ≥ 1; got {batch_size}")
    batch_size = min(batch_size, len(paths))  # as pytorch-fid
    apply = jax.jit(lambda p, x: FIDInceptionV3().apply({"params": p}, x))
    out = []
    for batch in _batches(paths, batch_size):
        x = np.zeros((batch_size, *batch[0].shape), np.float32)
        x[: len(batch)] = np.stack(batch).astype(np.float32) / 255.0
        out.append(np.asarray(jax.device_get(apply(params, x)))[: len(batch)])
        if progress is not None:
            progress(len(batch))
    return np.concatenate(out)
