"""Image metrics: PSNR/SSIM over same-named image pairs, or FID reference statistics of a folder.

    jaxsd eval --pairs A_DIR B_DIR --out DIR
    jaxsd eval --stats REAL_DIR --out real_stats.npz --fid-weights pt_inception-2015-12-05-6726825d.pth

--pairs pairs A_DIR/x.png with B_DIR/x.png (any image format `jaxsd cache` reads; 16-bit, CMYK and
alpha are converted to 8-bit RGB the same way) — e.g. originals and their VAE reconstructions, or two
samplers' outputs for the same prompts and seeds. Each pair must have one size. Writes
DIR/metrics.json: the mean PSNR (dB, data range 1) and SSIM (Gaussian window 11, σ 1.5, as
torchmetrics) over the pairs, each pair's values, the names found in only one folder, and versions.
Identical pairs have infinite PSNR: they are counted (`identical_pairs`) and left out of the mean.

--stats computes, once, the FID statistics of a folder of images (any sizes): the mean `mu` and
covariance `sigma` of pytorch-fid's InceptionV3 pool features, saved as pytorch-fid's `--save-stats`
does, so either tool reads the other's file. --fid-weights is pytorch-fid's weights file (.pth, read
with torch.load(weights_only=True)) or the .safetensors copy --save-fid-weights writes of it.

Example:
  jaxsd eval --pairs originals/ reconstructions/ --out eval/vae
  jaxsd eval --stats real/ --out real_stats.npz --fid-weights pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxsd.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pairs", nargs=2, metavar=("A_DIR", "B_DIR"),
                      help="two folders of same-named images to compare pair by pair")
    mode.add_argument("--stats", metavar="REAL_DIR",
                      help="a folder of images whose FID statistics (mu, sigma) to write to --out FILE.npz")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="--pairs: output folder for metrics.json (created); --stats: the .npz file to write")
    fid = parser.add_argument_group("FID (--stats)")
    fid.add_argument("--fid-weights", metavar="PATH",
                     help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or its .safetensors copy")
    fid.add_argument("--save-fid-weights", metavar="FILE.safetensors",
                     help="also write the loaded weights as safetensors (loads later without torch)")
    fid.add_argument("--batch-size", type=int, help="images per InceptionV3 batch (default 50)")


def run(args: argparse.Namespace) -> int:
    if args.stats is not None:
        return _run_stats(args)
    if args.fid_weights or args.save_fid_weights or args.batch_size is not None:
        raise InputError("--fid-weights, --save-fid-weights and --batch-size belong to --stats; "
                         "--pairs computes PSNR and SSIM")
    return _run_pairs(args)


def _run_stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jaxsd.metrics.fid import activation_statistics, save_stats
    from jaxsd.metrics.fid_folder import folder_features
    from jaxsd.metrics.fid_weights import load_fid_weights, save_fid_weights

    out = Path(args.out)
    if out.suffix != ".npz":
        raise InputError(f"--out {out}: --stats writes a .npz file (pytorch-fid reads only that suffix)")
    params = load_fid_weights(args.fid_weights)
    if args.save_fid_weights:
        save_fid_weights(params, args.save_fid_weights)
        print(f"FID weights → {args.save_fid_weights}")
    with tqdm(desc="images", unit="img") as bar:
        features = folder_features(Path(args.stats), params, args.batch_size or 50, progress=bar.update)
    mu, sigma = activation_statistics(features)
    save_stats(out, mu, sigma)
    print(f"{len(features)} images: FID statistics (mu {mu.shape}, sigma {sigma.shape}) → {out}")
    return 0


def _run_pairs(args: argparse.Namespace) -> int:
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
