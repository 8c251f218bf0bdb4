"""The demo's outputs for people: the labelled sample grid, metrics.json and the printed summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# metrics.json always has exactly these keys (fractions in [0, 1], seconds as a number).
METRIC_KEYS = ("colour_accuracy", "shape_accuracy", "vae_psnr", "seconds_total")


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8-range images (any shape; both in [0, 255])."""
    a = np.asarray(images, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Model-range images in [-1, 1] → uint8 [0, 255] (rounded, clipped), as diffusers' pipelines do."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def label_grid(rows: list[tuple[str, list[np.ndarray]]], *, scale: int = 3, marks: list[list[bool]] | None = None) -> Image.Image:
    """A PNG grid: one row per label (text on the left), its images to the right, upscaled `scale`x.

    marks: optional per-image verdicts (classifier agrees with the prompt); drawn as a
    green (yes) or red (no) bar under each image, so the grid shows what was counted.
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


def write_metrics(path: str | os.PathLike, metrics: dict, extra: dict | None = None) -> dict:
    """Write metrics.json with exactly METRIC_KEYS; `extra` details go to a sibling metrics_detail.json."""
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics are missing {missing}")
    out = {k: float(metrics[k]) for k in METRIC_KEYS}
    path = Path(path)
    path.write_text(json.dumps(out, indent=2) + "\n")
    if extra is not None:
        path.with_name("metrics_detail.json").write_text(json.dumps(extra, indent=2, default=float) + "\n")
    return out
