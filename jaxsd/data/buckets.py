"""Aspect-ratio buckets: target sizes of about equal pixel area with sides multiples of `step`.

Training at one fixed square crop throws away the edges of every non-square
image; bucketing instead resizes each image to the bucket whose aspect ratio is
closest to its own and crops only the small remainder. Batches are then drawn
from one bucket at a time so every batch has one shape.
"""

from __future__ import annotations

import math

from jaxsd.data.config import ImageConfig
from jaxsd.errors import ConfigError


def make_buckets(resolution: int, *, min_side: int = 256, max_side: int = 1024, step: int = 64,
                 max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """All (height, width) buckets of about resolution**2 pixels, sides multiples of `step`.

    For each short side s (multiples of `step` from min_side up to the square) the long
    side is the largest multiple of `step` keeping s*long <= resolution**2; both
    orientations are buckets. Taking only the longest side per short side keeps
    every bucket within one `step` of the pixel budget (about equal memory and
    compute per sample). Sorted by aspect ratio h/w.
    """
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    short = math.ceil(min_side / step) * step
    while short * short <= area:
        long = min(max_side, (area // short) // step * step)
        if long >= short and long / short <= max_aspect:
            buckets.add((short, long))
            buckets.add((long, short))
        short += step
    if not buckets:
        raise ConfigError(f"no bucket fits resolution={resolution}, min_side={min_side}, max_side={max_side}, "
                          f"step={step}, max_aspect={max_aspect}")
    return sorted(buckets, key=lambda hw: (hw[0] / hw[1], hw[0]))


def closest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2
    are equally far from 1:1); ties go to the larger bucket (less upscaling)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - ratio), -hw[0] * hw[1]))


def target_size(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """(height, width) an image of this size is trained at under `cfg`."""
    if not cfg.buckets.enabled:
        return cfg.resolution, cfg.resolution
    b = cfg.buckets
    return closest_bucket(height, width, make_buckets(cfg.resolution, min_side=b.min_side, max_side=b.max_side,
                                                      step=b.step, max_aspect=b.max_aspect))
