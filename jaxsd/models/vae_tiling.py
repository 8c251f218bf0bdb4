"""Tiled VAE encode/decode for large images, blended exactly as diffusers does.

Device memory stays that of one tile whatever the image size: each tile runs
through one jitted encoder/decoder call (a full tile or, at the bottom/right
edges, up to two cut-short sizes per axis — at most nine shapes, so at most
nine compilations), and only the blend, on the host, sees the whole image.

The tile grid and blend are diffusers' `AutoencoderKL.tiled_encode` /
`tiled_decode` (with `enable_tiling()`), so results match it at the same
settings:

* tiles of `sample_size` pixels (`latent_size` latents) start every
  `int(size * (1 - overlap))` along each axis; edge tiles are cut short;
* each tile is blended with its already-blended upper and left neighbours
  over `int(other_size * overlap)` rows/columns with linear weights
  (a * (1 - k/e) + b * k/e), then cropped to `other_size - e`;
* an input no larger than one tile is not tiled (as diffusers).

Tiling changes the numbers slightly compared with untiled encode/decode (each
tile sees only its own context; GroupNorm statistics are per tile) — that is
the price of bounded memory, and the same price diffusers users pay.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


@dataclass(frozen=True)
class TileSettings:
    """Tile sizes in pixels and latents, and the overlap fraction (diffusers' names in brackets).

    sample_size: tile side in pixels [tile_sample_min_size]; default the config's `sample_size`.
    latent_size: tile side in latents [tile_latent_min_size]; default int(sample_size / downscale).
    overlap: fraction of a tile shared with its neighbour [tile_overlap_factor], 0 ≤ overlap < 1.
    """

    sample_size: int
    latent_size: int
    overlap: float = 0.25

    def __post_init__(self):
        if self.sample_size < 1 or self.latent_size < 1:
            raise ValueError(f"TileSettings: tile sizes must be positive, got sample_size={self.sample_size}, "
                             f"latent_size={self.latent_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"TileSettings: overlap={self.overlap} must be in [0, 1)")

    @classmethod
    def for_config(cls, config: VAEConfig, sample_size: int | None = None, overlap: float = 0.25) -> TileSettings:
        """diffusers' defaults for `config`, or tiles of `sample_size` pixels."""
        if sample_size is None:
            s = config.sample_size
            sample_size = int(s[0] if isinstance(s, tuple) else s)
        return cls(sample_size, int(sample_size / config.downscale), overlap)


@functools.lru_cache(maxsize=16)
def _jitted(model: AutoencoderKL, method: str):
    # One jitted function per (model, method); jax caches one compilation per tile shape.
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """b's first rows faded in from a's last rows. a, b: [B, H, W, C] (NHWC: rows are axis 1)."""
    extent = min(a.shape[1], b.shape[1], extent)
    w = (np.arange(extent) / extent).astype(b.dtype)[None, :, None, None]
    b = b.copy()
    b[:, :extent] = a[:, a.shape[1] - extent:] * (1 - w) + b[:, :extent] * w
    return b


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """b's first columns faded in from a's last columns. a, b: [B, H, W, C]."""
    extent = min(a.shape[2], b.shape[2], extent)
    w = (np.arange(extent) / extent).astype(b.dtype)[None, None, :, None]
    b = b.copy()
    b[:, :, :extent] = a[:, :, a.shape[2] - extent:] * (1 - w) + b[:, :, :extent] * w
    return b


def _tiled(fn, x: jax.Array, in_size: int, out_size: int, overlap: float) -> jax.Array:
    """Run `fn` on overlapping tiles of x [B, H, W, C] and blend its outputs as diffusers does.

    Tiles come back to host memory one by one and are blended there with numpy:
    the blend is cheap elementwise work, and on device every differently shaped
    slice would cost an XLA compilation.
    """
    stride = int(in_size * (1 - overlap))
    extent = int(out_size * overlap)
    keep = out_size - extent
    if stride < 1:
        raise ValueError(f"tiling: tile of {in_size} with overlap {overlap} gives a stride of 0")
    x = np.asarray(x)  # slice on host: a device slice per tile position would each compile
    rows = [[np.asarray(fn(x[:, i:i + in_size, j:j + in_size])) for j in range(0, x.shape[2], stride)]
            for i in range(0, x.shape[1], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, extent)
            row[j] = tile  # later neighbours blend with the blended tile, as diffusers' in-place update does
            kept.append(tile[:, :keep, :keep])
        out_rows.append(np.concatenate(kept, axis=2))
    return jnp.asarray(np.concatenate(out_rows, axis=1))


def tiled_encode_moments(model: AutoencoderKL, params, x: jax.Array, settings: TileSettings | None = None) -> jax.Array:
    """x [B, H, W, in] -> moments [B, h, w, 2*latent], tiled when H or W exceeds the tile."""
    settings = settings or TileSettings.for_config(model.config)
    fn = functools.partial(_jitted(model, "encode_moments"), params)
    if x.shape[1] <= settings.sample_size and x.shape[2] <= settings.sample_size:
        return fn(x)
    return _tiled(fn, x, settings.sample_size, settings.latent_size, settings.overlap)


def tiled_encode(model: AutoencoderKL, params, x: jax.Array, settings: TileSettings | None = None) -> DiagonalGaussian:
    """Tiled `encode`: x [B, H, W, in] in [-1, 1] -> DiagonalGaussian over [B, h, w, latent].

    The blended moments are split and logvar clipped afterwards, as diffusers does.
    """
    return DiagonalGaussian.from_moments(tiled_encode_moments(model, params, x, settings))


def tiled_decode(model: AutoencoderKL, params, z: jax.Array, settings: TileSettings | None = None) -> jax.Array:
    """Tiled `decode`: z [B, h, w, latent] -> image [B, H, W, out], tiled when h or w exceeds the tile."""
    settings = settings or TileSettings.for_config(model.config)
    fn = functools.partial(_jitted(model, "decode"), params)
    if z.shape[1] <= settings.latent_size and z.shape[2] <= settings.latent_size:
        return fn(z)
    return _tiled(fn, z, settings.latent_size, settings.sample_size, settings.overlap)


__all__ = ["TileSettings", "tiled_decode", "tiled_encode", "tiled_encode_moments"]
