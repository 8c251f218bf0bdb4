"""Image metrics: PSNR/SSIM/LPIPS over same-named image pairs, FID reference statistics of a folder, or a
model's images generated and scored (FID, CLIP score).

    jaxsd eval --pairs A_DIR B_DIR --out DIR
    jaxsd eval --stats REAL_DIR --out real_stats.npz --fid-weights pt_inception-2015-12-05-6726825d.pth
    jaxsd eval --model DIR --prompts prompts.txt --num-images N --reference REAL_DIR|stats.npz
               [--fid-weights PATH] [--clip DIR] [--steps 30 --scheduler dpmpp_2m --guidance 7.5 --seed 0] --out DIR

--pairs pairs A_DIR/x.png with B_DIR/x.png (any image format `jaxsd cache` reads; 16-bit, CMYK and
alpha are converted to 8-bit RGB the same way) — e.g. originals and their VAE reconstructions, or two
samplers' outputs for the same prompts and seeds. Each pair must have one size. Writes
DIR/metrics.json: the mean PSNR (dB, data range 1) and SSIM (Gaussian window 11, σ 1.5, as
torchmetrics) over the pairs, each pair's values, the names found in only one folder, and versions.
Identical pairs have infinite PSNR: they are counted (`identical_pairs`) and left out of the mean.
With --lpips-weights (the VGG16 backbone; --lpips-heads the LPIPS v0.1 heads) it adds LPIPS (the `lpips` package's VGG v0.1) per pair and its mean; without, LPIPS is left out
and `skipped` says how to add it.

--stats computes, once, the FID statistics of a folder of images (any sizes): the mean `mu` and
covariance `sigma` of pytorch-fid's InceptionV3 pool features, saved as pytorch-fid's `--save-stats`
does, so either tool reads the other's file. --fid-weights is pytorch-fid's weights file (.pth) or the
.safetensors copy --save-fid-weights writes of it.

Every .pth weights file (--lpips-weights, --lpips-heads, --fid-weights) is a pickle, and unpickling can run
code: it is read (torch.load(weights_only=True)) only with --allow-pickle, in every mode.

--model generates N images (DIR/images/NNNNN.png: prompt i mod P from the noise of --seed + i, batched
over the devices; images already there are reused) and writes DIR/metrics.json with FID against
--reference (with --fid-weights) and the CLIP score (with --clip DIR), and DIR/grid.png (eval_modes/model.py).

Example:
  jaxsd eval --pairs originals/ reconstructions/ --out eval/vae
  jaxsd eval --pairs originals/ reconstructions/ --out eval/vae --lpips-weights vgg16-397923af.pth --allow-pickle
  jaxsd eval --stats real/ --out real_stats.npz --fid-weights pt_inception-2015-12-05-6726825d.pth --allow-pickle \
             --save-fid-weights fid_inception.safetensors
  jaxsd eval --model ./sd15 --prompts prompts.txt --num-images 1000 --reference real_stats.npz \
             --fid-weights fid_inception.safetensors --clip ./clip-vit-large-patch14 --out eval/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsd.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pairs", nargs=2, metavar=("A_DIR", "B_DIR"),
                      help="two folders of same-named images to compare pair by pair")
    mode.add_argument("--stats", metavar="REAL_DIR",
                      help="a folder of images whose FID statistics (mu, sigma) to write to --out FILE.npz")
    mode.add_argument("--model", metavar="DIR|FILE",
                      help="a pipeline folder (or single-file checkpoint) to generate images with and score")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="--pairs, --model: output folder for metrics.json (created); --stats: the .npz file")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read .pth weight files (pickles: --lpips-weights, --lpips-heads, --fid-weights) with "
                             "torch.load(weights_only=True); without it they are refused")
    gen = parser.add_argument_group("generation (--model)")
    gen.add_argument("--prompts", metavar="FILE", help="one prompt per line; image i uses prompt i mod P")
    gen.add_argument("--num-images", type=int, metavar="N", help="images to generate and score")
    gen.add_argument("--reference", metavar="REAL_DIR|stats.npz",
                     help="FID's reference: a folder of real images, or their statistics (jaxsd eval --stats)")
    gen.add_argument("--clip", metavar="DIR", help="a transformers CLIPModel folder: adds the CLIP score")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE", help="LoRA file(s) to apply")
    gen.add_argument("--lora-scale", type=float, nargs="+", metavar="S", help="one scale per --lora (default 1.0)")
    gen.add_argument("--steps", type=int, metavar="N", help="denoising steps (default 30)")
    gen.add_argument("--scheduler", metavar="NAME", help="sampler, as jaxsd sample's (default dpmpp_2m)")
    gen.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale (default 7.5)")
    gen.add_argument("--seed", type=int, metavar="S", help="image i starts from the noise of seed + i (default 0)")
    gen.add_argument("--height", type=int, metavar="H", help="image height (default: the model's)")
    gen.add_argument("--width", type=int, metavar="W", help="image width (default: the model's)")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default float32)")
    lpips = parser.add_argument_group("LPIPS (--pairs)")
    lpips.add_argument("--lpips-weights", metavar="PATH",
                       help="the VGG16 backbone (torchvision's vgg16-397923af.pth, or a .safetensors copy); "
                            "without it LPIPS is left out")
    lpips.add_argument("--lpips-heads", metavar="PATH",
                       help="the LPIPS v0.1 heads (the lpips package's weights/v0.1/vgg.pth; default: the installed "
                            "lpips package's, or the backbone file's own)")
    fid = parser.add_argument_group("FID (--stats, --model)")
    fid.add_argument("--fid-weights", metavar="PATH",
                     help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or its .safetensors copy")
    fid.add_argument("--save-fid-weights", metavar="FILE.safetensors",
                     help="also write the loaded weights as safetensors (loads later without torch)")
    fid.add_argument("--batch-size", type=int, help="images per batch (--stats: InceptionV3's, default 50; "
                     "--model: generation's and scoring's, default min(8, N), a multiple of the device count)")


# the options each mode takes (argparse's defaults tell "not given")
MODE_OPTIONS = {
    "pairs": ("lpips_weights", "lpips_heads", "allow_pickle"),
    "stats": ("fid_weights", "save_fid_weights", "batch_size", "allow_pickle"),
    "model": ("allow_pickle", "prompts", "num_images", "reference", "clip", "lora", "lora_scale", "steps", "scheduler", "guidance",
              "seed", "height", "width", "dtype", "fid_weights", "batch_size"),
}


def _check_mode_options(args: argparse.Namespace, mode: str) -> None:
    """An option of another mode is an error naming the mode(s) it belongs to."""
    foreign = {n for names in MODE_OPTIONS.values() for n in names} - set(MODE_OPTIONS[mode])
    given = sorted(n for n in foreign if getattr(args, n) not in (None, False, []))
    if given:
        owners = {n: " / ".join(f"--{m}" for m, names in MODE_OPTIONS.items() if n in names) for n in given}
        raise InputError("; ".join(f"--{n.replace('_', '-')} belongs to {owners[n]}" for n in given)
                         + f", not --{mode}")


def run(args: argparse.Namespace) -> int:
    mode = next(m for m in MODE_OPTIONS if getattr(args, m) is not None)
    _check_mode_options(args, mode)
    if mode == "stats":
        return _run_stats(args)
    if mode == "model":
        from jaxsd.commands.eval_modes.model import run_model

        return run_model(args, _versions())
    from jaxsd.commands.eval_modes.pairs import run_pairs

    return run_pairs(args, _versions())


def _run_stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jaxsd.metrics.fid import activation_statistics, save_stats
    from jaxsd.metrics.fid_folder import folder_features
    from jaxsd.metrics.fid_weights import load_fid_weights, save_fid_weights

    out = Path(args.out)
    if out.suffix != ".npz":
        raise InputError(f"--out {out}: --stats writes a .npz file (pytorch-fid reads only that suffix)")
    params = load_fid_weights(args.fid_weights, allow_pickle=args.allow_pickle)
    if args.save_fid_weights:
        save_fid_weights(params, args.save_fid_weights)
        print(f"FID weights → {args.save_fid_weights}")
    with tqdm(desc="images", unit="img") as bar:
        features = folder_features(Path(args.stats), params, args.batch_size or 50, progress=bar.update)
    mu, sigma = activation_statistics(features)
    save_stats(out, mu, sigma)
    print(f"{len(features)} images: FID statistics (mu {mu.shape}, sigma {sigma.shape}) → {out}")
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
