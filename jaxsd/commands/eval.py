"""Image-quality metrics over same-named image pairs of two folders: PSNR and SSIM.

    jaxsd eval --pairs A_DIR B_DIR --out DIR

Pairs A_DIR/x.png with B_DIR/x.png (any image format `jaxsd cache` reads; 16-bit, CMYK and alpha
are converted to 8-bit RGB the same way) — e.g. originals and their VAE reconstructions, or two
samplers' outputs for the same prompts and seeds. Each pair must have one size. Writes
DIR/metrics.json: the mean PSNR (dB, data range 1) and SSIM (Gaussian window 11, σ 1.5, as
torchmetrics) over the pairs, each pair's values, the names found in only one folder, and versions.
Identical pairs have infinite PSNR: they are counted (`identical_pairs`) and left out of the mean.

Example:
  jaxsd eval --pairs originals/ reconstructions/ --out eval/vae
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxsd.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", nargs=2, required=True, metavar=("A_DIR", "B_DIR"),
                        help="two folders of same-named images to compare pair by pair")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for metrics.json (created)")


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxsd.metrics.image_quality import psnr, ssim
    from jaxsd.metrics.pairs import find_pairs, load_pair

    a_dir, b_dir = Path(args.pairs[0]), Path(args.pairs[1])
    names, unpaired = find_pairs(a_dir, b_dir)
    metrics = jax.jit(lambda a, b: (psnr(a, b), ssim(a, b)))  # compiled once per image size
    per_image = {}
    for name in tqdm(names, desc="pairs", unit="pair"):
        a, b = load_pair(a_dir, b_dir, name)
        if min(a.shape[:2]) <= 5:
            raise InputError(f"{name}: {a.shape[1]}×{a.shape[0]} pixels; SSIM needs images larger than 5×5")
        p, s = jax.device_get(metrics(a[None], b[None]))
        per_image[name] = {"psnr": float(p[0]), "ssim": float(s[0])}
    finite = [v["psnr"] for v in per_image.values() if math.isfinite(v["psnr"])]
    result = {
        "mode": "pairs",
        "a": str(a_dir), "b": str(b_dir),
        "pairs": len(names),
        "psnr": float(np.mean(finite)) if finite else None,
        "ssim": float(np.mean([v["ssim"] for v in per_image.values()])),
        "identical_pairs": len(names) - len(finite),
        "unpaired": unpaired,
        "per_image": {k: {"psnr": v["psnr"] if math.isfinite(v["psnr"]) else None, "ssim": v["ssim"]}
                      for k, v in per_image.items()},
        "versions": _versions(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    if unpaired:
        print(f"{len(unpaired)} image(s) are in only one folder and were left out: {', '.join(unpaired[:5])}"
              + (" ..." if len(unpaired) > 5 else ""))
    psnr_text = f"{result['psnr']:.2f} dB" if result["psnr"] is not None else "inf (all pairs identical)"
    print(f"{len(names)} pairs: PSNR {psnr_text}, SSIM {result['ssim']:.4f} → {out / 'metrics.json'}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jaxsd", "jax"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
