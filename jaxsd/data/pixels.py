"""Images as training samples, read straight from the sources (VAE training: pixels, not cached latents).

    loader = pixel_loader(cfg.data, mesh=mesh, batch_size=32)   # batches {"pixels": [b, H, W, 3], "index"}

The same path as `jaxsd cache` up to the pixels: `data.roots` / subsets / TFDS through
`jaxsd.data.sources`, the validation pass (`jaxsd.data.validate`, without captions: an autoencoder needs
none; the report is logged and written like the cache's), aspect-ratio buckets from `data.image`.
Then, instead of encoding, `ImageStore` hands the grain `Loader` each image decoded at every draw,
resized to cover its target size and cropped: `data.image.crop: random` draws a new crop each time the
image is drawn (from the draw's generator, a function of loader seed, epoch and slot, so a resumed run
sees the same crops), `center` always the middle; with `data.image.random_flip` a horizontal flip at
random (free for pixels, unlike latents). Sharding over processes, the data order and its checkpointed
position are the loader's, exactly as for cached latents.

Every process scans and validates every image at start-up (all of them need the same global order):
one decode per image and process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import numpy as np

from jaxsd.data.config import DataConfig
from jaxsd.data.images import prepare, to_rgb
from jaxsd.data.loader import Loader
from jaxsd.data.sources import open_sources
from jaxsd.data.store import CacheStore
from jaxsd.data.validate import report_path, validate
from jaxsd.errors import InputError

log = logging.getLogger(__name__)


class ImageStore(CacheStore):
    """The valid images of `cfg`'s sources as a `CacheStore` without a cache: the same entries (location = source,
    key, bucket (h, w), {}) that the store's methods and the loader read; `read(i, flip, rng)` →
    {"pixels": [h, w, 3] float32 in [-1, 1]}. No latents and no text (an autoencoder needs no captions)."""

    def __init__(self, cfg: DataConfig, *, log_fn: Callable[[str], None] = log.info):
        self.cfg, self.latents, self.text = cfg, None, None
        self.sources = open_sources(cfg)
        items, problems = [], []
        for s in self.sources:
            found, probs = s.scan()
            items += found
            problems += probs
        valid, report = validate(self.sources, items, cfg, scan_problems=problems, threads=cfg.loader.threads,
                                 captions=False)
        path = report_path(cfg, self.sources)
        if jax.process_index() == 0:  # every process finds the same: one writes it
            try:
                report.write(path)
            except OSError as e:  # a read-only dataset folder: the summary is still logged
                log_fn(f"validation report not written to {path}: {e}")
            log_fn(report.summary())
        if not valid:
            raise InputError(f"no usable image in {', '.join(str(s.root) for s in self.sources)}: "
                             f"see the validation report {path}")
        self.names = [str(s.root) for s in self.sources]
        self.valid = valid
        self.entries = [(v.item.source, v.item.key, tuple(v.target), {}) for v in valid]
        self.bucket_list = sorted({b for _, _, b, _ in self.entries})

    def read(self, i: int, flip: bool = False, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Image i decoded, resized to cover its target and cropped (random: from `rng`), flipped when `flip`
        and data.image.random_flip."""
        v = self.valid[i]
        img, _ = to_rgb(self.sources[v.item.source].open_image(v.item), self.cfg.validation.background)
        h, w = v.target
        prepared = prepare(img, h, w, crop=self.cfg.image.crop, flip=flip and self.cfg.image.random_flip, rng=rng)
        return {"pixels": prepared.pixels}


def pixel_loader(cfg: DataConfig, *, mesh=None, batch_size: int | None = None) -> Loader:
    """The grain loader of `cfg`'s images as pixels (module docstring); batches {"pixels", "index"}."""
    return Loader(cfg, mesh=mesh, batch_size=batch_size, store=ImageStore(cfg))
