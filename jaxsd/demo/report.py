"""The demo's outputs for people: the labelled sample grid, metrics.json and the printed summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

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
