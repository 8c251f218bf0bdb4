"""flops: XLA cost-analysis FLOPs of the compiled UNet train step, vs published counts.

The train step (forward + backward + AdamW update, the one `train-step` times) is
lowered and compiled for abstract inputs — `jax.ShapeDtypeStruct`s for params,
optimizer state and batch — so nothing is allocated. XLA's cost analysis of the
compiled executable gives the FLOPs of one step; divided by the batch size and
compared with the published per-image counts (SD1.5 @ 64×64 latents ≈ 2.41 TFLOP,
SDXL @ 128×128 ≈ 20.2 TFLOP per training step), and turned into the time floor
one image's step cannot beat at an accelerator's dense bf16 peak. Divide that
floor by your measured step time per image to get your MFU.
"""

from __future__ import annotations

import argparse

from bench.harness import BenchError, make_record, run_child, stats, table
from bench.presets import UNET_PRESETS, unet_preset
from jaxsd.errors import InputError

# Published training FLOPs per image per step (forward + backward ≈ 3 × forward).
PUBLISHED_FLOPS = {"sd15": 2.41e12, "sdxl": 20.2e12}
# ... at these latent sizes (512² and 1024² images).
PUBLISHED_LATENT = {"sd15": 64, "sdxl": 128}
# Dense bf16 peak FLOP/s.
ACCELERATORS = {"H100": 989e12, "TPU v5p": 459e12, "TPU v6e": 918e12}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="sd15,sdxl",
                   help=f"comma-separated presets (default sd15,sdxl; any of {','.join(sorted(UNET_PRESETS))})")
    p.add_argument("--latent", type=int, default=None,
                   help="latent size (default: the published one, 64 for sd15 and 128 for sdxl; "
                        "the preset's own size otherwise)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype; the FLOP count does not depend on it, and XLA:CPU compiles fp32 "
                        "faster (default float32)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "adafactor"))
    p.add_argument("--step", default="train", choices=("train", "simple", "grad"),
                   help="jaxsd's real training step (default), the bare forward+backward+update, or "
                        "forward+backward only")


def run(args: argparse.Namespace) -> list[dict]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in UNET_PRESETS]
    if bad or not models:
        raise InputError(f"--models {args.models!r}: choose from {','.join(sorted(UNET_PRESETS))}")
    records = []
    for name in models:
        latent = args.latent or PUBLISHED_LATENT.get(name) or unet_preset(name)["sample_size"]
        config = {"preset": name, "step": args.step, "latent": latent, "batch": args.batch, "dtype": args.dtype,
                  "optimizer": args.optimizer}
        out = run_child("flops", "jaxsd", {**config, "unet": unet_preset(name)}, timeout=args.timeout)
        if out["flops"] is None:
            raise BenchError(f"{name}: this backend's cost analysis reports no FLOPs")
        per_image = out["flops"] / args.batch
        figures = {"flops": out["flops"], "flops_per_image": per_image,
                   "hlo_flops_per_image": (out["hlo_flops"] or 0) / args.batch or None,
                   "compile_s": stats([out["lower_s"] + out["compile_s"]]), "lower_s": stats([out["lower_s"]]),
                   "peak_rss_gb": stats([out["peak_rss_gb"]])}
        published = PUBLISHED_FLOPS.get(name) if latent == PUBLISHED_LATENT.get(name) else None
        results = {"jaxsd": figures, "published_flops_per_image": published,
                   "ratio": {"flops_vs_published": per_image / published if published else None},
                   "floor_s_per_image": {acc: per_image / peak for acc, peak in ACCELERATORS.items()}}
        records.append(make_record("flops", config, results, note=args.note))
    return records


def format_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        c, j = r["config"], r["jaxsd"]
        pub = r["published_flops_per_image"]
        q = r["ratio"]["flops_vs_published"]
        rows.append([c["preset"], c.get("step", "train"), f"{c['latent']}×{c['latent']}", f"{j['flops_per_image'] / 1e12:.3g}",
                     "—" if pub is None else f"{pub / 1e12:.3g}", "—" if q is None else f"{q:.3f}×",
                     *(f"{r['floor_s_per_image'][a] * 1e3:.3g}" for a in ACCELERATORS),
                     f"{j['compile_s']['median']:.0f}"])
    return table(["preset", "step", "latent", "TFLOP/img/step", "published", "ratio",
                  *(f"{a} floor ms" for a in ACCELERATORS), "compile s"], rows)


def child_jaxsd(config: dict) -> dict:
    import time

    import jax

    from bench import jaxsd_unet as J
    from bench.jaxsd_steps import make_kit

    model = J.build_model(config["unet"], config["dtype"])
    kit = make_kit(config["step"], model, config["optimizer"])
    state = kit.abstract_state()
    batch = kit.to_batch(J.abstract_batch(config["unet"], config["batch"], config["latent"]))
    t0 = time.perf_counter()
    lowered = jax.jit(kit.step, donate_argnums=kit.donate).lower(*state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo = lowered.cost_analysis()  # before XLA's optimisations: a cross-check of the compiled count
    hlo_flops = float(hlo["flops"]) if hlo and "flops" in hlo else None
    return {"flops": J.flops_of(compiled), "hlo_flops": hlo_flops, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "backend": jax.default_backend()}
