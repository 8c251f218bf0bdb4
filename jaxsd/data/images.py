"""Decoding images into clean RGB and preprocessing them for the VAE.

`to_rgb` turns whatever PIL opened (EXIF-rotated, CMYK, 16-bit, palette,
grayscale, with alpha) into an 8-bit RGB image and says what it changed, so the
validation report can list it. `prepare` resizes to cover the target size,
crops (center or random), optionally flips, and returns the pixels in [-1, 1]
together with the SDXL conditioning metadata of that exact crop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_ORIENTATION = 0x0112  # EXIF tag


def read_bytes(path) -> bytes:
    """The file's bytes (one function so tests can simulate I/O failures)."""
    with open(path, "rb") as fh:
        return fh.read()


def decode(data: bytes) -> Image.Image:
    """Decode fully (not lazily), so a truncated or corrupt file fails here, not mid-training."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    # "I;16*" is 16-bit gray (0..65535); "I" (32-bit int) holds 16-bit PNGs in some PIL versions,
    # so values above 255 mean a 16-bit range; "F" is 0..1 or 0..255 by convention.
    arr = np.asarray(img, dtype=np.float64)
    peak = arr.max(initial=0)
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        top = 65535.0
    else:
        top = 1.0 if img.mode == "F" and peak <= 1.0 else 255.0
    return Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, list[str]]:
    """An 8-bit RGB, upright version of `img`, and a list of what was changed (for the report)."""
    notes: list[str] = []
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block must not make the image unusable: keep it unrotated
        orientation = 1
        notes.append("unreadable EXIF ignored")
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    if img.mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette converted" + (" (with transparency)" if has_alpha else ""))
    if img.mode in _HIGH_DEPTH:
        notes.append(f"{'16-bit' if '16' in img.mode else 'high bit depth'} image ({img.mode}) reduced to 8-bit")
        img = _sixteen_to_eight(img)
    if img.mode in _ALPHA:
        alpha_mode = img.mode
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
        notes.append(f"{alpha_mode} composited on background {tuple(background)}")
    elif img.mode != "RGB":
        # Plain grayscale is an ordinary image, not worth a report line; anything else is.
        if img.mode not in ("L", "1"):
            notes.append(f"{img.mode} converted to RGB")
        img = img.convert("RGB")
    return img, notes


@dataclass(frozen=True)
class Prepared:
    """One preprocessed image.

    pixels: [H, W, 3] float32 in [-1, 1] (H, W = target size).
    time_ids: SDXL micro-conditioning [6] = original (h, w), crop top-left (top, left), target (h, w).
    """

    pixels: np.ndarray
    time_ids: np.ndarray


def resize_cover(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize so the image covers (height, width) with aspect kept; LANCZOS down, BICUBIC up."""
    scale = max(height / img.height, width / img.width)
    new_w = max(width, round(img.width * scale))
    new_h = max(height, round(img.height * scale))
    if (new_w, new_h) == img.size:
        return img
    return img.resize((new_w, new_h), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def prepare(img: Image.Image, height: int, width: int, *, crop: str = "center", flip: bool = False,
            rng: np.random.Generator | None = None) -> Prepared:
    """Resize `img` (RGB) to cover (height, width), crop, optionally flip horizontally.

    The crop top-left is in the resized image's coordinates, as SDXL was trained;
    for a flipped image it is mirrored (the crop's left edge seen in the flipped image).
    """
    orig_h, orig_w = img.height, img.width
    resized = resize_cover(img, height, width)
    spare_h, spare_w = resized.height - height, resized.width - width
    if crop == "center":
        top, left = spare_h // 2, spare_w // 2
    elif crop == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        top, left = int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))
    else:
        raise ValueError(f"crop={crop!r}: use 'center' or 'random'")
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    if flip:
        pixels = pixels[:, ::-1]
        left = spare_w - left
    pixels = pixels / 127.5 - 1.0
    time_ids = np.array([orig_h, orig_w, top, left, height, width], dtype=np.float32)
    return Prepared(np.ascontiguousarray(pixels), time_ids)
