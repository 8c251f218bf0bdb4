"""Write a training checkpoint as a diffusers pipeline folder (or a UNet folder).

    jaxsd export RUN_DIR --out DIR [--pipeline BASE | --unet-only] [--ema] [--step N]
    jaxsd export RUN_DIR --lora --out FILE.safetensors [--format peft|kohya] [--ema] [--step N]   # LoRA runs
    jaxsd export RUN_DIR --merge-lora --out DIR [--pipeline BASE | --unet-only]                   # LoRA runs
    jaxsd export RUN_DIR --single-file --out FILE.safetensors [--pipeline BASE] [--ema] [--dtype float16]

Reads the latest (or --step N) checkpoint in RUN_DIR/checkpoints (RUN_DIR: local or gs://...) —
only the trained params (with --ema: their EMA) and the frozen ones, never the optimizer state —
and writes (a VAE run, model.kind: vae, writes DIR as a diffusers AutoencoderKL folder; docs/vae-training.md):

  a pipeline folder  DIR/unet/ (the trained UNet) + every other component of BASE (vae/,
                     text_encoder/, tokenizer/, scheduler/, ...) and its model_index.json,
                     hard-linked (copied when BASE is on another filesystem). Loads in
                     `jaxsd sample --model DIR` and diffusers' `DiffusionPipeline.from_pretrained(DIR)`.
                     BASE defaults to the run's model.pretrained when that is a pipeline folder.
  a UNet folder      DIR/config.json + DIR/diffusion_pytorch_model.safetensors, when there is no
                     pipeline to copy from, or with --unet-only (`UNet2DConditionModel.from_pretrained`).

BASE's components must fit the trained UNet (VAE latent channels, text embedding width, SDXL
pooled width), else nothing is written. If BASE's scheduler has another noise schedule
(betas, prediction type) than the run trained with, DIR gets the run's.

A LoRA run (lora.rank > 0) exports its adapters as a LoRA file with --lora: the PEFT/diffusers
layout (`pipe.load_lora_weights`) or kohya's (`--format kohya`: kohya-ss, A1111, ComfyUI), with
rank/alpha, targets, steps and the base UNet's fingerprint in the metadata; text-encoder adapters
(lora.text_encoder) go in the same file. --merge-lora writes the base UNet (and the run's text
encoders) with the adapters folded in, as a folder like any other export.

--single-file writes the trained UNet and BASE's VAE and text encoders (BASE: a pipeline folder or a
single file; default the run's model.pretrained) as one single-file checkpoint in the original LDM
layout (A1111, ComfyUI, diffusers' from_single_file), with the family, configs, the run's noise
schedule (prediction type), the step and EMA in its metadata. SD1/SD2/SDXL only.

DIR must not exist, be empty, or be a previous export (it holds jaxsd_export.json, which records
run, step, EMA and BASE); a previous export is replaced as a whole, once the new one is complete.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jaxsd.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `jaxsd train` run directory (local or gs://...)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (pipeline or UNet)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--pipeline", default=None, metavar="BASE",
                       help="pipeline folder whose other components go beside the trained UNet "
                            "(default: the run's model.pretrained when it is a pipeline folder)")
    which.add_argument("--unet-only", action="store_true", help="write the UNet folder alone")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--lora", action="store_true", help="LoRA runs: write the adapters as a LoRA file (--out FILE.safetensors)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="LoRA runs: write the base UNet with the adapters merged in, as a diffusers folder")
    lora.add_argument("--single-file", action="store_true",
                      help="write one single-file checkpoint (--out FILE.safetensors; original LDM layout)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="with --single-file: cast the weights (default: as trained / as BASE stores them)")
    parser.add_argument("--format", choices=("peft", "kohya"), default="peft",
                        help="with --lora: peft = diffusers/PEFT keys (default), kohya = lora_unet_... keys")
    parser.add_argument("--ema", action="store_true", help="export the EMA params (train.ema.enabled runs)")
    parser.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the latest)")


def run(args: argparse.Namespace) -> int:
    from jaxsd.train.export import export

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.dtype and not args.single_file:
        raise InputError("--dtype is for --single-file; folders keep the trained dtype")
    from jaxsd.train.export_vae import export_vae, run_model_kind

    if run_model_kind(args.run_dir) == "vae":  # a VAE run (model.kind: vae): an AutoencoderKL folder
        flags = [f for f, on in (("--pipeline", args.pipeline), ("--unet-only", args.unet_only), ("--lora", args.lora),
                                 ("--merge-lora", args.merge_lora), ("--single-file", args.single_file)) if on]
        if flags:
            raise InputError(f"{args.run_dir} trained a VAE (model.kind: vae): it exports as one AutoencoderKL "
                             f"folder; {', '.join(flags)} do not apply")
        v = export_vae(args.run_dir, args.out, ema=args.ema, step=args.step)
        print(f"jaxsd export: step {v.step}{' (EMA)' if args.ema else ''} → {v.out}: diffusers AutoencoderKL folder")
        return 0
    if args.single_file:
        from jaxsd.commands.convert import check_new_file, numpy_dtype
        from jaxsd.train.export_single import export_single_file

        if args.unet_only:
            raise InputError("--single-file writes the whole model; --unet-only is for folders")
        check_new_file(Path(args.out))
        r = export_single_file(args.run_dir, args.out, pipeline=args.pipeline, ema=args.ema, step=args.step,
                               dtype=numpy_dtype(args.dtype))
        print(f"jaxsd export: step {r.step}{' (EMA)' if args.ema else ''} → {r.out}: {r.family} single file "
              f"(LDM layout; VAE and text encoders from {r.base})")
        return 0
    if args.lora:
        from jaxsd.train.export_lora import export_lora

        if args.unet_only:
            raise InputError("--lora writes one LoRA file; --unet-only is for folders")
        f = export_lora(args.run_dir, args.out, layout=args.format, pipeline=args.pipeline, ema=args.ema,
                        step=args.step)
        print(f"jaxsd export: step {f.step}{' (EMA)' if args.ema else ''} → {f.out}: {args.format} LoRA file, "
              f"{f.layers} adapted layers, for {f.family} (load it with `jaxsd sample --lora` or diffusers' "
              "load_lora_weights)")
        return 0
    r = export(args.run_dir, args.out, pipeline=args.pipeline, unet_only=args.unet_only, ema=args.ema,
               step=args.step, merge_lora=args.merge_lora)
    what = f"jaxsd export: step {r.step}{' (EMA)' if args.ema else ''} → {r.out}"
    if r.pipeline is not None:
        how = f"{r.links.linked} files hard-linked" + (f", {r.links.copied} copied" if r.links.copied else "")
        trained = ", ".join(f"{c}/" for c in ("unet", *r.text))
        print(f"{what}: diffusers pipeline folder ({trained} trained; other components from {r.pipeline}: {how})")
        if r.scheduler_from_run:
            print("jaxsd export: scheduler/scheduler_config.json has the run's noise schedule (diffusion section), "
                  f"which differs from {r.pipeline}'s")
    elif args.unet_only:
        print(f"{what}: diffusers UNet folder")
    else:
        print(f"{what}: diffusers UNet folder only — the run has no pipeline folder to take the VAE, text "
              "encoders, tokenizers and scheduler from (model.pretrained is not one). For a complete pipeline "
              "that `jaxsd sample --model` and diffusers load, run again with --pipeline BASE (a pipeline "
              "folder whose components fit this UNet, e.g. the one the data was cached with), or write one "
              "single file with --single-file (the VAE and text encoders of model.pretrained when that is a "
              "single file)")
    return 0
