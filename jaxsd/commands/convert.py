"""Convert between single-file checkpoints (original LDM / A1111 / ComfyUI .safetensors) and diffusers folders.

    jaxsd convert FILE.safetensors --out DIR [--family sd1|sd2|sdxl] [--config PIPELINE_DIR] [--dtype D] [--ema]
    jaxsd convert DIR --out FILE.safetensors --single-file [--dtype float16]

FILE → DIR writes a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/ [, text_encoder_2/],
scheduler/, tokenizers). The family (SD1: CLIP under cond_stage_model.transformer; SD2: OpenCLIP under
cond_stage_model.model; SDXL: conditioner.embedders.0/1) is read from the tensor names; the component
configs from --config (a pipeline folder of the same family), else from the file's jaxsd metadata, else
from the tensors' shapes and the family's conventions (SD2: v-prediction, upcast attention) — what was
inferred is printed. A single file holds no tokenizer and no scheduler config: they come from --config,
else the scheduler is jaxsd's copy of the family default and the tokenizers the project's copies of the
standard CLIP ones (jaxsd/convert/clip_vocab.py; never downloaded); the message says which. Tensors
no component uses (EMA, schedule buffers) are kept in DIR/single_file_extras.safetensors, so converting
DIR back gives the same file; --ema takes the UNet from the file's model_ema.* copy instead.

DIR → FILE (--single-file) writes an SD1/SD2/SDXL pipeline folder as one file in the LDM layout that
A1111, ComfyUI and diffusers' from_single_file load, with its configs in the metadata.
Tensors keep their dtype unless --dtype is given; each tensor is converted on its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxsd.errors import InputError

DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="FILE|DIR", help="a single-file .safetensors checkpoint, or with "
                        "--single-file a diffusers pipeline folder")
    parser.add_argument("--out", required=True, metavar="DIR|FILE", help="the folder (or with --single-file the "
                        ".safetensors file) to write")
    parser.add_argument("--single-file", action="store_true", help="write a diffusers folder as one single file")
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default=None,
                        help="the model family when the file's tensors do not say (e.g. a UNet-only file)")
    parser.add_argument("--config", default=None, metavar="PIPELINE_DIR",
                        help="a diffusers pipeline folder of the same family: component configs, tokenizers, "
                             "scheduler")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep each "
                        "tensor's dtype)")
    parser.add_argument("--ema", action="store_true", help="FILE → DIR: the UNet from the file's EMA weights")


def numpy_dtype(name: str | None):
    """float32 | float16 | bfloat16 -> numpy dtype (None stays None)."""
    if name is None:
        return None
    import ml_dtypes
    import numpy as np

    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def check_new_file(out: Path, flag: str = "--out") -> None:
    if out.suffix != ".safetensors":
        raise InputError(f"{flag} {out}: a single file is written as .safetensors; name it FILE.safetensors")
    if out.exists():
        raise InputError(f"{flag} {out}: exists; jaxsd does not overwrite a file: choose another name or delete it")


def _to_single_file(args: argparse.Namespace) -> int:
    from jaxsd.convert.single_file.write import write_single_file

    source, out = Path(args.source), Path(args.out)
    if not source.is_dir():
        raise InputError(f"{source}: --single-file converts a diffusers pipeline folder; this is not a folder")
    for flag in ("family", "config", "ema"):
        if getattr(args, flag):
            raise InputError(f"--{flag} is for FILE → DIR; a folder says what it is")
    check_new_file(out)
    counts = write_single_file(source, out, dtype=numpy_dtype(args.dtype))
    parts = ", ".join(f"{n} {c}" for n, c in counts.items())
    print(f"jaxsd convert: {source} → {out}: single file (LDM layout; tensors: {parts})")
    return 0


def _to_folder(args: argparse.Namespace) -> int:
    from jaxsd.convert.output_folder import replacing_folder
    from jaxsd.convert.single_file.read import SingleFile
    from jaxsd.convert.single_file.to_folder import MARKER, write_folder

    source = Path(args.source)
    if source.is_dir():
        raise InputError(f"{source}: a folder; to write it as one file add --single-file")
    sf = SingleFile(source, family=args.family, config_dir=args.config, ema=args.ema)
    with replacing_folder(args.out, MARKER, keep=[source]) as staging:
        write_folder(sf, staging, dtype=numpy_dtype(args.dtype))
        (staging / MARKER).write_text(json.dumps({"source": str(source.resolve()), "family": sf.family,
                                                  "ema": args.ema, "dtype": args.dtype, "notes": sf.notes},
                                                 indent=2) + "\n")
    for note in sf.notes:
        print(f"jaxsd convert: {note}")
    print(f"jaxsd convert: {source} → {args.out}: diffusers pipeline folder ({sf.family}; "
          f"{', '.join(sf.components)}; {len(sf.extras)} unused tensors kept in single_file_extras.safetensors)")
    return 0


def run(args: argparse.Namespace) -> int:
    return _to_single_file(args) if args.single_file else _to_folder(args)
