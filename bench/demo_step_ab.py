"""The demo UNet's `jaxsd train` step, source trees A/B in alternating child processes (a bisect tool).

    python bench/demo_step_ab.py TREE [TREE ...] [--rounds 3] [--steps 100] [--warmup 30]
        [--data DEMO_OUT] [--warm-heap] [--devices 1,2] [--xla-cache DIR]

Each round runs one child per TREE (and per `--devices` count); the order reverses every round,
so a shared machine's load falls on every variant alike. A child is `jaxsd train` imported from
that tree (PYTHONPATH=TREE) on the demo's UNet (jaxsd/demo/settings.py: channels 32/64,
cross-attention at 4×4, batch 64, 8×8×4 latents, 16 text tokens of width 32; AdamW, EMA, min-SNR,
conditioning dropout), on `synthetic` data (in memory, the same on every tree since 2026-11-30:
the config uses only keys that exist there) or, with `--data DEMO_OUT`, on a `jaxsd demo` output's
own demo.yaml and cache (the grain loader as the demo reads it). `--warm-heap` applies the demo's
glibc heap settings (`warm_cpu_heap`) in every child, whether its tree has them or not.

Per child: the median of metrics.jsonl's `step_time_s` after `--warmup` steps, and the CPU
seconds (user, system) per step over those steps, read from the child itself: CPU per step is
what load disturbs least, wall time what a quiet machine would show. Prints per-variant medians
over rounds and each one's ratio to the first. Nothing is appended to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package of the checkout
from bench.presets import unet_preset  # the demo's UNet config, written out (no jax import)


def demo_like_config(run_dir: str, steps: int, data: str | None) -> dict:
    """The demo's UNet training config (jaxsd/demo/run.py demo_config) on synthetic data, or its own
    demo.yaml (cache + grain loader) with run_dir and steps replaced."""
    if data is not None:
        import yaml
        cfg = yaml.safe_load((Path(data) / "demo.yaml").read_text())
        cfg["train"].update(run_dir=run_dir, steps=steps)
        cfg["checkpoint"]["every"] = steps
        return cfg
    return {
        "model": {"unet": unet_preset("demo"), "dtype": "float32"},
        "diffusion": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "prediction_type": "epsilon"},
        "loss": {"cond_dropout": 0.1, "min_snr_gamma": 5.0},
        "optimizer": {"name": "adamw", "learning_rate": 1e-3, "warmup_steps": 100, "schedule": "cosine",
                      "min_lr_ratio": 0.1, "weight_decay": 0.0},
        "train": {"run_dir": run_dir, "steps": steps, "batch_size": 64, "seed": 0, "data_source": "synthetic",
                  "ema": {"enabled": True, "decay": 0.999}},
        "synthetic": {"num_examples": 1536, "latent_size": 8, "latent_channels": 4, "text_len": 16, "text_dim": 32},
        "checkpoint": {"every": steps, "keep": 1, "async_save": False},
        "logging": {"every": 100, "tensorboard": False, "progress_bar": False},
    }


def child(args: argparse.Namespace) -> None:
    """In the child: optionally the demo's heap settings, then `jaxsd train` in this process."""
    if args.warm_heap:  # what jaxsd/train/compile.py warm_cpu_heap does, applied here so every tree gets it
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 2**31 - 1)
    import threading
    cfg = json.loads(Path(args.config).read_text())
    metrics, steps = Path(cfg["train"]["run_dir"]) / "metrics.jsonl", cfg["train"]["steps"]
    marks: dict[str, tuple[float, float, float]] = {}

    def watch() -> None:  # CPU seconds of this process over the timed steps (their metrics lines appear)
        while len(marks) < 2:
            n = metrics.read_text().count("\n") if metrics.exists() else 0
            for name, at in (("from", args.warmup), ("to", steps)):
                if n >= at and name not in marks:
                    ru = resource.getrusage(resource.RUSAGE_SELF)
                    marks[name] = (time.perf_counter(), ru.ru_utime, ru.ru_stime)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    from jaxsd.cli import main
    code = main(["train", args.config])
    if len(marks) == 2:
        (a, b), n = (marks["from"], marks["to"]), steps - args.warmup
        Path(args.config + ".cpu").write_text(json.dumps({"wall_per_step": (b[0] - a[0]) / n,
                                                          "user_per_step": (b[1] - a[1]) / n,
                                                          "sys_per_step": (b[2] - a[2]) / n}))
    sys.exit(code)


def run_one(tree: str, devices: int, args: argparse.Namespace, work: Path, tag: str) -> dict:
    run_dir = work / tag
    cfg_path = work / f"{tag}.json"
    cfg_path.write_text(json.dumps(demo_like_config(str(run_dir), args.steps, args.data)))
    env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
    if devices > 1:  # the batch split over that many CPU devices (sharding.data: -1 takes them all)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    if args.xla_cache:  # later rounds load each tree's compiled step instead of compiling it again
        env["JAX_COMPILATION_CACHE_DIR"] = args.xla_cache
    cmd = [sys.executable, __file__, "--child", "--config", str(cfg_path), "--warmup", str(args.warmup)]
    cmd += ["--warm-heap"] if args.warm_heap else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    times = [r["step_time_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "step_time_s" in r and r["step"] > args.warmup]
    return {"tree": tree, "devices": devices, "median_step_s": statistics.median(times), "min_step_s": min(times), "wall_s": wall,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "vol_ctx": after.ru_nvcsw - before.ru_nvcsw, "invol_ctx": after.ru_nivcsw - before.ru_nivcsw,
            "minflt": after.ru_minflt - before.ru_minflt, "steps_timed": len(times),
            **json.loads(Path(str(cfg_path) + ".cpu").read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="*", help="source trees (their jaxsd/ is imported)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=30, help="steps left out of the median")
    p.add_argument("--data", help="a jaxsd demo output folder: train on its cache through the loader")
    p.add_argument("--warm-heap", action="store_true", help="apply the demo's glibc heap settings in every child")
    p.add_argument("--devices", default="1", help="comma-separated CPU device counts to run each tree with")
    p.add_argument("--xla-cache", help="a persistent XLA compilation cache directory for every child")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    variants = [(t, int(d)) for t in args.trees for d in args.devices.split(",")]
    results: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="demo_step_ab_") as tmp:
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for i, (tree, devices) in enumerate(order):
                res = run_one(tree, devices, args, Path(tmp), f"r{r}_{i}")
                results[(tree, devices)].append(res)
                print(json.dumps({"round": r, **res}), flush=True)
    first = statistics.median(x["median_step_s"] for x in results[variants[0]])
    for (tree, devices), rs in results.items():
        med = statistics.median(x["median_step_s"] for x in rs)
        each = ", ".join(f"{x['median_step_s']:.4f}" for x in rs)
        print(f"{tree} on {devices} device(s): median step {med:.4f} s (rounds: {each}), "
              f"ratio to first {med / first:.3f}, user {statistics.median(x['user_s'] for x in rs):.1f} s, "
              f"sys {statistics.median(x['sys_s'] for x in rs):.1f} s, CPU per timed step "
              f"{statistics.median(x['user_per_step'] for x in rs):.3f} user + "
              f"{statistics.median(x['sys_per_step'] for x in rs):.3f} sys s, "
              f"invol ctx {statistics.median(x['invol_ctx'] for x in rs):.0f}")


if __name__ == "__main__":
    main()
