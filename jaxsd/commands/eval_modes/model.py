"""`jaxsd eval --model DIR --prompts FILE --num-images N ...`: generate images, then score them (FID, CLIP score).

Image i (OUT/images/NNNNN.png) is prompt i mod P of the prompts file, from the noise of `--seed + i`
(`pipelines/indexed.py`), generated in batches over the local devices. Images already in OUT/images are
reused, so a stopped run resumes and a second run with more metrics generates nothing; OUT/images/
settings.json records what made them, and other settings are refused rather than mixed in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from jaxsd.diffusion.names import canonical_sampler_name  # jax-free
from jaxsd.errors import InputError

DEFAULTS = {"steps": 30, "scheduler": "dpmpp_2m", "guidance": 7.5, "seed": 0, "dtype": "float32"}
FID_HOW = ("FID needs --fid-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth with --allow-pickle, "
           "or its .safetensors copy)")
CLIP_HOW = "the CLIP score needs --clip DIR (a transformers CLIPModel folder with its tokenizer and preprocessor config)"
GRID_PROMPTS, GRID_COLUMNS = 8, 4  # the grid: the first prompts, their first images


def check_model_arguments(args: argparse.Namespace) -> None:
    """Fill the sampler defaults; refuse what cannot run, before anything is loaded."""
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.prompts is None or args.num_images is None:
        raise InputError("--model needs --prompts FILE (one prompt per line) and --num-images N")
    if args.fid_weights is None and args.clip is None:
        raise InputError(f"nothing to compute: {FID_HOW}, with --reference REAL_DIR|stats.npz; {CLIP_HOW}")
    if args.fid_weights is not None and args.reference is None:
        raise InputError("--fid-weights needs --reference: a folder of real images, or their statistics .npz "
                         "(`jaxsd eval --stats REAL_DIR --out stats.npz` writes one)")
    if args.num_images < (2 if args.fid_weights else 1) or args.steps < 1:
        raise InputError(f"--num-images must be ≥ {2 if args.fid_weights else 1} (FID needs a covariance: "
                         f"≥ 2 images, thousands to mean something) and --steps ≥ 1; got {args.num_images}, {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be ≥ 1; got {args.batch_size}")
    if args.lora_scale is not None and len(args.lora_scale) != len(args.lora):
        raise InputError(f"{len(args.lora_scale)} --lora-scale values for {len(args.lora)} --lora files")


def run_model(args: argparse.Namespace, versions: dict[str, str]) -> int:
    import jax

    from jaxsd.commands.sample import load_pipeline
    from jaxsd.diffusion.samplers import resolve_sampler_name
    from jaxsd.pipelines.indexed import device_batch_size
    from jaxsd.pipelines.inputs import read_prompts

    check_model_arguments(args)
    prompts = read_prompts(args.prompts)
    # what makes the images, as given (checked against an earlier run's before anything loads)
    settings = {"model": str(Path(args.model).resolve()), "lora": [str(Path(f).resolve()) for f in args.lora],
                "lora_scale": args.lora_scale or [1.0] * len(args.lora), "prompts": str(args.prompts),
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                "scheduler": canonical_sampler_name(args.scheduler), "steps": args.steps, "guidance": args.guidance,
                "seed": args.seed, "height": args.height, "width": args.width, "dtype": args.dtype}
    out = Path(args.out)
    _check_settings(out / "images", settings)
    fid, scorer = _load_metric_models(args)  # a bad weights file or reference costs no generation
    pipe = load_pipeline(argparse.Namespace(**vars(args), config=None, variant=None, vae=None, tome=0.0))
    sampler = resolve_sampler_name(args.scheduler, pipe.pipe.schedule.config)
    height, width = args.height or pipe.default_size[0], args.width or pipe.default_size[1]
    pipe.check_size(height, width)
    devices = jax.local_devices()
    batch = device_batch_size(args.batch_size or min(8, args.num_images), len(devices))
    paths, generated = _generate(pipe, prompts, args.num_images, out / "images", settings,
                                 {"sampler": sampler, "height": height, "width": width}, batch, devices)

    result = {"mode": "model", **settings, "scheduler": sampler, "height": height, "width": width,
              "num_prompts": len(prompts), "num_images": args.num_images, "generated": generated, "reused": args.num_images - generated, "batch_size": batch,
              "devices": len(devices), "reference": args.reference, "fid": None, "clip_score": None, "skipped": {}}
    if fid is not None:
        result.update(_fid(paths, fid, out, batch))
    else:
        result["skipped"]["fid"] = FID_HOW
    if scorer is not None:
        scores = _clip_scores(scorer, paths, [prompts[i % len(prompts)] for i in range(len(paths))], batch)
        result.update(clip_score=float(scores.mean()), clip_score_std=float(scores.std()), clip_model=args.clip)
    else:
        result["skipped"]["clip_score"] = CLIP_HOW
    result["versions"] = versions
    _write_grid(paths, prompts, out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    for name, value in (("FID", result["fid"]), ("CLIP score", result["clip_score"])):
        if value is not None:
            print(f"{name}: {value:.4f}")
    for name, how in result["skipped"].items():
        print(f"{name} skipped: {how}")
    print(f"{args.num_images} images ({generated} generated, {args.num_images - generated} reused) → "
          f"{out / 'metrics.json'}, {out / 'grid.png'}")
    return 0


def _load_metric_models(args: argparse.Namespace):
    """((FID params, reference (mu, sigma), reference image count or None) or None, CLIPScorer or None)."""
    fid = scorer = None
    if args.fid_weights is not None:
        from jaxsd.metrics.fid import activation_statistics, load_stats
        from jaxsd.metrics.fid_folder import folder_features
        from jaxsd.metrics.fid_weights import load_fid_weights

        params = load_fid_weights(args.fid_weights, allow_pickle=args.allow_pickle)
        reference = Path(args.reference)
        if reference.suffix == ".npz":
            fid = (params, load_stats(reference), None)
        else:
            features = folder_features(reference, params, args.batch_size or 50)
            fid = (params, activation_statistics(features), len(features))
            print(f"reference {reference}: FID statistics of {len(features)} images", file=sys.stderr)
    if args.clip is not None:
        from jaxsd.metrics.clip_score import CLIPScorer

        scorer = CLIPScorer.from_folder(args.clip)
    return fid, scorer


def _check_settings(folder: Path, settings: dict) -> None:
    """Refuse a folder whose images were made with other settings (OUT/images/settings.json); record these."""
    recorded = folder / "settings.json"
    if recorded.is_file():
        old = json.loads(recorded.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise InputError(f"{folder} holds images made with other settings ({diff}, as (then, now)); reusing "
                             "them would mix two runs: give another --out, or delete that folder")
    folder.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=1) + "\n")


def _generate(pipe, prompts: list[str], n: int, folder: Path, settings: dict, resolved: dict, batch: int,
              devices) -> tuple[list, int]:
    """(paths of images 0..n-1, how many were generated now): the missing ones are made, the rest reused.
    resolved: the sampler name and size the run uses (`auto` and the model's default size resolved)."""
    from tqdm import tqdm

    from jaxsd.pipelines.indexed import generate_indexed, save_png

    paths = [folder / f"{i:05d}.png" for i in range(n)]
    missing = [(i, prompts[i % len(prompts)]) for i in range(n) if not paths[i].is_file()]
    print(f"{n - len(missing)} of {n} images already in {folder}; generating {len(missing)} in batches of {batch} "
          f"on {len(devices)} device(s)", file=sys.stderr)
    with tqdm(total=len(missing), desc="images", unit="img", file=sys.stderr) as bar:
        for done in generate_indexed(pipe, missing, seed=settings["seed"], height=resolved["height"],
                                     width=resolved["width"], batch_size=batch, devices=devices,
                                     steps=settings["steps"], guidance=settings["guidance"],
                                     sampler=resolved["sampler"]):
            for i, image in done:
                save_png(paths[i], image)
            bar.update(len(done))
    return paths, len(missing)


def _fid(paths: list[Path], fid, out: Path, batch: int) -> dict:
    """FID of the images vs the reference statistics; the images' statistics are saved beside metrics.json."""
    from tqdm import tqdm

    from jaxsd.metrics.fid import activation_statistics, frechet_distance, save_stats
    from jaxsd.metrics.fid_folder import image_features

    params, (ref_mu, ref_sigma), ref_count = fid
    with tqdm(total=len(paths), desc="FID features", unit="img", file=sys.stderr) as bar:
        mu, sigma = activation_statistics(image_features(paths, params, batch, progress=bar.update))
    save_stats(out / "generated_stats.npz", mu, sigma)
    print("FID: the Fréchet distance (scipy sqrtm of a 2048² matrix: about a minute on 2 cores)", file=sys.stderr)
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "fid_images": len(paths),
            "reference_images": ref_count}


def _clip_scores(scorer, paths: list[Path], prompts: list[str], batch: int) -> np.ndarray:
    """[N] CLIP scores, `batch` images at a time (the last batch padded: one compile)."""
    from jaxsd.metrics.pairs import load_rgb
    from jaxsd.pipelines.inputs import batches

    scores = []
    for chunk, real in batches(list(zip(paths, prompts)), min(batch, len(paths))):
        scores.append(scorer.clip_score([load_rgb(p) for p, _ in chunk], [t for _, t in chunk])[:real])
    return np.concatenate(scores)


def _write_grid(paths: list[Path], prompts: list[str], out: Path) -> None:
    """One labelled row per prompt (the first GRID_PROMPTS), its first GRID_COLUMNS images."""
    from jaxsd.metrics.pairs import load_rgb
    from jaxsd.pipelines.grids import label_grid

    rows = []
    for p, prompt in enumerate(prompts[:GRID_PROMPTS]):
        images = [load_rgb(paths[i]) for i in range(p, len(paths), len(prompts))][:GRID_COLUMNS]
        if images:
            rows.append((prompt if len(prompt) <= 40 else prompt[:37] + "...", images))
    scale = max(1, 128 // rows[0][1][0].shape[0])  # tiny test images upscaled, real ones as they are
    label_grid(rows, scale=scale).save(out)
