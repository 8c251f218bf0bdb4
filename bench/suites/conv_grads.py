"""conv-grads: one 3×3 convolution's forward, input gradient and kernel gradient, jaxsd (XLA) vs torch.

Why it exists: a LoRA step needs every layer's input gradient but no base kernel's gradient,
so its time is the forward plus the input-gradient ("backward-data") convolutions. This suite
times the three convolutions of the SD UNet's 3×3 convs on their own, per level, so a gap in the
LoRA step can be traced to the backend's kernels rather than to the step around them.

Each op is timed alone: XLA compiles `conv`, the vjp of `conv` in the input and the vjp in the
kernel as three programs (a vjp of a linear op needs no forward, which XLA drops); torch calls
`torch.nn.grad.conv2d_input` / `conv2d_weight`, the same aten backward kernels autograd runs.
NHWC / HWIO in XLA, NCHW / OIHW in torch — each framework's native layout. fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.harness import BenchError, make_record, run_child, stats, table

OPS = ("forward", "input_grad", "kernel_grad")
# (name, side, channels in, channels out, stride): the SD1.5 UNet's 3×3 convs at 32×32 latents
# (256 px); `--scale 2` gives 512 px's sides
SHAPES = (("level0 resnet", 32, 320, 320, 1), ("level0 downsample", 32, 320, 320, 2),
          ("level1 resnet", 16, 640, 640, 1), ("level2 resnet", 8, 1280, 1280, 1),
          ("level3 resnet", 4, 1280, 1280, 1), ("up level3 resnet (concat in)", 4, 2560, 1280, 1))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=1, help="images per convolution (default 1)")
    p.add_argument("--scale", type=int, default=1, help="multiply every side (1: 32×32 latents, 2: 64×64)")


def run(args: argparse.Namespace) -> list[dict]:
    config = {"batch": args.batch, "scale": args.scale, "warmup": args.warmup, "repeats": args.repeats,
              "shapes": [list(s) for s in SHAPES]}
    results = {fw: run_child("conv_grads", fw, config, timeout=args.timeout) for fw in args.frameworks}
    if len(results) == 2:  # same inputs, same math: refuse to time two different computations
        for i, (j, t) in enumerate(zip(results["jaxsd"]["checks"], results["torch"]["checks"])):
            if not np.allclose(j, t, rtol=1e-4, atol=1e-6):
                raise BenchError(f"conv-grads: {SHAPES[i // 3][0]} {OPS[i % 3]}: jaxsd {j} vs torch {t} (mean, mean²)")
    records = []
    for i, (name, side, cin, cout, stride) in enumerate(SHAPES):
        per_fw = {fw: {f"{op}_ms": stats(results[fw]["ms"][i][op]) for op in OPS} for fw in results}
        records.append(make_record("conv-grads", {"shape": name, "side": side * args.scale, "cin": cin,
                                                  "cout": cout, "stride": stride, "batch": args.batch},
                                   per_fw, note=args.note))
    return records


def format_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        c, cells = r["config"], []
        for op in OPS:
            j, t = (r.get(fw, {}).get(f"{op}_ms") for fw in ("jaxsd", "torch"))
            cells.append(f"{_ms(j)} / {_ms(t)}" + (f" ({j['median'] / t['median']:.2f}×)" if j and t else ""))
        rows.append([c["shape"], f"{c['side']}² × {c['cin']}→{c['cout']}, s{c['stride']}", *cells])
    return table(["conv", "shape", "forward ms jaxsd / torch", "input grad ms", "kernel grad ms"], rows)


def _ms(s: dict | None) -> str:
    return "—" if s is None else f"{s['median']:.3g}"


def _timed(fn, config: dict) -> list[float]:
    for _ in range(config["warmup"]):
        fn()
    out = []
    for _ in range(config["repeats"]):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _check(out) -> list[float]:
    """Layout-free summary of one op's result (mean, mean square): both frameworks must agree."""
    out = np.asarray(out, np.float64)
    return [float(out.mean()), float(np.square(out).mean())]


def _arrays(config: dict, side: int, cin: int, cout: int, stride: int):
    """x [B, H, W, cin], w [3, 3, cin, cout], dy [B, H/stride, W/stride, cout] (NHWC / HWIO)."""
    rng = np.random.default_rng(0)
    s, b = side * config["scale"], config["batch"]
    return (rng.standard_normal((b, s, s, cin), dtype=np.float32),
            rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * 0.02,
            rng.standard_normal((b, s // stride, s // stride, cout), dtype=np.float32))


def child_jaxsd(config: dict) -> dict:
    import jax

    from jaxsd.train.compile import train_step_compiler_options

    opts = train_step_compiler_options()
    ms, checks = [], []
    for _name, side, cin, cout, stride in config["shapes"]:
        args = tuple(jax.numpy.asarray(a) for a in _arrays(config, side, cin, cout, stride))
        row = {}
        for op, f in _jax_ops(stride).items():
            compiled = jax.jit(f).lower(*args).compile(compiler_options=opts)
            row[op] = _timed(lambda c=compiled: jax.block_until_ready(c(*args)), config)  # noqa: B023 (called here)
            checks.append(_check(compiled(*args)))
        ms.append(row)
    return {"ms": ms, "checks": checks}


def _jax_ops(stride: int) -> dict:
    """(x, w, dy) -> the op's result, per op (NHWC / HWIO)."""
    import jax

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return {"forward": lambda x, w, dy: conv(x, w),
            "input_grad": lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0],
            "kernel_grad": lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]}


def child_torch(config: dict) -> dict:
    import torch

    torch.set_num_threads(2)
    ms, checks = [], []
    with torch.no_grad():
        for _name, side, cin, cout, stride in config["shapes"]:
            x, w, dy = (torch.from_numpy(a) for a in _arrays(config, side, cin, cout, stride))
            ops = _torch_ops(x.permute(0, 3, 1, 2).contiguous(), w.permute(3, 2, 0, 1).contiguous(),
                             dy.permute(0, 3, 1, 2).contiguous(), stride)
            ms.append({op: _timed(f, config) for op, f in ops.items()})
            checks += [_check(f().numpy()) for f in ops.values()]
    return {"ms": ms, "checks": checks}


def _torch_ops(x, w, dy, stride: int) -> dict:
    """() -> the op's result, per op (NCHW / OIHW): the aten kernels autograd runs."""
    import torch

    return {"forward": lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=1),
            "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, stride=stride, padding=1),
            "kernel_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=stride, padding=1)}
