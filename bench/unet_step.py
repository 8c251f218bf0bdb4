"""UNet forward+backward under jit, jaxsd vs diffusers PyTorch, same weights, same batch.

    .venv/bin/python bench/unet_step.py --preset small --latent 32 --batch 1 --dtype fp32

Three child processes, one after another, so peak RSS never mixes:
  1. prepare: build diffusers' UNet2DConditionModel from the preset with a fixed seed and
     `save_pretrained` it to a temp folder;
  2. jaxsd: `load_unet`, jit value_and_grad of an MSE loss w.r.t. the params; compile time
     (lower + compile), then timed steps;
  3. torch: `from_pretrained`, the same loss, `backward()`; timed steps.
Each child reports compile/first-step time, per-step times (median/min/max) and its
peak RSS (ru_maxrss). The parent prints them side by side with jaxsd/torch ratios.
No optimizer update is included: this measures the model itself.
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

REPO = Path(__file__).resolve().parents[1]

_SD15 = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "norm_num_groups": 32,
    "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64,
}
PRESETS = {
    # every block kind at two resolutions; compiles in seconds
    "tiny": {**_SD15, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 64],
             "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 32},
    # SD1.5's structure at a quarter of its width (~54M params): fits a shared CPU
    "small": {**_SD15, "block_out_channels": [80, 160, 320, 320], "norm_num_groups": 16, "cross_attention_dim": 192},
    # the real SD1.5 UNet (859.5M params; ~15 GB peak for a step)
    "sd15": _SD15,
}
TEXT_LEN = 77


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _inputs(args, in_channels: int, context_dim: int):
    import numpy as np

    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent
    return (rng.standard_normal((b, in_channels, s, s)).astype(np.float32),
            rng.integers(0, 1000, (b,)).astype(np.int64),
            rng.standard_normal((b, TEXT_LEN, context_dim)).astype(np.float32),
            rng.standard_normal((b, in_channels, s, s)).astype(np.float32))


def child_prepare(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**PRESETS[args.preset])
    model.save_pretrained(args.folder)
    return {"params": sum(p.numel() for p in model.parameters())}


def child_jaxsd(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxsd.convert.unet import load_unet
    from jaxsd.models.unet import UNet2DConditionModel

    config, params = load_unet(args.folder)
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    model = UNet2DConditionModel(config, dtype=dtype, remat_policy=args.remat)
    x, t, ctx, target = _inputs(args, config.in_channels, config.context_dim)
    x, target = x.transpose(0, 2, 3, 1), target.transpose(0, 2, 3, 1)

    def loss_fn(p, x, t, ctx, target):
        out = model.apply({"params": p}, x, t, ctx)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - target))

    step = jax.jit(jax.value_and_grad(loss_fn))
    batch = tuple(jnp.asarray(a) for a in (x, t.astype("float32"), ctx, target))
    t0 = time.perf_counter()
    compiled = step.lower(params, *batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, grads = compiled(params, *batch)
        jax.block_until_ready(grads)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "times": times, "loss": float(loss), "peak_rss_gb": _peak_rss_gb()}


def child_torch(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(args.folder, low_cpu_mem_usage=False)
    model.train()
    x, t, ctx, target = (torch.from_numpy(a) for a in _inputs(args, model.config.in_channels,
                                                              model.config.cross_attention_dim))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(x, t, ctx).sample
        loss = torch.mean(torch.square(out.float() - target))
        loss.backward()
        return loss

    times, first = [], None
    for i in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= args.warmup:
            times.append(dt)
    return {"compile_s": first, "times": times, "loss": float(loss), "peak_rss_gb": _peak_rss_gb()}


def _run_child(kind: str, args, folder: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--folder", folder, "--preset", args.preset,
           "--latent", str(args.latent), "--batch", str(args.batch), "--dtype", args.dtype,
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--remat", args.remat] if args.remat else [])
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype (params fp32)")
    p.add_argument("--remat", default=None, help="jaxsd remat policy name (jax.checkpoint_policies)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compile")
    p.add_argument("--frameworks", default="jaxsd,torch")
    p.add_argument("--child", choices=("prepare", "jaxsd", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        fn = {"prepare": child_prepare, "jaxsd": child_jaxsd, "torch": child_torch}[args.child]
        print(json.dumps(fn(args)))
        return 0

    with tempfile.TemporaryDirectory() as folder:
        n_params = _run_child("prepare", args, folder)["params"]
        results = {fw: _run_child(fw, args, folder) for fw in args.frameworks.split(",")}
    print(f"UNet fwd+bwd: preset={args.preset} ({n_params / 1e6:.1f}M params) latent={args.latent}x{args.latent} "
          f"batch={args.batch} dtype={args.dtype} remat={args.remat} steps={args.steps} (warmup {args.warmup})")
    rows = [("compile / first step (s)", lambda r: r["compile_s"]),
            ("step median (s)", lambda r: statistics.median(r["times"])),
            ("step min (s)", lambda r: min(r["times"])),
            ("step max (s)", lambda r: max(r["times"])),
            ("peak RSS (GB)", lambda r: r["peak_rss_gb"]),
            ("loss", lambda r: r["loss"])]
    names = list(results)
    print(f"{'':28}" + "".join(f"{n:>12}" for n in names) + ("      jaxsd/torch" if len(names) == 2 else ""))
    for label, get in rows:
        vals = [get(results[n]) for n in names]
        line = f"{label:28}" + "".join(f"{v:12.3f}" for v in vals)
        if len(names) == 2 and label != "loss" and vals[1]:
            line += f"{vals[0] / vals[1]:17.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
