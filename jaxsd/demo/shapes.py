"""The demo's generated dataset: coloured shapes with captions like "a red circle".

Every image is one filled shape (circle, square or triangle) in one of four
well-separated colours, of varied size and position, on a light, lightly
noise-textured background. Images are written in the standard folder layout
that `jaxsd cache` reads: `NAME.png` next to `NAME.txt` (the caption).

Rendering is anti-aliased (drawn at 4x and box-downsampled) so the images look
like ordinary small pictures, not hard binary masks the classifier would find
trivially easy. Everything is a pure function of the seed.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# RGB in 0..255. Far apart from each other and from the light background, so a
# nearest-colour rule on the foreground mean is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 65, 215),
    "yellow": (235, 200, 25),
}

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Example:
    """One generated image's label; `caption` is what goes into NAME.txt."""

    colour: str
    shape: str

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def all_prompts() -> list[Example]:
    """Every (colour, shape) combination in a fixed order: the demo's prompt list."""
    return [Example(c, s) for c, s in itertools.product(COLOURS, SHAPES)]


def caption_words() -> list[str]:
    """Every word any caption uses (what the demo tokenizer's vocabulary must cover)."""
    return sorted({w for e in all_prompts() for w in e.caption.split()})


def _shape_mask(shape: str, size: int, cx: float, cy: float, extent: float) -> np.ndarray:
    """Boolean [size, size] mask (supersampled grid) of a shape of bounding extent `extent`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    half = extent / 2
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    if shape == "triangle":
        # Upright isosceles triangle filling its extent x extent bounding box:
        # apex at top-centre, base along the bottom. Half-width grows linearly downwards.
        top, bottom = cy - half, cy + half
        t = (yy - top) / extent
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half * t)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(example: Example, rng: np.random.Generator, resolution: int = 32) -> np.ndarray:
    """One anti-aliased RGB uint8 image [resolution, resolution, 3] of `example`.

    The shape's extent is 35–65% of the image side; its position is uniform over
    places where it fits whole with a 1-pixel margin.
    """
    if example.colour not in COLOURS:
        raise ValueError(f"unknown colour {example.colour!r}; expected one of {list(COLOURS)}")
    r = resolution
    extent = rng.uniform(0.35, 0.65) * r
    margin = extent / 2 + 1
    cx = rng.uniform(margin, r - margin)
    cy = rng.uniform(margin, r - margin)
    s = _SUPERSAMPLE
    mask = _shape_mask(example.shape, r * s, cx * s, cy * s, extent * s)
    # Box-downsample the supersampled mask to fractional coverage per pixel.
    coverage = mask.reshape(r, s, r, s).mean(axis=(1, 3))[..., None]

    grey = rng.uniform(200, 240)
    tint = rng.uniform(-8, 8, size=3)
    background = grey + tint + rng.normal(0, 3.0, size=(r, r, 3))  # light texture
    colour = np.asarray(COLOURS[example.colour], np.float64) + rng.uniform(-12, 12, size=3)
    foreground = colour + rng.normal(0, 3.0, size=(r, r, 3))
    image = coverage * foreground + (1 - coverage) * background
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_examples(count: int, rng: np.random.Generator) -> list[Example]:
    """`count` labels, balanced over every (colour, shape) prompt, in shuffled order."""
    prompts = all_prompts()
    labels = [prompts[i % len(prompts)] for i in range(count)]
    order = rng.permutation(count)
    return [labels[i] for i in order]


def write_dataset(folder: str | os.PathLike, count: int, *, seed: int, resolution: int = 32) -> list[Example]:
    """Write `count` images + captions to `folder` (NAME.png / NAME.txt). Returns the labels in file order.

    File names are zero-padded indices, so sorting the folder gives the returned order.
    """
    if count < 1:
        raise ValueError(f"dataset size must be at least 1, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    examples = make_examples(count, rng)
    width = max(5, len(str(count - 1)))
    for i, example in enumerate(examples):
        image = render(example, rng, resolution)
        name = f"{i:0{width}d}"
        Image.fromarray(image).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(example.caption + "\n")
    return examples


def read_labelled_folder(folder: str | os.PathLike) -> tuple[np.ndarray, list[Example]]:
    """Read a folder written by `write_dataset`: images uint8 [N, H, W, 3] and labels parsed from captions."""
    folder = Path(folder)
    pngs = sorted(folder.glob("*.png"))
    if not pngs:
        raise FileNotFoundError(f"no .png images in {folder}")
    images, labels = [], []
    for png in pngs:
        words = (png.with_suffix(".txt")).read_text().split()
        if len(words) != 3 or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(f"{png.with_suffix('.txt')}: caption {' '.join(words)!r} is not 'a <colour> <shape>'")
        images.append(np.asarray(Image.open(png).convert("RGB")))
        labels.append(Example(words[1], words[2]))
    return np.stack(images), labels
