"""Generate images from a diffusers pipeline folder (SD1.x, SD2.x, SDXL, SD1.5+T5 hybrid).

--model may also be a single-file checkpoint (A1111/ComfyUI .safetensors, SD1/SD2/SDXL): it is read in
place, tensor by tensor; its tokenizers (which no single file holds) come from --config PIPELINE_DIR, else
they are the project's copies of the standard CLIP tokenizers (jaxsd convert's docs).

The scheduler's parameters (betas, prediction type, spacing, offsets, zero-SNR
rescale) come from the folder's scheduler/scheduler_config.json; --scheduler only
picks the algorithm, as diffusers' `Scheduler.from_config(pipe.scheduler.config)`.

Prompts are padded to the length the folder records (a T5 hybrid: tokenizer/tokenizer_config.json's
model_max_length, which `jaxsd export` sets to the length the UNet was trained with; CLIP: 77).

One image is written to --out; with several (--num-images > 1), --out holds a grid
and the images are written beside it as OUT-0.png, OUT-1.png, ...

--latents FILE.npy gives the initial noise exactly as diffusers' `latents`
argument (NCHW float32, [num_images, C, H/8, W/8]) so a run can be reproduced
against diffusers; with --init-image it is the noise added to the image latents.

--lora FILE (repeatable) applies LoRA / LoCon files — PEFT/diffusers or kohya layout, see
docs/lora.md — to the UNet and CLIP text encoders at --lora-scale (one per file, default 1.0).

--tome RATIO merges that fraction of the tokens in the UNet's full-resolution transformer blocks
before their self-attention (token merging, ToMe for SD, with the `tomesd` package's other defaults;
docs/sampling.md): faster at large latents, slightly different images. 0 is exactly no merging.

Examples:
  jaxsd sample --model ./sd15 --prompt "a castle at sunset" --steps 25 --out castle.png
  jaxsd sample --model ./sd15 --prompt "oil painting" --init-image photo.png --strength 0.6 --out painted.png
  jaxsd sample --model ./sdxl --prompt "a cat" --lora style.safetensors --lora-scale 0.8 --out cat.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from jaxsd.diffusion import SAMPLER_NAMES as SCHEDULERS  # jax-free import
from jaxsd.errors import InputError, InputNotFoundError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|FILE", help="diffusers pipeline folder (with "
                   "model_index.json), or a single-file .safetensors checkpoint (SD1/SD2/SDXL, LDM layout)")
    p.add_argument("--config", default=None, metavar="PIPELINE_DIR",
                   help="with a single-file --model: a pipeline folder of its family for the tokenizers "
                        "(a single file has none; default: the standard CLIP ones), component configs and "
                        "scheduler")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="what to generate")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what to steer away from (default none)")
    p.add_argument("--steps", type=int, default=30, metavar="N", help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, metavar="G", help="classifier-free guidance scale (default 7.5)")
    # choices are validated in run() so an unknown name gets our message listing the valid ones
    p.add_argument("--scheduler", default="dpmpp_2m", metavar="|".join(SCHEDULERS),
                   help="sampling algorithm (default dpmpp_2m)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--height", type=int, default=None, metavar="H",
                   help="image height in pixels (default: the model's, or the init image's)")
    p.add_argument("--width", type=int, default=None, metavar="W", help="image width in pixels (default as height)")
    p.add_argument("--num-images", type=int, default=1, metavar="K", help="images to generate (default 1)")
    p.add_argument("--init-image", default=None, metavar="PATH", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8, metavar="X",
                   help="img2img: how much to change the init image, in [0, 1] (default 0.8)")
    p.add_argument("--latents", default=None, metavar="FILE.npy",
                   help="initial noise, NCHW float32 like diffusers' `latents` (reproduces a diffusers run)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA/LoCon .safetensors file (PEFT/diffusers or kohya); repeat for several")
    p.add_argument("--lora-scale", type=float, nargs="+", default=None, metavar="S",
                   help="scale of each --lora file, in their order (default 1.0 each)")
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="token merging: fraction of tokens merged before self-attention at full resolution, "
                        "in [0, 0.75] (default 0: off; 0.5 is ToMe's usual setting)")
    p.add_argument("--out", required=True, metavar="PATH.png", help="output image (a grid when several)")


def load_image(path: str, height: int | None, width: int | None, factor: int):
    """RGB uint8 [H,W,3]; resized (Lanczos, as diffusers' image processor) to height x width, or to the
    image's own size rounded down to a multiple of the VAE factor."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise InputNotFoundError(f"--init-image {path}: no such file")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:  # only the user's file is read here
        raise InputError(f"--init-image {path}: not a readable image ({e})") from e
    w0, h0 = img.size
    width = width or (w0 - w0 % factor)
    height = height or (h0 - h0 % factor)
    if (width, height) != (w0, h0):
        img = img.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(img)


def load_latents(path: str):
    """The --latents file: float32 NCHW, as diffusers' `latents` argument."""
    import numpy as np

    if not Path(path).is_file():
        raise InputNotFoundError(f"--latents {path}: no such file")
    try:
        latents = np.load(path)
    except (ValueError, OSError) as e:  # only the user's file is read here
        raise InputError(f"--latents {path}: not a .npy array file ({e})") from e
    if latents.dtype != np.float32:
        raise InputError(f"--latents {path}: dtype {latents.dtype}; expected float32 (NCHW)")
    return latents


def check_arguments(args: argparse.Namespace) -> None:
    if args.scheduler not in SCHEDULERS:
        raise InputError(f"unknown scheduler {args.scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    if not 0.0 <= args.strength <= 1.0:
        raise InputError(f"--strength must be in [0, 1], got {args.strength}")
    if args.steps < 1 or args.num_images < 1:
        raise InputError("--steps and --num-images must be >= 1")
    if not args.out.lower().endswith(".png"):
        raise InputError(f"--out must be a .png path, got {args.out}")
    if not 0.0 <= args.tome <= 0.75:
        raise InputError(f"--tome {args.tome} must be in [0, 0.75] (the fraction of tokens merged; at most 3 of "
                         "every 2x2 tokens can merge into the fourth)")
    if args.lora_scale is not None and len(args.lora_scale) != len(args.lora):
        raise InputError(f"{len(args.lora_scale)} --lora-scale values for {len(args.lora)} --lora files; give one "
                         "scale per file, in the same order (or none for 1.0 each)")


def run(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    check_arguments(args)  # before loading anything, so a typo costs no model load

    from jaxsd.models.token_merging import TokenMerging
    from jaxsd.pipelines.grids import image_grid
    from jaxsd.pipelines.pipeline import StableDiffusion

    t0 = time.perf_counter()
    pipe = StableDiffusion.from_folder(args.model, config_dir=args.config, token_merging=TokenMerging(ratio=args.tome))
    if args.lora:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_loras(args.lora, args.lora_scale)
        for w in caught:  # e.g. a LoRA made on another base UNet: said once, plainly
            print(f"jaxsd sample: warning: {w.message} ({w.category.__name__})", file=sys.stderr)
        print(f"applied {len(args.lora)} LoRA file(s): "
              + ", ".join(f"{f} ×{s:g}" for f, s in zip(args.lora, args.lora_scale or [1.0] * len(args.lora))),
              file=sys.stderr)
    init = None
    if args.init_image:
        init = load_image(args.init_image, args.height, args.width, pipe.vae_factor)
    latents = load_latents(args.latents) if args.latents else None
    print(f"loaded {args.model} ({pipe.family}, prompts padded to {pipe.text.text_length} tokens) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    bar = None

    def on_step(i: int) -> None:  # the bar starts at the first finished step, after compilation
        nonlocal bar
        if bar is None:
            bar = tqdm(total=args.steps, initial=i, desc=f"{args.scheduler}", unit="step", file=sys.stderr)
        bar.update(i + 1 - bar.n)

    images = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                           guidance=args.guidance, sampler=args.scheduler, seed=args.seed, height=args.height,
                           width=args.width, num_images=args.num_images, latents=latents, init_image=init,
                           strength=args.strength, progress=on_step)
    if bar is not None:
        bar.close()
    print(f"compile: {pipe.last_compile_seconds:.2f} s; generation: {pipe.last_run_seconds:.2f} s "
          f"({len(images)} image(s), {args.steps} steps, {args.scheduler})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        Image.fromarray(images[0]).save(out)
        print(f"wrote {out}")
        return 0
    Image.fromarray(image_grid(images)).save(out)
    for i, img in enumerate(images):
        Image.fromarray(img).save(out.with_name(f"{out.stem}-{i}{out.suffix}"))
    print(f"wrote grid {out} and {len(images)} images {out.stem}-0{out.suffix} .. "
          f"{out.stem}-{len(images) - 1}{out.suffix} beside it")
    return 0
