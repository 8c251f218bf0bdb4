"""The files `jaxsd sample` reads and names: init image, mask, initial latents, a prompts file, output names.

Images and masks are prepared as diffusers' image processors do (Lanczos resize; a mask converted to
grayscale "L" and scaled to [0, 1]; the pipeline binarises it), so a run reproduces a diffusers one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxsd.errors import InputError, InputNotFoundError


def _open_image(path: str, flag: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise InputNotFoundError(f"{flag} {path}: no such file")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:  # only the user's file is read here
        raise InputError(f"{flag} {path}: not a readable image ({e})") from e
    return img


def _resized(img, height: int | None, width: int | None, factor: int):
    """img resized (Lanczos) to height x width, or to its own size rounded down to a multiple of `factor`."""
    from PIL import Image

    w0, h0 = img.size
    width = width or (w0 - w0 % factor)
    height = height or (h0 - h0 % factor)
    return img if (width, height) == (w0, h0) else img.resize((width, height), resample=Image.LANCZOS)


def load_image(path: str, height: int | None, width: int | None, factor: int) -> np.ndarray:
    """RGB uint8 [H,W,3]; resized (Lanczos, as diffusers' image processor) to height x width, or to the
    image's own size rounded down to a multiple of the VAE factor."""
    return np.asarray(_resized(_open_image(path, "--init-image").convert("RGB"), height, width, factor))


def load_mask(path: str, height: int, width: int) -> np.ndarray:
    """The --mask image as float32 [H, W] in [0, 1] (grayscale, white = 1 = repaint), resized to the init
    image's height x width (Lanczos, as diffusers' mask processor)."""
    img = _open_image(path, "--mask").convert("L")
    if img.size != (width, height):
        from PIL import Image
        img = img.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(img, np.float32) / 255.0


def load_latents(path: str) -> np.ndarray:
    """The --latents file: float32 NCHW, as diffusers' `latents` argument."""
    if not Path(path).is_file():
        raise InputNotFoundError(f"--latents {path}: no such file")
    try:
        latents = np.load(path)
    except (ValueError, OSError) as e:  # only the user's file is read here
        raise InputError(f"--latents {path}: not a .npy array file ({e})") from e
    if latents.dtype != np.float32:
        raise InputError(f"--latents {path}: dtype {latents.dtype}; expected float32 (NCHW)")
    return latents


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped, surrounding spaces dropped."""
    if not Path(path).is_file():
        raise InputNotFoundError(f"--prompts {path}: no such file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--prompts {path}: not UTF-8 text ({e})") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts (the file is empty or only blank lines)")
    return prompts


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt: lowercase ASCII letters/digits joined by '-'."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "prompt"


def batches(items: list, size: int) -> list[tuple[list, int]]:
    """`items` in batches of exactly `size`: (batch, number of real items); the last is padded by repeating
    its final item, so every batch has one shape (one compiled program)."""
    out = []
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        out.append((chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)))
    return out


__all__ = ["batches", "load_image", "load_latents", "load_mask", "read_prompts", "slug"]
