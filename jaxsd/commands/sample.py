"""Generate images from a diffusers pipeline folder (SD1.x, SD2.x, SDXL, SD1.5+T5 hybrid).

--model may also be a single-file checkpoint (A1111/ComfyUI .safetensors, SD1/SD2/SDXL): it is read in
place, tensor by tensor; its tokenizers (which no single file holds) come from --config PIPELINE_DIR, else
they are the project's copies of the standard CLIP tokenizers (jaxsd convert's docs).

The scheduler's parameters (betas, prediction type, spacing, offsets, zero-SNR
rescale) come from the folder's scheduler/scheduler_config.json; --scheduler only
picks the algorithm, as diffusers' `Scheduler.from_config(pipe.scheduler.config, **overrides)`.
--scheduler auto (the default) runs the folder's own scheduler class; A1111 display names
("DPM++ 2M SDE Karras", "Euler a") work too. docs/sampling.md maps each name to diffusers.

Prompts are padded to the length the folder records (a T5 hybrid: tokenizer/tokenizer_config.json's
model_max_length, which `jaxsd export` sets to the length the UNet was trained with; CLIP: 77).

One image is written to --out; with several (--num-images > 1), --out holds a grid
and the images are written beside it as OUT-0.png, OUT-1.png, ...

--latents FILE.npy gives the initial noise exactly as diffusers' `latents`
argument (NCHW float32, [num_images, C, H/8, W/8]) so a run can be reproduced
against diffusers; with --init-image it is the noise added to the image latents.

--lora FILE (repeatable) applies LoRA / LoCon files — PEFT/diffusers or kohya layout, see
docs/lora.md — to the UNet and CLIP text encoders at --lora-scale (one per file, default 1.0).

--init-image with --mask inpaints (white = repaint): an inpainting UNet (9 input channels) gets the mask
and the masked image's latents as extra channels; a plain UNet keeps the unmasked region by blending.

--prompts FILE runs one prompt per line (blank lines skipped) through one compiled program, --batch-size
at a time (the last batch padded); --out is then the grid, each image OUT-NNN-<prompt>.png beside it.

--tome RATIO merges that fraction of the tokens in the UNet's full-resolution transformer blocks
before their self-attention (token merging, ToMe for SD, with the `tomesd` package's other defaults;
docs/sampling.md): faster at large latents, slightly different images. 0 is exactly no merging.

Every option is described in docs/sampling.md.

Examples:
  jaxsd sample --model ./sd15 --prompt "a castle at sunset" --steps 25 --out castle.png
  jaxsd sample --model ./sd15 --prompt "oil painting" --init-image photo.png --strength 0.6 --out painted.png
  jaxsd sample --model ./sd15-inpainting --prompt "a red door" --init-image house.png --mask door.png --out door.png
  jaxsd sample --model ./sdxl --prompt "a cat" --lora style.safetensors --lora-scale 0.8 --out cat.png
  jaxsd sample --model ./sdxl --prompt "a cat" --prompt-2 "watercolour" --vae ./sdxl-vae-fp16-fix --dtype float16 --out cat.png
  jaxsd sample --model ./sd15 --prompt "anime girl" --clip-skip 2 --scheduler ddim --eta 0.5 --out girl.png
  jaxsd sample --model ./sd15 --prompts prompts.txt --batch-size 4 --out grid.png
  jaxsd sample --model ./sdxl --prompt "a city" --height 2048 --width 2048 --tiled-vae --output-latents city.npy --out city.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from jaxsd.diffusion.names import SCHEDULER_CHOICES, canonical_sampler_name  # jax-free import
from jaxsd.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|FILE", help="diffusers pipeline folder (with "
                   "model_index.json), or a single-file .safetensors checkpoint (SD1/SD2/SDXL, LDM layout)")
    p.add_argument("--config", default=None, metavar="PIPELINE_DIR",
                   help="with a single-file --model: a pipeline folder of its family for the tokenizers "
                        "(a single file has none; default: the standard CLIP ones), component configs and "
                        "scheduler")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="what to generate (or --prompts)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a text file, one prompt per line: each gets its image(s), and --out the grid")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="with --prompts: prompts per compiled call (default min(8, number of prompts))")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what to steer away from (default none)")
    p.add_argument("--prompt-2", default=None, metavar="TEXT",
                   help="SDXL: the prompt of the second text encoder (default --prompt)")
    p.add_argument("--negative-prompt-2", default=None, metavar="TEXT",
                   help="SDXL: the negative prompt of the second text encoder (default --negative-prompt)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="CLIP layers to skip from the end, as diffusers' clip_skip (default: none)")
    p.add_argument("--steps", type=int, default=30, metavar="N", help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, metavar="G", help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="R",
                   help="rescale guided predictions toward the conditional one's std, in [0, 1] (default 0)")
    p.add_argument("--eta", type=float, default=None, metavar="E",
                   help="ddim and euler_a: the noise added each step, >= 0 (A1111's eta; default: ddim 0 = "
                        "deterministic, euler_a 1 = diffusers'; euler_a --eta 0 = plain euler)")
    # choices are validated in run() so an unknown name gets our message listing the valid ones
    p.add_argument("--scheduler", default="auto", metavar="NAME",
                   help=f"sampling algorithm: {', '.join(SCHEDULER_CHOICES)}, or an A1111 display name such as "
                        "'DPM++ 2M SDE Karras' (default auto: the folder's scheduler_config.json)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--height", type=int, default=None, metavar="H",
                   help="image height in pixels (default: the model's, or the init image's)")
    p.add_argument("--width", type=int, default=None, metavar="W", help="image width in pixels (default as height)")
    p.add_argument("--num-images", type=int, default=1, metavar="K", help="images to generate (default 1)")
    p.add_argument("--init-image", default=None, metavar="PATH", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=None, metavar="X",
                   help="img2img / inpainting: how much to change the init image, in [0, 1] (default 0.8; "
                        "with --mask 1.0)")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="inpainting, with --init-image: white = repaint, black = keep")
    p.add_argument("--latents", default=None, metavar="FILE.npy",
                   help="initial noise, NCHW float32 like diffusers' `latents` (reproduces a diffusers run)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA/LoCon .safetensors file (PEFT/diffusers or kohya); repeat for several")
    p.add_argument("--lora-scale", type=float, nargs="+", default=None, metavar="S",
                   help="scale of each --lora file, in their order (default 1.0 each)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute and weight dtype (default float32; float16 runs force_upcast VAEs in float32)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="weights variant to load, e.g. fp16 for *.fp16.safetensors")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="a diffusers AutoencoderKL folder used instead of the model's vae/ (e.g. SDXL's fp16-fix VAE)")
    p.add_argument("--tiled-vae", action="store_true",
                   help="decode in overlapping tiles (diffusers' enable_tiling): bounded memory for large images")
    p.add_argument("--output-latents", default=None, metavar="FILE.npy",
                   help="also save the final latents, NCHW float32 as diffusers' output_type='latent'")
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="token merging: fraction of tokens merged before self-attention at full resolution, "
                        "in [0, 0.75] (default 0: off; 0.5 is ToMe's usual setting)")
    p.add_argument("--out", required=True, metavar="PATH.png", help="output image (a grid when several)")


def check_arguments(args: argparse.Namespace) -> None:
    args.scheduler = canonical_sampler_name(args.scheduler)  # 'auto' is resolved once the folder is read
    if (args.prompt is None) == (args.prompts is None):
        raise InputError("give the prompt: --prompt TEXT, or --prompts FILE (one prompt per line), not both")
    if args.batch_size is not None and (args.prompts is None or args.batch_size < 1):
        raise InputError("--batch-size goes with --prompts, as a number >= 1")
    if args.prompts is not None and args.latents is not None:
        raise InputError("--latents fixes the noise of one run; it cannot go with --prompts (use --seed)")
    if args.strength is None:
        args.strength = 1.0 if args.mask else 0.8  # diffusers' defaults: inpainting 1.0, img2img 0.8
    if not 0.0 <= args.strength <= 1.0:
        raise InputError(f"--strength must be in [0, 1], got {args.strength}")
    if args.mask and not args.init_image:
        raise InputError("--mask needs --init-image (the image to inpaint)")
    if (args.eta is not None and args.eta < 0) or not 0.0 <= args.guidance_rescale <= 1.0:
        raise InputError(f"--eta must be >= 0 and --guidance-rescale in [0, 1]; got {args.eta}, {args.guidance_rescale}")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise InputError(f"--clip-skip must be >= 0, got {args.clip_skip}")
    if args.output_latents is not None and not args.output_latents.lower().endswith(".npy"):
        raise InputError(f"--output-latents must be a .npy path, got {args.output_latents}")
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




def load_pipeline(args: argparse.Namespace, defer_weights: bool = False):
    """The StableDiffusion pipeline of --model with --dtype, --variant, --vae and --lora applied.
    defer_weights: the UNet's and VAE's weights are read by `compile_before_weights` (`jaxsd sample`)."""
    import jax.numpy as jnp

    from jaxsd.models.token_merging import TokenMerging
    from jaxsd.pipelines.pipeline import StableDiffusion

    dtype = jnp.dtype(args.dtype)
    # without LoRA files (which are checked against the loaded UNet) the UNet's and VAE's weights are read
    # after the program is compiled (`compile_before_weights`)
    pipe = StableDiffusion.from_folder(args.model, config_dir=args.config, dtype=dtype,
                                       param_dtype=None if dtype == jnp.float32 else dtype, variant=args.variant,
                                       vae_folder=args.vae, token_merging=TokenMerging(ratio=args.tome),
                                       weights=not defer_weights or bool(args.lora))
    if args.lora:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_loras(args.lora, args.lora_scale)
        for w in caught:  # e.g. a LoRA made on another base UNet: said once, plainly
            print(f"jaxsd sample: warning: {w.message} ({w.category.__name__})", file=sys.stderr)
        print(f"applied {len(args.lora)} LoRA file(s): "
              + ", ".join(f"{f} ×{s:g}" for f, s in zip(args.lora, args.lora_scale or [1.0] * len(args.lora))),
              file=sys.stderr)
    return pipe


def generation_options(args: argparse.Namespace, pipe) -> dict:
    """`StableDiffusion.generate` keyword arguments shared by every prompt of this run."""
    from jaxsd.pipelines.inputs import load_image, load_latents, load_mask

    init = mask = None
    if args.init_image:
        init = load_image(args.init_image, args.height, args.width, pipe.vae_factor)
        if args.mask:
            mask = load_mask(args.mask, init.shape[0], init.shape[1])
    return {"negative_prompt": args.negative_prompt, "negative_prompt_2": args.negative_prompt_2,
            "clip_skip": args.clip_skip, "steps": args.steps, "guidance": args.guidance,
            "guidance_rescale": args.guidance_rescale, "eta": args.eta, "sampler": args.scheduler,
            "height": args.height, "width": args.width, "num_images": args.num_images,
            "latents": load_latents(args.latents) if args.latents else None, "init_image": init, "mask": mask,
            "strength": args.strength, "tiled_vae": args.tiled_vae, "return_latents": True}


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    check_arguments(args)  # before loading anything, so a typo costs no model load

    from jaxsd.diffusion.samplers import resolve_sampler_name
    from jaxsd.pipelines.grids import image_grid
    from jaxsd.pipelines.inputs import read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else None  # a bad file costs no model load either
    t0 = time.perf_counter()
    pipe = load_pipeline(args, defer_weights=True)
    args.scheduler = resolve_sampler_name(args.scheduler, pipe.pipe.schedule.config)  # auto: the folder's
    options = generation_options(args, pipe)
    print(f"loaded {args.model} ({pipe.family}, {args.dtype}, prompts padded to {pipe.text.text_length} tokens) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    compile_s = compile_before_weights(pipe, args, options, prompts)
    if prompts is None:
        images, latents = generate_one(pipe, args, options, compile_s)
    else:
        images, latents = generate_many(pipe, args, options, prompts, compile_s)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.output_latents:
        Path(args.output_latents).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.output_latents, latents)
        print(f"wrote latents {args.output_latents} {list(latents.shape)} (NCHW float32)")
    if prompts is not None:
        return write_prompt_images(images, prompts, args.num_images, out)
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


def compile_before_weights(pipe, args: argparse.Namespace, options: dict, prompts: list[str] | None) -> float:
    """Compile the run's program (of its first batch: every batch has its shapes) from the UNet's and VAE's
    shapes, then read their weights: the compiler's memory is handed back before the weights arrive, so
    the peak is the larger of the two, not their sum. Seconds spent compiling (0: weights already loaded)."""
    from jaxsd.pipelines.inputs import batches

    if pipe.pipe.weights_loaded:
        return 0.0
    first, second = args.prompt, args.prompt_2
    if prompts is not None:
        first = batches(prompts, args.batch_size or min(8, len(prompts)))[0][0]
        second = None if args.prompt_2 is None else [args.prompt_2] * len(first)
    pipe.generate(first, prompt_2=second, seed=args.seed, compile_only=True, **options)
    compile_s = pipe.last_compile_seconds
    pipe.load_weights()
    return compile_s


def generate_one(pipe, args: argparse.Namespace, options: dict, compile_s: float = 0.0):
    """(images, latents) of --prompt, with a progress bar over the steps."""
    from tqdm import tqdm

    bar = None

    def on_step(i: int) -> None:  # the bar starts at the first finished step, after compilation
        nonlocal bar
        if bar is None:
            bar = tqdm(total=args.steps, initial=i, desc=f"{args.scheduler}", unit="step", file=sys.stderr)
        bar.update(i + 1 - bar.n)

    images, latents = pipe.generate(args.prompt, prompt_2=args.prompt_2, seed=args.seed, progress=on_step, **options)
    if bar is not None:
        bar.close()
    print(f"compile: {compile_s + pipe.last_compile_seconds:.2f} s; generation: {pipe.last_run_seconds:.2f} s "
          f"({len(images)} image(s), {args.steps} steps, {args.scheduler})")
    return images, latents


def generate_many(pipe, args: argparse.Namespace, options: dict, prompts: list[str], compile_s: float = 0.0):
    """(images, latents) of every --prompts line, prompt-major: batches of --batch-size prompts through one
    compiled program (the last batch padded, its padding dropped); batch b uses seed --seed + b."""
    import numpy as np
    from tqdm import tqdm

    from jaxsd.pipelines.inputs import batches

    size = args.batch_size or min(8, len(prompts))
    k = args.num_images
    images, latents, run_s, programs = [], [], 0.0, int(compile_s > 0)
    with tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr) as bar:
        for b, (batch, real) in enumerate(batches(prompts, size)):
            second = None if args.prompt_2 is None else [args.prompt_2] * len(batch)
            imgs, lats = pipe.generate(batch, prompt_2=second, seed=args.seed + b, **options)
            images.append(imgs[:real * k])
            latents.append(lats[:real * k])
            compile_s, run_s = compile_s + pipe.last_compile_seconds, run_s + pipe.last_run_seconds
            programs += pipe.last_compile_seconds > 0
            bar.update(real)
    print(f"compile: {compile_s:.2f} s ({programs} program(s) compiled); generation: {run_s:.2f} s "
          f"({len(prompts)} prompts x {k} image(s) in batches of {size}, {args.steps} steps, {args.scheduler})")
    return np.concatenate(images), np.concatenate(latents)


def write_prompt_images(images, prompts: list[str], k: int, out: Path) -> int:
    """The grid at `out` (one row per prompt when k > 1) and OUT-NNN-<slug>[-j].png per image beside it."""
    from PIL import Image

    from jaxsd.pipelines.grids import image_grid
    from jaxsd.pipelines.inputs import slug

    Image.fromarray(image_grid(images, columns=k if k > 1 else None)).save(out)
    for i, img in enumerate(images):
        p, j = divmod(i, k)
        name = f"{out.stem}-{p:03d}-{slug(prompts[p])}" + (f"-{j}" if k > 1 else "")
        Image.fromarray(img).save(out.with_name(name + out.suffix))
    print(f"wrote grid {out} and {len(images)} images {out.stem}-000-... beside it")
    return 0
