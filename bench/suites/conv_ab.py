"""conv-ab: one jaxsd train step compiled once per convolution lowering, timed interleaved in one process.

What `jaxsd.models.conv_select` buys a whole step on this CPU: the same step (`--step train`: the
trainer's, as train-step builds it; `--lora RANK` a LoRA run's; `--vae PRESET` vae-step's VAE run, its
UNet options unused) is compiled under each `--conv` choice (`auto`: the table, `xla`: XLA's convolution
everywhere, `im2col`: every k×k conv as a matmul, `taps`: every k×k conv's kernel gradient as tap
matmuls), then each repeat runs every compiled step once in turn, so the load of a shared machine
falls on all of them alike: compare the ratios (`vs_<first>`), not the absolute times. XLA's
memory analysis of each program says what the im2col patches cost (temporaries).

jaxsd only: torch's side of the same step is `train-step`'s.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.harness import make_record, run_child, stats, table
from bench.presets import DEFAULT_LATENT, numpy_batch, unet_preset
from bench.suites.train_step import add_unet_arguments

LOWERINGS = ("auto", "xla", "im2col", "taps")


def _lowerings(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(names) < 2 or len(set(names)) != len(names) or any(n not in LOWERINGS for n in names):
        raise argparse.ArgumentTypeError(f"--conv takes two or more distinct names of {LOWERINGS}, "
                                         f"comma-separated; got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_unet_arguments(p, preset="demo")
    p.add_argument("--latent", type=int, default=None, help="latent height = width (default: the preset's)")
    p.add_argument("--batch", type=int, default=64, help="default 64: the demo's batch")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="a LoRA run's step (rank = alpha = RANK, attn targets), as train-step --lora")
    p.add_argument("--base-dtype", default="float32", choices=("float32", "bfloat16"), help="--lora: the base's dtype")
    p.add_argument("--vae", default=None, choices=("sd", "tiny"), metavar="PRESET",
                   help="time vae-step's VAE training step (sd: SD's VAE at 256², its --batch) instead of a UNet's")
    p.add_argument("--conv", type=_lowerings, default=["xla", "auto"], metavar="LIST",
                   help="lowerings to compare, the first is the baseline (default xla,auto)")


def run(args: argparse.Namespace) -> list[dict]:
    if args.vae:
        return _records(args, _run_vae(args))
    config = {"preset": args.preset, "step": args.step, "dtype": args.dtype, "optimizer": args.optimizer,
              "attention": args.attention, "remat": args.remat, "clip": args.clip,
              "latent": args.latent or DEFAULT_LATENT[args.preset], "batch": args.batch, "lora": args.lora,
              "base_dtype": args.base_dtype if args.lora else None, "warmup": args.warmup, "repeats": args.repeats}
    out = run_child("conv_ab", "jaxsd", {**config, "unet": unet_preset(args.preset), "convs": args.conv},
                    timeout=args.timeout)
    return _records(args, (config, out))


def _run_vae(args: argparse.Namespace) -> tuple[dict, dict]:
    """vae-step's files prepared (no torch side), then its jaxsd step per lowering in one child."""
    from bench.suites.vae_step import PRESETS

    preset = PRESETS[args.vae]
    config = {"vae": args.vae, "resolution": preset["resolution"], "batch": args.batch, "dtype": "float32",
              "optimizer": "adamw", "clip": 1.0, "lpips_weight": 1.0, "disc_start": 0,
              "warmup": args.warmup, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-conv-ab-") as folder:
        child_cfg = {**config, **preset, "folder": folder, "torch": False, "convs": args.conv}
        run_child("vae_step", "prepare", child_cfg, timeout=args.timeout)
        out = run_child("conv_ab", "jaxsd", child_cfg, timeout=args.timeout)
    return config, out


def _records(args: argparse.Namespace, config_out: tuple[dict, dict]) -> list[dict]:
    config, out = config_out
    first = args.conv[0]
    records = []
    for conv in args.conv:
        mine = out["by_conv"][conv]
        figures = {"step_s": stats(mine["step_s"]), "compile_s": stats([mine["compile_s"]]),
                   "temp_gb": mine["temp_gb"], "first_loss": mine["first_loss"], "convolutions": mine["convolutions"],
                   "peak_rss_gb": stats([out["peak_rss_gb"]])}
        ratio = stats(mine["step_s"])["median"] / stats(out["by_conv"][first]["step_s"])["median"]
        records.append(make_record("conv-ab", {**config, "conv": conv, "convs": args.conv},
                                   {"jaxsd": figures, f"vs_{first}": {"step_s": ratio}}, note=args.note))
    return records


def format_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        c, j = r["config"], r["jaxsd"]
        vs = next(v for k, v in r.items() if k.startswith("vs_"))
        if c.get("vae"):  # a VAE step: its pixels' side in the latent column
            rows.append([f"vae {c['vae']}", "—", c["resolution"], c["batch"], c["conv"], f"{j['step_s']['median']:.3g}",
                         f"{vs['step_s']:.2f}×", f"{j['temp_gb']:.3g}", j["convolutions"], f"{j['compile_s']['median']:.0f}"])
            continue
        rows.append([c["preset"], "—" if not c["lora"] else f"{c['lora']} ({c['base_dtype']})", c["latent"],
                     c["batch"], c["conv"], f"{j['step_s']['median']:.3g}", f"{vs['step_s']:.2f}×",
                     f"{j['temp_gb']:.3g}", j["convolutions"], f"{j['compile_s']['median']:.0f}"])
    return table(["preset", "lora", "latent", "batch", "conv", "step s", f"vs {records[0]['config']['convs'][0]}"
                  if records else "vs", "XLA temp GB", "conv ops", "compile s"], rows)


# ----------------------------------------------------------------------------- child

def child_jaxsd(config: dict) -> dict:
    """Compile the step under each lowering, check it traced what was asked, time them in turn."""
    import jax
    import jax.numpy as jnp

    from bench import jaxsd_unet as J
    from bench.suites.train_step import _jaxsd_kit
    from jaxsd.models.conv_select import forced_conv

    if config.get("vae"):
        from bench.jaxsd_steps import vae_trainer_kit
        from bench.suites.vae_step import _pixels, _trainer_config

        kit = vae_trainer_kit(_trainer_config(config))
        batch = kit.to_batch({"pixels": jnp.asarray(_pixels(config))})
    else:
        kit = _jaxsd_kit(config)
        batch = kit.to_batch({k: jnp.asarray(v) for k, v in numpy_batch(config["unet"], config["batch"],
                                                                            config["latent"], seed=1).items()})
    state = kit.start()
    compiled, figures = {}, {}
    for conv in config["convs"]:
        with forced_conv(conv):
            compiled[conv], lower_s, compile_s = J.timed_compile(kit.step, *state, batch, donate_argnums=kit.donate,
                                                                 compiler_options=kit.compiler_options)
        hlo = compiled[conv].as_text()
        figures[conv] = {"compile_s": lower_s + compile_s, "temp_gb": J.memory_figures(compiled[conv])["temp_gb"],
                         "convolutions": hlo.count(" convolution("), "step_s": [], "first_loss": None}
    if "im2col" in figures and figures["im2col"]["convolutions"] > 0:
        raise RuntimeError(f"the im2col program still has {figures['im2col']['convolutions']} convolutions")
    n = len(state)
    for i in range(config["warmup"] + config["repeats"]):
        for conv, step in compiled.items():  # the donated state passes from one program to the next
            t0 = time.perf_counter()
            out = step(*state, batch)
            jax.block_until_ready(out)
            if i >= config["warmup"]:
                figures[conv]["step_s"].append(time.perf_counter() - t0)
            state, aux = (out[:n], out[n]) if kit.updates_state else (state, out)
            if figures[conv]["first_loss"] is None:
                figures[conv]["first_loss"] = float(kit.loss(aux))
    return {"by_conv": figures}
