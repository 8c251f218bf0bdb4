"""memory: what the train steps that must fit a GPU hold at their peak (issue #19's table), compile only.

Each row is jaxsd's real train step for one configuration — `jaxsd.train.plan`'s step, as `jaxsd
train` builds it (the "train" kit of bench/jaxsd_steps.py) — compiled from shapes with the trainer's
XLA options, one child process per row. Nothing is allocated and nothing runs. The step's kernels are
built at LLVM -O0: the memory figures are decided before LLVM runs (the same as the trainer's -O1),
the compile time is shorter than the trainer's and is not a measure of it. The budget of a row
comes from the compiled program:

  params, frozen, opt state   the step's arguments, per train-state field (shapes × dtypes)
  temp                        XLA's memory analysis: the temporaries' peak
  at the peak: grads, param copies, attention, activations
                              the buffers XLA's buffer assignment holds at that peak, by kind
                              (bench/peak_memory.py has the rules); `--top N` lists the largest

Rows (`--rows`, default all; a row whose settings this checkout's `jaxsd train` lacks is shown as
"not available" and not run):

  sdxl-8bit       SDXL full fine-tune, 128×128 latents, bf16 compute, fp32 params, 8-bit AdamW,
                  no clipping, full remat                                       target ≤ 24 GB
  sdxl-adafactor  the same with Adafactor (factored, no momentum) and bf16 params  ≤ 16 GB
  sdxl-lora16     SDXL LoRA rank 16 on attention, bf16 base, 128×128, bf16 compute, full remat
                                                                                ≤ 12 GB
  sd15-b4         SD1.5 full fine-tune, 64×64 latents, batch 4, bf16 compute, fp32 AdamW, clipping 1.0,
                  full remat                                                    ≤ 14 GB

`--unet small` runs every row on another UNet preset (the CI smoke test); `--latent N` at another
latent size; `--clip C`, `--segmented-backward on|off` and `--fused-update on|off` with other training options (the table's
`options` column prints each row's). The figures are XLA:CPU's when run on a CPU: it computes bf16 dots in fp32 (with fp32
copies of their operands) and its attention holds logits a GPU's flash attention would not, so a CPU
figure overstates a GPU's (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from bench.harness import compiled_memory_figures, make_record, run_child, table
from bench.peak_memory import KINDS
from bench.presets import UNET_PRESETS, unet_preset
from jaxsd.errors import ConfigError, InputError


@dataclass(frozen=True)
class Row:
    """One configuration of the table: a `jaxsd train` step and the budget it must fit."""

    title: str
    unet: str
    latent: int
    batch: int
    dtype: str
    optimizer: str
    clip: float  # 0 = no clipping
    remat: str | None
    target_gb: float
    param_dtype: str = "float32"
    lora: int = 0
    base_dtype: str | None = None
    requires: tuple[str, ...] = ()
    """`jaxsd train` settings (dotted overrides) the row needs; a checkout without them skips the row."""


ROWS: dict[str, Row] = {
    "sdxl-8bit": Row("SDXL full, 8-bit AdamW, no clip", "sdxl", 128, 1, "bfloat16", "adamw8bit", 0.0, "full", 24.0),
    "sdxl-adafactor": Row("SDXL full, Adafactor, bf16 params", "sdxl", 128, 1, "bfloat16", "adafactor", 0.0, "full",
                          16.0, param_dtype="bfloat16",
                          requires=("optimizer.name=adafactor", "model.param_dtype=bfloat16")),
    "sdxl-lora16": Row("SDXL LoRA r16 attn, bf16 base", "sdxl", 128, 1, "bfloat16", "adamw", 1.0, "full", 12.0,
                       lora=16, base_dtype="bfloat16"),
    "sd15-b4": Row("SD1.5 full, 64×64, batch 4, AdamW", "sd15", 64, 4, "bfloat16", "adamw", 1.0, "full", 14.0),
}
HEADERS = ("row", "options", "latent", "batch", "target GB", "total GB", "params GB", "opt state GB", "temp GB",
           "peak: grads", "param copies", "attention", "activations", "compile s")


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated subset of {','.join(ROWS)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=_names, default=list(ROWS), help=f"which rows (default all: {','.join(ROWS)})")
    p.add_argument("--unet", default=None, choices=sorted(UNET_PRESETS),
                   help="run every row on this UNet preset instead of its own (e.g. small: the smoke test)")
    p.add_argument("--latent", type=int, default=None, help="every row at this latent size instead of its own")
    p.add_argument("--segmented-backward", choices=("on", "off"), default=None,
                   help="model.segmented_backward for every row (default: the trainer's default)")
    p.add_argument("--fused-update", choices=("on", "off"), default="off",
                   help="train.fused_update for every row: each block's AdamW update inside its backward pass "
                        "(needs --segmented-backward on, --clip 0 and an adamw row)")
    p.add_argument("--clip", type=float, default=None,
                   help="global-norm clipping for every row instead of its own (0 = off: the trainer then streams "
                        "the update, except with 8-bit AdamW)")
    p.add_argument("--top", type=int, default=0, metavar="N",
                   help="also list the N largest buffers alive at each row's peak")


def missing_settings(row: Row) -> str | None:
    """Why this checkout cannot run `row` (a setting `jaxsd train` does not know), or None."""
    from jaxsd.config import load_config

    for item in row.requires:
        try:
            load_config(None, [item])
        except ConfigError as e:
            return f"not available in this checkout: {e}"
    return None


def row_config(name: str, row: Row, args: argparse.Namespace) -> dict:
    """The record's config of one row (with --unet / --latent applied)."""
    from jaxsd.config import ModelConfig

    segmented = ModelConfig().segmented_backward if args.segmented_backward is None else args.segmented_backward == "on"
    config = {"row": name, **asdict(row), "unet": args.unet or row.unet, "latent": args.latent or row.latent,
              "segmented_backward": segmented, "clip": row.clip if args.clip is None else args.clip,
              "fused_update": args.fused_update == "on"}
    config.pop("requires")
    config.pop("title")
    return config


def run(args: argparse.Namespace) -> list[dict]:
    if "jaxsd" not in args.frameworks:
        raise InputError("the memory suite compiles jaxsd's step: include jaxsd in --frameworks")
    records = []
    for name in args.rows:
        row = ROWS[name]
        config = row_config(name, row, args)
        why = missing_settings(row)
        if why:
            records.append(make_record("memory", config, {"jaxsd": {"skipped": why}}, note=args.note))
            continue
        out = run_child("memory", "jaxsd", {**config, "unet_config": unet_preset(config["unet"]), "top": args.top},
                        timeout=args.timeout)
        figures = {**compiled_memory_figures(out), "budget": out["budget"], "peak": out["peak"], "info": out["info"]}
        records.append(make_record("memory", config, {"jaxsd": figures}, note=args.note))
    return records


def frameworks(args: argparse.Namespace) -> list[str]:
    return ["jaxsd"]


def options(config: dict) -> str:
    """A record's training options as the table prints them: optimizer (LoRA and its base), clipping, remat,
    param dtype, segmented backward and fused update — e.g. "adamw, clip 1, remat full, segmented"."""
    short = {"bfloat16": "bf16", "float32": "fp32", None: "fp32"}
    parts = [f"LoRA r{config['lora']} {short[config['base_dtype']]} base" if config.get("lora") else "",
             config["optimizer"], f"clip {config['clip']:g}" if config["clip"] else "no clip",
             f"remat {config['remat']}" if config["remat"] else "no remat",
             "bf16 params" if config.get("param_dtype") == "bfloat16" else "",
             "segmented" if config.get("segmented_backward") else "",
             "fused update" if config.get("fused_update") else ""]
    return ", ".join(p for p in parts if p)


def _gb(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def format_table(records: list[dict]) -> str:
    rows, tops = [], []
    for r in records:
        c, j = r["config"], r["jaxsd"]
        row = ROWS.get(c["row"])
        label = c["row"] if row is not None and row.unet == c["unet"] else f"{c['row']} ({c['unet']})"
        if "skipped" in j:
            rows.append([label, options(c), c["latent"], c["batch"], _gb(c["target_gb"]), j["skipped"], *[""] * 8])
            continue
        b, kinds = j["budget"], j["peak"]["kinds_gb"]
        rows.append([label, options(c), c["latent"], c["batch"], _gb(c["target_gb"]), _gb(j["per_device_gb"]),
                     _gb(b["params_gb"] + b["frozen_gb"]), _gb(b["opt_state_gb"]), _gb(j["temp_gb"]),
                     *(_gb(kinds.get(k, 0.0)) for k in KINDS),
                     f"{j['compile_s']['median']:.0f}"])
        if j["peak"].get("top"):
            tops.append(f"{label}: largest buffers alive at the peak\n" + table(
                ["GB", "kind", "shape", "op"], [[_gb(b["gb"]), b["kind"], b["shape"], b["op"][:100]]
                                                for b in j["peak"]["top"]]))
    return "\n\n".join([table(HEADERS, rows), *tops])


# ----------------------------------------------------------------------------- child

def child_jaxsd(config: dict) -> dict:
    """One row's step compiled from shapes: XLA's memory analysis, the argument budget, the peak's buffers."""
    import tempfile

    import jax

    from bench import jaxsd_unet as J
    from bench.jaxsd_steps import LoRABench, make_kit
    from bench.peak_memory import analyse_peak, compile_with_buffer_dump, state_budget

    cfg = config["unet_config"]
    model = J.build_model(cfg, config["dtype"], remat_policy=config["remat"], param_dtype=config["param_dtype"],
                          segmented_backward=config["segmented_backward"])
    lora = LoRABench(config["lora"], config["base_dtype"]) if config["lora"] else None
    kit = make_kit("train", model, config["optimizer"], clip=config["clip"], lora=lora,
                   fused_update=config.get("fused_update", False))
    state = kit.abstract_state()
    batch = kit.to_batch(J.abstract_batch(cfg, config["batch"], config["latent"]))
    # LLVM at -O0: which buffers exist and when is decided by XLA's HLO passes and buffer assignment,
    # before LLVM runs, so the memory figures are the trainer's (-O1); only the compile time is not
    options = {**(kit.compiler_options or {}), "xla_backend_optimization_level": 0}
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-xla-") as dump:
        compiled, lower_s, compile_s = compile_with_buffer_dump(
            kit.step, (*state, batch), dump, donate_argnums=kit.donate, compiler_options=options)
        mem = J.memory_figures(compiled)
        peak = analyse_peak(dump, state[0], top=config["top"])
    num_params, num_trainable = kit.param_counts(state)
    return {**mem, "compile_s": lower_s + compile_s, "lower_s": lower_s, "budget": state_budget(state[0]),
            "peak": peak, "info": {"backend": jax.default_backend(), "num_params": num_params,
                                   "num_trainable": num_trainable}}
