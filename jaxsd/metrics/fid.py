"""Fréchet Inception Distance from InceptionV3 pool features, as pytorch-fid computes it.

Statistics are the features' mean and covariance (float64, `np.cov(rowvar=False)`, i.e. N − 1);
the distance is ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr(√(Σ₁Σ₂)) with `scipy.linalg.sqrtm`. The npz files
hold `mu` and `sigma`, the keys pytorch-fid's `--save-stats` writes and `calculate_fid_given_paths`
reads, so statistics go both ways between the two tools.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import linalg

from jaxsd.errors import InputError, InputNotFoundError

SQRTM_EPS = 1e-6  # pytorch-fid's offset on the diagonals when Σ₁Σ₂ is singular


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features (N ≥ 2) → (mu [D], sigma [D, D]) in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise InputError(f"FID statistics need features [N ≥ 2, D]; got shape {features.shape} "
                         "(a covariance needs at least 2 images)")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = SQRTM_EPS) -> float:
    """FID between two Gaussians (mu [D], sigma [D, D]); ValueError when √(Σ₁Σ₂) is far from real."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise InputError(f"FID statistics of different sizes: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)  # pytorch-fid passes disp=False (deprecated): the same matrix
    if not np.isfinite(covmean).all():
        # singular product (e.g. fewer images than feature dimensions): as pytorch-fid, shift both diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: √(Σ₁Σ₂) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g} "
                             "(numerically unstable statistics: use more images)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write `mu` and `sigma` as pytorch-fid's `--save-stats` does (np.savez_compressed)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"{path}: statistics are written as .npz (pytorch-fid reads only that suffix)")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an npz written by `save_stats` or pytorch-fid."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such statistics file")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise InputError(f"{path}: no {' or '.join(missing)} array (has {', '.join(f.files)}); "
                             "FID statistics hold mu and sigma")
        return f["mu"][:], f["sigma"][:]
