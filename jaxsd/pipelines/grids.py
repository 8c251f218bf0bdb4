"""Grid pictures of generated images: the plain grid `jaxsd sample` writes and the labelled one
(one row per prompt) of the demo and of sample grids during `jaxsd train`."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 [N,H,W,3] → one uint8 [rows*H, cols*W, 3] image, row-major (default: a near-square grid)."""
    n, h, w, c = images.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return out


def label_grid(rows: list[tuple[str, list[np.ndarray]]], *, scale: int = 3,
               marks: list[list[bool]] | None = None) -> Image.Image:
    """A PNG grid: one row per label (text on the left), its uint8 [H,W,3] images to the right, upscaled `scale`x.

    Layout: rows of height H·scale + bar + 4 px, columns W·scale + 4 px, 4 px outer padding, label
    column as wide as the longest label + 8 px. marks: optional per-image verdicts (e.g. a classifier
    agrees with the prompt); drawn as a green (yes) or red (no) bar under each image.
    """
    if not rows or not rows[0][1]:
        raise ValueError("label_grid needs at least one row with at least one image")
    h, w = rows[0][1][0].shape[:2]
    cell_h, cell_w, pad, bar = h * scale, w * scale, 4, 4 if marks is not None else 0
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font)) for label, _ in rows)
    ncols = max(len(imgs) for _, imgs in rows)
    grid = Image.new("RGB", (label_w + ncols * (cell_w + pad) + pad, len(rows) * (cell_h + bar + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (cell_h + bar + pad)
        draw.text((4, y + cell_h // 2 - 5), label, fill="black", font=font)
        for c, image in enumerate(images):
            x = label_w + pad + c * (cell_w + pad)
            grid.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
            if marks is not None:
                draw.rectangle([x, y + cell_h + 1, x + cell_w - 1, y + cell_h + bar - 1],
                               fill=(40, 170, 40) if marks[r][c] else (210, 40, 40))
    return grid
