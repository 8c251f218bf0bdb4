"""The demo's prompt-adherence check: a hand-written classifier on pixels.

No learned model is involved, so it cannot be fooled by (or share the biases
of) the generator it judges. For one RGB image it:

1. estimates the background colour as the median of the border pixels;
2. takes the largest 8-connected blob of pixels far from the background as the
   foreground (so stray specks in generated images do not count);
3. names the colour: the palette colour nearest to the blob's typical colour;
4. names the shape from the fill ratio = area / bounding-box area, both measured
   with sub-pixel coverage (alpha) so small anti-aliased shapes are not biased:
   square ≈ 1.0, circle ≈ π/4 ≈ 0.785, upright triangle ≈ 0.5.

An image with no foreground blob is classified as (None, None) — a miss for
both colour and shape, never a guess. Its accuracy on real held-out images is
measured and reported by the demo before it judges generated ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from jaxsd.demo.shapes import COLOURS, Example

# Minimum RGB distance from the background for a pixel to be foreground candidate.
# Every palette colour is > 150 away from the light background; anti-aliased edge
# pixels and the +-3 background texture fall on either side of this.
FOREGROUND_DISTANCE = 60.0
# Blobs smaller than this many pixels are not a shape (noise); the smallest real
# shape at 32 px covers ~ 0.35^2 * 32^2 * 0.5 ≈ 60 px.
MIN_BLOB_PIXELS = 12
# Fill-ratio decision boundaries: midway between the ranges measured on 1200
# rendered 32 px images (triangle 0.52-0.59, circle 0.76-0.80, square 0.98-0.99).
SQUARE_MIN_FILL = 0.885
CIRCLE_MIN_FILL = 0.67


@dataclass(frozen=True)
class Prediction:
    colour: str | None
    shape: str | None
    fill_ratio: float | None = None


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def _largest_blob(candidate: np.ndarray) -> np.ndarray | None:
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    sizes = ndimage.sum_labels(candidate, labels, index=np.arange(1, n + 1))
    best = int(np.argmax(sizes))
    if sizes[best] < MIN_BLOB_PIXELS:
        return None
    return labels == best + 1


def classify(image: np.ndarray) -> Prediction:
    """Classify one RGB image (uint8 [H, W, 3], or float in [0, 255])."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    pixels = image.astype(np.float64)
    bg = _background(pixels)
    dist = np.linalg.norm(pixels - bg, axis=-1)
    blob = _largest_blob(dist > FOREGROUND_DISTANCE)
    if blob is None:
        return Prediction(None, None)

    # Typical foreground colour: median of the blob's more-saturated half (its
    # interior), away from anti-aliased edges that mix in the background.
    inner = blob & (dist >= np.median(dist[blob]))
    fg = np.median(pixels[inner], axis=0)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], np.float64)
    colour = names[int(np.argmin(np.linalg.norm(palette - fg, axis=-1)))]

    # Coverage of each pixel by the foreground colour, on the bg→fg line, inside
    # the blob grown by one pixel (to include its anti-aliased rim).
    direction = fg - bg
    alpha = np.clip(((pixels - bg) @ direction) / max(direction @ direction, 1e-9), 0.0, 1.0)
    alpha = alpha * ndimage.binary_dilation(blob, structure=np.ones((3, 3), bool))
    area = alpha.sum()
    width = alpha.max(axis=0).sum()  # per-column max coverage, summed: sub-pixel extent
    height = alpha.max(axis=1).sum()
    fill = float(area / max(width * height, 1e-9))
    if fill >= SQUARE_MIN_FILL:
        shape = "square"
    elif fill >= CIRCLE_MIN_FILL:
        shape = "circle"
    else:
        shape = "triangle"
    return Prediction(colour, shape, fill)


def accuracy(images: np.ndarray, labels: list[Example]) -> dict[str, float]:
    """Colour and shape accuracy (fractions in [0, 1]) of `classify` over images [N, H, W, 3]."""
    if len(images) != len(labels) or not labels:
        raise ValueError(f"need one label per image and at least one image; got {len(images)} images, {len(labels)} labels")
    preds = [classify(np.asarray(im)) for im in images]
    colour = sum(p.colour == l.colour for p, l in zip(preds, labels)) / len(labels)
    shape = sum(p.shape == l.shape for p, l in zip(preds, labels)) / len(labels)
    return {"colour_accuracy": float(colour), "shape_accuracy": float(shape)}
