"""`jaxsd eval --pairs A_DIR B_DIR --out DIR`: PSNR, SSIM and (with its weights) LPIPS over same-named image pairs."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxsd.errors import InputError

# what LPIPS's loader names in its errors: this command's flags, not the training config's keys
LPIPS_FLAGS = {"weights": "--lpips-weights", "heads": "--lpips-heads", "allow_pickle": "--allow-pickle"}
LPIPS_HOW = ("LPIPS needs local weights: --lpips-weights VGG16.pth|.safetensors (torchvision's vgg16-397923af.pth) "
             "[--lpips-heads lpips/weights/v0.1/vgg.pth] [--allow-pickle for .pth files]")


def load_lpips_fn(args: argparse.Namespace):
    """A jitted (a, b) -> [N] LPIPS over images in [0, 1], or None without --lpips-weights."""
    if args.lpips_weights is None:
        if args.lpips_heads is not None:
            raise InputError("--lpips-heads goes with --lpips-weights (the VGG16 backbone)")
        return None
    import jax

    from jaxsd.losses.lpips import LPIPS
    from jaxsd.losses.weights import load_lpips

    params = load_lpips(args.lpips_weights, args.lpips_heads, allow_pickle=args.allow_pickle, options=LPIPS_FLAGS)
    apply = jax.jit(lambda p, a, b: LPIPS().apply({"params": p}, 2 * a - 1, 2 * b - 1))  # LPIPS takes [-1, 1]
    return lambda a, b: apply(params, a, b)


def run_pairs(args: argparse.Namespace, versions: dict[str, str]) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxsd.metrics.image_quality import psnr, ssim
    from jaxsd.metrics.pairs import find_pairs, load_pair

    a_dir, b_dir = Path(args.pairs[0]), Path(args.pairs[1])
    names, unpaired = find_pairs(a_dir, b_dir)
    lpips = load_lpips_fn(args)  # before the loop: a wrong weights file costs no image reads
    metrics = jax.jit(lambda a, b: (psnr(a, b), ssim(a, b)))  # compiled once per image size
    per_image = {}
    for name in tqdm(names, desc="pairs", unit="pair"):
        a, b = load_pair(a_dir, b_dir, name)
        if min(a.shape[:2]) <= 5:
            raise InputError(f"{name}: {a.shape[1]}×{a.shape[0]} pixels; SSIM needs images larger than 5×5")
        p, s = jax.device_get(metrics(a[None], b[None]))
        per_image[name] = {"psnr": float(p[0]) if math.isfinite(p[0]) else None, "ssim": float(s[0])}
        if lpips is not None:
            per_image[name]["lpips"] = float(jax.device_get(lpips(a[None], b[None]))[0])
    finite = [v["psnr"] for v in per_image.values() if v["psnr"] is not None]
    result = {
        "mode": "pairs",
        "a": str(a_dir), "b": str(b_dir),
        "pairs": len(names),
        "psnr": float(np.mean(finite)) if finite else None,
        "ssim": float(np.mean([v["ssim"] for v in per_image.values()])),
        "lpips": float(np.mean([v["lpips"] for v in per_image.values()])) if lpips is not None else None,
        "identical_pairs": len(names) - len(finite),
        "unpaired": unpaired,
        "skipped": {} if lpips is not None else {"lpips": LPIPS_HOW},
        "per_image": per_image,
        "versions": versions,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    if unpaired:
        print(f"{len(unpaired)} image(s) are in only one folder and were left out: {', '.join(unpaired[:5])}"
              + (" ..." if len(unpaired) > 5 else ""))
    psnr_text = f"{result['psnr']:.2f} dB" if result["psnr"] is not None else "inf (all pairs identical)"
    lpips_text = f", LPIPS {result['lpips']:.4f}" if lpips is not None else ""
    print(f"{len(names)} pairs: PSNR {psnr_text}, SSIM {result['ssim']:.4f}{lpips_text} → {out / 'metrics.json'}")
    if lpips is None:
        print(f"LPIPS left out: {LPIPS_HOW}")
    return 0
