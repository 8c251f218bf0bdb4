"""Numbered images generated resumably: image i starts from the noise of `seed + i`, whatever batch it lands in.

    for done in generate_indexed(pipe, [(i, prompt_i), ...], seed=0, height=512, width=512, batch_size=8,
                                 devices=jax.local_devices(), steps=30, guidance=7.5, sampler="dpmpp_2m"):
        for i, image in done: save_png(folder / f"{i:05d}.png", image)

So a run that stops halfway and starts again makes exactly the images a straight run makes: the caller
passes only the indices it has no finished file for (`save_png` writes under a temporary name and renames,
so a half-written PNG never counts as done). Used by DreamBooth's class images (`train/dreambooth.py`)
and `jaxsd eval --model`. Batches have one shape (the last is padded with its own last item: one compile)
and are split data parallel over `devices` (rounded up to a multiple of their count).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np


def initial_noise(pipe, seed: int, height: int, width: int) -> np.ndarray:
    """The NCHW float32 starting noise [1, C, h, w] of one image, from its own seed."""
    shape = pipe.latent_shape(1, height, width)
    noise = jax.random.normal(jax.random.key(seed), (shape[0], shape[2], shape[3], shape[1]), np.float32)
    return np.asarray(noise).transpose(0, 3, 1, 2)


def device_batch_size(batch_size: int, devices: int) -> int:
    """batch_size rounded up to a multiple of the device count, so every device gets the same share."""
    return -(-max(1, batch_size) // devices) * devices


def generate_indexed(pipe, items: Sequence[tuple[int, str]], *, seed: int, height: int, width: int,
                     batch_size: int, devices: Sequence[jax.Device] | None = None,
                     negative_prompt: str | None = None, **options) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Yield, batch by batch, [(index, uint8 [H, W, 3])] for `items` = [(index, prompt)].

    batch_size: as given (round it with `device_batch_size` for several devices). options: the rest of
    `StableDiffusion.generate`'s keywords (steps, guidance, sampler, ...)."""
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        latents = np.concatenate([initial_noise(pipe, seed + i, height, width) for i, _ in padded])
        negative = None if negative_prompt is None else [negative_prompt] * batch_size
        images = pipe.generate([p for _, p in padded], negative_prompt=negative, seed=seed, height=height,
                               width=width, latents=latents, devices=devices, **options)
        yield [(i, img) for (i, _), img in zip(chunk, images)]


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write `image` to `path` under a temporary name first: the finished PNG is the mark of a finished image."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
