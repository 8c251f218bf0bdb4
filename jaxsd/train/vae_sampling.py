"""Reconstruction grids during VAE training (`model.kind: vae`, `logging.sample_every`).

Every `sample_every` steps the autoencoder being trained — its EMA params when `train.ema.enabled`, else
the current ones — reconstructs a fixed set of images: the first `GRID_IMAGES` valid images of the
data sources (in source order), each resized and center-cropped to `data.image.resolution`, encoded to
the posterior mean and decoded (no sampling noise: the grids of a run differ only by training).
Process 0 writes <run_dir>/samples/step_000123.png — a row of inputs over a row of their
reconstructions — and the TensorBoard image `samples/ema` or `samples/params`.

As the UNet's grids (jaxsd/train/sampling.py): one jitted reshard gathers the params replicated (a
collective: every process calls it), the state is only read, the data iterator is not touched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import Config
from jaxsd.errors import InputError
from jaxsd.models.vae import AutoencoderKL, VAEConfig
from jaxsd.pipelines.grids import label_grid
from jaxsd.train.run_dir import run_path
from jaxsd.train.sampling import GRID_CELL_PIXELS

GRID_IMAGES = 8


def grid_images(cfg: Config, count: int = GRID_IMAGES) -> np.ndarray:
    """The first `count` valid images of the sources, center-cropped squares: float32 [n, R, R, 3] in [-1, 1]."""
    from jaxsd.data.images import prepare, to_rgb
    from jaxsd.data.sources import open_sources
    from jaxsd.data.validate import validate

    data, size = cfg.data, cfg.data.image.resolution
    sources = open_sources(data)
    found = []
    for s in sources:
        items, _ = s.scan()
        valid, _ = validate(sources, items[:4 * count], data, captions=False, threads=data.loader.threads)
        for v in valid[:count - len(found)]:
            img, _ = to_rgb(sources[v.item.source].open_image(v.item), data.validation.background)
            found.append(prepare(img, size, size, crop="center").pixels)
        if len(found) == count:
            break
    if not found:
        raise InputError(f"logging.sample_every: no usable image for the reconstruction grid among the first "
                         f"{4 * count} of each data source ({', '.join(str(s.root) for s in sources)})")
    return np.stack(found)


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ReconstructionSampler:
    """Writes a reconstruction grid when `due(step)`; build with `from_config` (None when off)."""

    def __init__(self, cfg: Config, module: AutoencoderKL, images: np.ndarray, run_dir: str | os.PathLike, mesh: Any,
                 merge: Callable[[Any, Any], Any]):
        self.every, self.ema, self.images = cfg.logging.sample_every, cfg.train.ema.enabled, images
        self.out_dir = run_path(run_dir) / "samples"
        self.tag = "samples/ema" if self.ema else "samples/params"
        self.which = "EMA params" if self.ema else "current params (train.ema is off)"
        self._gather = jax.jit(merge, out_shardings=NamedSharding(mesh, P()))

        def reconstruct(params, x):
            v = {"params": params}
            return module.apply(v, module.apply(v, x, method="encode").mode(), method="decode").astype(jnp.float32)

        self._reconstruct = jax.jit(reconstruct)

    @classmethod
    def from_config(cls, cfg: Config, config: VAEConfig, run_dir: str | os.PathLike, mesh: Any,
                    merge: Callable[[Any, Any], Any]) -> ReconstructionSampler | None:
        """Read the grid's images (before training starts); None when logging.sample_every is 0."""
        if not cfg.logging.sample_every:
            return None
        from jaxsd.train.vae_model import build_vae
        return cls(cfg, build_vae(cfg.model, config), grid_images(cfg), run_dir, mesh, merge)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def path(self, step: int) -> epath.Path:
        return self.out_dir / f"step_{step:06d}.png"

    def __call__(self, step: int, state: Any, logger: Any) -> epath.Path | None:
        """Reconstruct at `step` (call on every process); returns the grid's path on process 0, else None."""
        t0 = time.perf_counter()
        params = self._gather(state.ema if self.ema else state.params, state.frozen)
        if jax.process_index() != 0:
            return None
        local = jax.tree.map(lambda x: x.addressable_data(0), params)
        out = np.asarray(jax.device_get(self._reconstruct(local, jnp.asarray(self.images))))
        rows = [("input", list(_uint8(self.images))), ("reconstruction", list(_uint8(out)))]
        grid = label_grid(rows, scale=max(1, GRID_CELL_PIXELS // max(self.images.shape[1:3])))
        path = self.path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            grid.save(f, format="PNG")
        logger.log_image(self.tag, np.asarray(grid), step)
        logger.message(f"step {step}: reconstruction grid of the {self.which} → {path} "
                       f"({time.perf_counter() - t0:.1f} s)")
        return path
