"""Write a training checkpoint's UNet as a diffusers folder.

    jaxsd export RUN_DIR --out DIR [--ema] [--step N]

Reads RUN_DIR/config.yaml and the latest (or --step N) checkpoint in RUN_DIR/checkpoints,
merges trained and frozen params (with --ema: the EMA of the trained ones) and writes
DIR/config.json + DIR/diffusion_pytorch_model.safetensors, loadable with diffusers'
`UNet2DConditionModel.from_pretrained(DIR)`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a `jaxsd train` run directory")
    parser.add_argument("--out", required=True, help="output diffusers UNet folder")
    parser.add_argument("--ema", action="store_true", help="export the EMA params (train.ema.enabled runs)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def run(args: argparse.Namespace) -> int:
    from jaxsd.train.export import export_unet
    try:
        path, step = export_unet(args.run_dir, args.out, ema=args.ema, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxsd export: {e}", file=sys.stderr)
        return 2
    print(f"jaxsd export: step {step}{' (EMA)' if args.ema else ''} → {path}")
    return 0
