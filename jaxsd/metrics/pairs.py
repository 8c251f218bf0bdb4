"""Same-named image pairs of two folders (`jaxsd eval --pairs A_DIR B_DIR`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxsd.data.images import decode, read_bytes, to_rgb
from jaxsd.errors import InputError, InputNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_files(folder: Path) -> dict[str, Path]:
    """{file name: path} of the images directly in `folder`."""
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: no such folder")
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def find_pairs(a_dir: Path, b_dir: Path) -> tuple[list[str], list[str]]:
    """(names in both folders, names in only one of them), both sorted; InputError when none pair up."""
    a, b = image_files(a_dir), image_files(b_dir)
    both = sorted(set(a) & set(b))
    if not both:
        raise InputError(f"no image of {a_dir} ({len(a)} images) has a same-named image in {b_dir} ({len(b)} images): "
                         "--pairs compares A_DIR/x.png with B_DIR/x.png")
    return both, sorted(set(a) ^ set(b))


def load_rgb(path: Path) -> np.ndarray:
    """An image as uint8 RGB [H, W, 3] (16-bit, CMYK, palette, alpha: converted as `jaxsd cache` does)."""
    try:
        img, _ = to_rgb(decode(read_bytes(path)))
    except OSError as e:
        raise InputError(f"{path}: not a readable image ({e})") from None
    return np.asarray(img)


def load_pair(a_dir: Path, b_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The pair `name` as float32 [H, W, 3] in [0, 1]; InputError when their sizes differ."""
    a, b = load_rgb(a_dir / name), load_rgb(b_dir / name)
    if a.shape != b.shape:
        raise InputError(f"{name}: {a_dir / name} is {a.shape[1]}×{a.shape[0]} but {b_dir / name} is "
                         f"{b.shape[1]}×{b.shape[0]}; pairs must have the same size")
    return a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0
