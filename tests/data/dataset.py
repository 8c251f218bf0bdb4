"""A generated test dataset: good images of several aspect ratios plus one file per bad case.

`make_dataset(root)` returns the expected report: which paths (relative to root)
must be skipped, dropped (caption filter: the word "forbidden") and altered.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) of the good images: square, landscape, portrait, all >= 64.
GOOD_SIZES = [(64, 64), (96, 64), (64, 96), (128, 64), (64, 128), (80, 80), (100, 70), (70, 100)] * 3


def _img(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")


def _caption(root: Path, stem: str, text: str, ext: str = ".txt") -> None:
    (root / f"{stem}{ext}").write_text(text)


def make_dataset(root: str | os.PathLike) -> dict[str, set[str]]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, set[str]] = {"skipped": set(), "dropped": set(), "altered": set(), "kept_good": set()}
    for i, (w, h) in enumerate(GOOD_SIZES):
        name = f"good_{i:02d}.{['jpg', 'png', 'webp', 'jpeg'][i % 4]}"
        _img(w, h, i).save(root / name)
        _caption(root, f"good_{i:02d}", f"a picture number {i}")
        expect["kept_good"].add(name)
    sub = root / "sub"
    sub.mkdir()
    _img(72, 72, 100).save(sub / "nested.jpg")
    _caption(sub, "nested", "a nested picture", ".caption")
    expect["kept_good"].add("sub/nested.jpg")

    # --- skipped ---
    (root / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    _caption(root, "corrupt", "corrupt")
    buf = io.BytesIO()
    _img(96, 96, 1).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _caption(root, "truncated", "truncated")
    _img(40, 40, 2).save(root / "small.png")
    _caption(root, "small", "too small")
    _img(64, 64, 3).save(root / "nocaption.png")
    _img(64, 64, 4).save(root / "emptycaption.png")
    _caption(root, "emptycaption", "   \n")
    _img(64, 64, 5).save(root / "dup.jpg")
    _img(64, 64, 6).save(root / "dup.png")
    _caption(root, "dup", "duplicate stem")
    _img(64, 64, 7).save(root / "noperm.png")
    _caption(root, "noperm", "no permission")
    os.chmod(root / "noperm.png", 0)
    expect["skipped"] |= {"corrupt.jpg", "truncated.png", "small.png", "nocaption.png", "emptycaption.png",
                          "dup.png", "noperm.png"}
    expect["kept_good"].add("dup.jpg")
    # --- dropped by the caption filter ---
    _img(64, 64, 8).save(root / "blocked.png")
    _caption(root, "blocked", "a Forbidden picture")
    expect["dropped"].add("blocked.png")

    # --- altered (kept) ---
    _img(64, 80, 10, "CMYK").save(root / "cmyk.jpg")
    arr16 = (np.random.default_rng(11).integers(0, 65536, (64, 64))).astype(np.uint16)
    Image.fromarray(arr16).save(root / "gray16.png")
    _img(64, 64, 12, "P").save(root / "palette.png")
    pal = _img(64, 64, 13, "P")
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    _img(64, 64, 14, "LA").save(root / "la.png")
    rgba = _img(64, 64, 15, "RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))))
    rgba.save(root / "rgba.png")
    rotated = _img(96, 64, 16)  # stored landscape; EXIF says rotate 90° -> portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(root / "exif_rotated.jpg", exif=exif)
    for stem in ("cmyk", "gray16", "palette", "palette_alpha", "la", "rgba", "exif_rotated"):
        _caption(root, stem, f"an odd {stem} image")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    _img(64, 64, 17).save(root / "latin1.png")
    expect["altered"] |= {"cmyk.jpg", "gray16.png", "palette.png", "palette_alpha.png", "la.png", "rgba.png",
                          "exif_rotated.jpg", "latin1.png"}
    return expect
