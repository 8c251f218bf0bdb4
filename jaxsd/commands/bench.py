"""Benchmark jaxsd side by side with diffusers PyTorch.

Suites:
  train-step       UNet forward+backward+optimizer step: jaxsd vs diffusers + torch AdamW
                   (same weights, same batch; compile time, step time, peak RSS, ratios);
                   --lora RANK: a LoRA run's step vs diffusers + PEFT; --memory-only: XLA's
                   memory analysis of jaxsd's step compiled from shapes
  scaling          step time vs batch size and latent size (`small`); per-device memory vs
                   number of (fake) devices with FSDP
  sample           20-step DPM++ 2M with classifier-free guidance, jaxsd vs diffusers pipeline;
                   --tome RATIO: both also with token merging (diffusers + tomesd), --latent N [N ...]
  cache            VAE encode + text encode throughput (images/s), jaxsd vs diffusers/transformers
  optimizer-state  optimizer-state bytes of AdamW / 8-bit AdamW / Adafactor on the sd15 UNet
                   (from shapes; nothing allocated)
  flops            XLA cost-analysis FLOPs of the compiled sd15 / sdxl train step vs the published
                   counts, and the implied time floor on H100 / TPU v5p / v6e
  conv-grads       one 3x3 convolution's forward, input gradient and kernel gradient at the SD
                   UNet's shapes, XLA vs torch (where a LoRA step's backward time goes);
                   --conv xla,im2col: jaxsd's two CPU lowerings interleaved in one process
  conv-ab          one jaxsd train step (demo UNet by default, --preset sd15 --lora 16, ...) compiled
                   per convolution lowering (--conv xla,auto,im2col), timed interleaved in one process
  host-overhead    per-step host overhead of real `jaxsd train` runs (tiny preset) with
                   train.steps_in_flight 0 and 1: loop step time minus the same step's back-to-back time
  memory           issue #19's table: the compiled memory of SDXL / SD1.5 fine-tuning and LoRA steps,
                   with each row's budget (params, optimizer state, what is alive at the peak)
  eval             images/s of FID feature extraction (InceptionV3) and CLIP scoring, jaxsd vs
                   pytorch-fid / transformers CLIPModel on the same random weights
  vae-step         VAE training step (autoencoder + discriminator, LPIPS, KL, adaptive weight): jaxsd
                   train's step vs diffusers AutoencoderKL + lpips + taming's discriminator in torch

Every framework is measured in its own child process (so peak RSS never mixes):
warm-up steps, then timed repeats reduced to min/median/max. Each run prints a
table and appends one JSON record per measured configuration to
bench/results.jsonl (or --json PATH). Machines are noisy: compare the jaxsd/torch
ratios of one run, not absolute times across runs.

Runs from a source checkout (bench/ is not part of the installed package); the
torch side needs the [torch] extra. Examples:
  jaxsd bench train-step --preset small --batch 2
  jaxsd bench train-step --preset small --lora 4 --base-dtype float32,bfloat16
  jaxsd bench scaling --sweep batch --frameworks jaxsd
  jaxsd bench sample --preset small --tome 0.5 --latent 64 128
  jaxsd bench flops
  jaxsd bench eval --preset small
  jaxsd bench vae-step --preset sd
  jaxsd bench memory --timeout 10800
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

from jaxsd.errors import InputError

# suite name -> module in bench/suites
SUITES = {
    "train-step": "train_step",
    "scaling": "scaling",
    "sample": "sample",
    "cache": "cache",
    "optimizer-state": "optimizer_state",
    "flops": "flops",
    "conv-grads": "conv_grads",
    "conv-ab": "conv_ab",
    "host-overhead": "host_overhead",
    "memory": "memory",
    "eval": "eval",
    "vae-step": "vae_step",
}
# suites whose --frameworks may include torch (the others measure jaxsd alone)
TORCH_SUITES = ("train-step", "scaling", "sample", "cache", "conv-grads", "eval", "vae-step")
_REPO = Path(__file__).resolve().parents[2]


def _bench_package():
    """Import the repo's `bench` package (next to `jaxsd/`); a clear error outside a checkout."""
    if not (_REPO / "bench" / "harness.py").is_file():
        raise InputError("bench/ not found next to the jaxsd package — run from a source checkout "
                         "(git clone …; pip install -e '.[torch]').")
    if str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))
    return importlib.import_module("bench.harness")


def _suite(name: str):
    _bench_package()
    return importlib.import_module(f"bench.suites.{SUITES[name]}")


def _frameworks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ("jaxsd", "torch")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated subset of jaxsd,torch")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be ≥ 1")
    return value


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=_positive, default=3,
                   help="timed repeats after warm-up (default 3; fewer is a smoke run)")
    g.add_argument("--warmup", type=int, default=1, help="untimed warm-up repeats (default 1)")
    g.add_argument("--processes", type=_positive, default=1,
                   help="child processes per framework; peak RSS and compile time get one value per process")
    g.add_argument("--frameworks", type=_frameworks, default=["jaxsd", "torch"],
                   help="comma-separated: jaxsd,torch (default both)")
    g.add_argument("--json", default=None, metavar="PATH",
                   help="append records here (default bench/results.jsonl)")
    g.add_argument("--no-record", action="store_true", help="print the table only; append nothing")
    g.add_argument("--note", default=None, help="free text stored in each record (e.g. 'loaded machine')")
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds before a child is killed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, module_name in SUITES.items():
        try:
            module = _suite(name)
        except InputError:  # not a source checkout: the suites are listed, `run` says why they cannot run
            module = None
        except ModuleNotFoundError as e:
            if e.name != f"bench.suites.{module_name}":
                raise
            module = None
        doc = (module.__doc__ or "") if module else "(not available in this checkout)"
        summary = doc.strip().splitlines()[0].removeprefix(f"{name}: ") if doc.strip() else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if module is not None:
            module.add_arguments(p)
        add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    harness = _bench_package()
    try:
        module = _suite(args.suite)
    except ModuleNotFoundError as e:
        if e.name != f"bench.suites.{SUITES[args.suite]}":
            raise
        raise InputError(f"suite {args.suite!r}: bench/suites/{SUITES[args.suite]}.py is not in this checkout") from e
    # a suite may run fewer frameworks than --frameworks names (e.g. train-step --memory-only)
    frameworks = getattr(module, "frameworks", lambda a: a.frameworks)(args)
    if args.suite in TORCH_SUITES and "torch" in frameworks:
        missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(f"--frameworks {','.join(args.frameworks)} needs {', '.join(missing)}, not installed: "
                             "install the [torch] extra (pip install -c constraints.txt -e '.[torch]') or pass "
                             "--frameworks jaxsd")
    if args.repeats < 3:
        print(f"note: --repeats {args.repeats} < 3 — a smoke run, not a measurement", file=sys.stderr)
    t0 = time.perf_counter()
    records = module.run(args)  # a failed child raises BenchError with its output: a traceback, exit 1
    print(module.format_table(records))
    if not args.no_record:
        path = harness.append_jsonl(args.json or harness.DEFAULT_RESULTS, records)
        print(f"\n{len(records)} record(s) appended to {path} ({time.perf_counter() - t0:.0f} s)")
    return 0
