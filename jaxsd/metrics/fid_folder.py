"""InceptionV3 pool features of every image in a folder (`jaxsd eval --stats`), as pytorch-fid feeds them.

pytorch-fid's dataset gives the model each image as `ToTensor()` makes it — RGB in [0, 1] at its own
size — and the model resizes to 299 × 299 (bilinear, `align_corners=False`). Here that same resize runs
on the host, image by image, so a folder of mixed sizes batches freely and the jitted network compiles
once, for [batch_size, 299, 299, 3] (the last batch is padded; the network's own resize of 299 to 299
is then the identity). Images in file-name order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from jaxsd.errors import InputError
from jaxsd.metrics.inception import FID_SIZE, FIDInceptionV3, bilinear_matrix
from jaxsd.metrics.pairs import image_files, load_rgb


def to_fid_input(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [299, 299, 3] in [0, 1], resized as pytorch-fid's model resizes."""
    x = img.astype(np.float32) / 255.0
    x = np.einsum("oh,hwc->owc", bilinear_matrix(img.shape[0], FID_SIZE), x)
    return np.einsum("pw,owc->opc", bilinear_matrix(img.shape[1], FID_SIZE), x)


def _batches(paths: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    """[batch_size, 299, 299, 3] float32 batches in file order; the last one holds fewer images."""
    for start in range(0, len(paths), batch_size):
        yield np.stack([to_fid_input(load_rgb(p)) for p in paths[start:start + batch_size]])


def folder_features(folder: Path, params: dict, batch_size: int = 50,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Pool features [N, 2048] (float32) of the N images directly in `folder` (any sizes)."""
    paths = list(image_files(folder).values())
    if len(paths) < 2:
        raise InputError(f"{folder}: {len(paths)} image(s); FID statistics need at least 2 (a covariance), "
                         "and thousands for a meaningful FID")
    return image_features(paths, params, batch_size, progress)


def image_features(paths: list[Path], params: dict, batch_size: int = 50,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Pool features [N, 2048] (float32) of the images at `paths`, in their order."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be ≥ 1; got {batch_size}")
    batch_size = min(batch_size, len(paths))  # as pytorch-fid
    apply = jax.jit(lambda p, x: FIDInceptionV3().apply({"params": p}, x))
    out = []
    for batch in _batches(paths, batch_size):
        x = np.zeros((batch_size, FID_SIZE, FID_SIZE, 3), np.float32)  # one shape, one compile
        x[: len(batch)] = batch
        out.append(np.asarray(jax.device_get(apply(params, x)))[: len(batch)])
        if progress is not None:
            progress(len(batch))
    return np.concatenate(out)
