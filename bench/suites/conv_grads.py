"""conv-grads: one 3×3 convolution's forward, input gradient and kernel gradient, jaxsd (XLA) vs torch.

Why it exists: a LoRA step needs every layer's input gradient but no base kernel's gradient,
so its time is the forward plus the input-gradient ("backward-data") convolutions. This suite
times the three convolutions of the SD UNet's 3×3 convs on their own, per level, so a gap in the
LoRA step can be traced to the backend's kernels rather than to the step around them.

Each op is timed alone: XLA compiles `conv`, the vjp of `conv` in the input and the vjp in the
kernel as three programs (a vjp of a linear op needs no forward, which XLA drops); torch calls
`torch.nn.grad.conv2d_input` / `conv2d_weight`, the same aten backward kernels autograd runs.
NHWC / HWIO in XLA, NCHW / OIHW in torch — each framework's native layout. fp32, 2 threads.

`--conv xla,im2col,taps` times jaxsd's CPU lowerings (`jaxsd.models.conv_select`) in one child,
interleaved repeat by repeat so the machine's load falls on all alike, and checks their
outputs against the first's (≤ 1e-5 relative) before anything is recorded. `--shapes demo`: the
demo UNet's 3×3 convs (8×8 latents, 32/64 channels; use `--batch 64`, its batch); `--shapes sd-vae`:
SD's VAE at 256² (its kernel gradients are a VAE step's slow part).
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
# the demo's UNet (jaxsd/demo/settings.py: 32/64 channels, 8×8 latents; batch 64 in training)
DEMO_SHAPES = (("level0 resnet", 8, 32, 32, 1), ("level0 downsample", 8, 32, 32, 2),
               ("level1 resnet", 4, 64, 64, 1), ("up level1 resnet (concat in)", 4, 128, 64, 1),
               ("up level0 resnet (concat in)", 8, 96, 32, 1))
# SD's VAE (128, 256, 512, 512 channels) at 256² pixels, batch 1 in vae-step: where its step's kernel
# gradients go (the stride-2 row pads (1, 1) here, diffusers' downsampler (0, 1): the same work)
VAE_SHAPES = (("level0 resnet", 256, 128, 128, 1), ("level0 downsample", 256, 128, 128, 2),
              ("level1 resnet", 128, 256, 256, 1), ("level2 resnet", 64, 512, 512, 1),
              ("level3 resnet", 32, 512, 512, 1), ("decoder conv_out", 256, 128, 3, 1))
SHAPE_SETS = {"sd15": SHAPES, "demo": DEMO_SHAPES, "sd-vae": VAE_SHAPES}
CONVS = ("xla", "im2col", "taps")


def _convs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CONVS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--conv takes distinct names from {CONVS}, comma-separated; got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=1, help="images per convolution (default 1)")
    p.add_argument("--scale", type=int, default=1, help="multiply every side (1: 32×32 latents, 2: 64×64)")
    p.add_argument("--shapes", default="sd15", choices=sorted(SHAPE_SETS),
                   help="sd15: the SD1.5 UNet's 3×3 convs (default); demo: the demo UNet's; sd-vae: SD's VAE's at 256²")
    p.add_argument("--conv", type=_convs, default=["xla"], metavar="LIST",
                   help="jaxsd's lowerings to time, interleaved in one process: xla (default), im2col, taps, or "
                        "several, e.g. xla,taps (the first is the record's `jaxsd`, the others `jaxsd_<name>` + "
                        "`vs_<first>`)")


def run(args: argparse.Namespace) -> list[dict]:
    shapes = SHAPE_SETS[args.shapes]
    config = {"batch": args.batch, "scale": args.scale, "warmup": args.warmup, "repeats": args.repeats,
              "shapes": [list(s) for s in shapes], "convs": args.conv}
    results = {fw: run_child("conv_grads", fw, config, timeout=args.timeout) for fw in args.frameworks}
    if len(results) == 2:  # same inputs, same math: refuse to time two different computations
        for i, (j, t) in enumerate(zip(results["jaxsd"]["checks"], results["torch"]["checks"])):
            if not np.allclose(j, t, rtol=1e-4, atol=1e-6):
                raise BenchError(f"conv-grads: {shapes[i // 3][0]} {OPS[i % 3]}: jaxsd {j} vs torch {t} (mean, mean²)")
    first, others = args.conv[0], args.conv[1:]
    records = []
    for i, (name, side, cin, cout, stride) in enumerate(shapes):
        figures = {fw: _figures(results[fw]["ms"][i], first if fw == "jaxsd" else None) for fw in results}
        if "jaxsd" in results:
            for conv in others:
                figures[f"jaxsd_{conv}"] = _figures(results["jaxsd"]["ms"][i], conv)
                figures[f"vs_{first}"] = {f"{op}_ms": figures[f"jaxsd_{conv}"][f"{op}_ms"]["median"]
                                          / figures["jaxsd"][f"{op}_ms"]["median"] for op in OPS}
        records.append(make_record("conv-grads", {"shape": name, "side": side * args.scale, "cin": cin,
                                                  "cout": cout, "stride": stride, "batch": args.batch,
                                                  "conv": args.conv, "shapes": args.shapes}, figures, note=args.note))
    return records


def _figures(ms: dict, conv: str | None) -> dict:
    """{op_ms: stats} of one framework's row (jaxsd's: of lowering `conv`)."""
    return {f"{op}_ms": stats(ms[conv][op] if conv else ms[op]) for op in OPS}


def format_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        c, cells = r["config"], []
        convs = c.get("conv", ["xla"])  # records from before --conv timed XLA's conv alone
        sides = ["jaxsd", *(f"jaxsd_{n}" for n in convs[1:]), "torch"]
        for op in OPS:
            ms = [r.get(side, {}).get(f"{op}_ms") for side in sides]
            cell = " / ".join(_ms(m) for m in ms)
            if ms[0] and ms[-1]:
                cell += f" ({ms[0]['median'] / ms[-1]['median']:.2f}× torch)"
            if len(convs) > 1:
                cell += f" ({r[f'vs_{convs[0]}'][f'{op}_ms']:.2f}× {convs[0]})"
            cells.append(cell)
        rows.append([c["shape"], f"{c['side']}² × {c['cin']}→{c['cout']}, s{c['stride']}, b{c['batch']}",
                     "/".join(convs), *cells])
    return table(["conv", "shape", "lowerings", "forward ms: jaxsd lowerings (--conv) / torch", "input grad ms", "kernel grad ms"],
                 rows)


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
    """Per shape {conv: {op: [ms]}}: each op compiled once per lowering, the lowerings' repeats
    interleaved; each lowering's results checked against the first's. `checks` are the first lowering's."""
    import jax

    from jaxsd.train.compile import train_step_compiler_options

    opts = train_step_compiler_options()
    ms, checks = [], []
    for name, side, cin, cout, stride in config["shapes"]:
        args = tuple(jax.numpy.asarray(a) for a in _arrays(config, side, cin, cout, stride))
        row = {conv: {} for conv in config["convs"]}
        for op in OPS:
            compiled = {conv: jax.jit(_jax_ops(stride, conv)[op]).lower(*args).compile(compiler_options=opts)
                        for conv in config["convs"]}
            outs = {conv: np.asarray(c(*args)) for conv, c in compiled.items()}
            ref = outs[config["convs"][0]]
            if any(_rel(out, ref) > 1e-5 for out in outs.values()):
                _check_against_exact(f"conv-grads: {name} {op}", op, outs, [np.asarray(a) for a in args], stride)
            checks.append(_check(ref))
            run = {conv: (lambda c=c, a=args: jax.block_until_ready(c(*a))) for conv, c in compiled.items()}
            timed = _timed_interleaved(run, config)
            for conv in config["convs"]:
                row[conv][op] = timed[conv]
        ms.append(row)
    return {"ms": ms, "checks": checks}


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _check_against_exact(what: str, op: str, outs: dict, args: list[np.ndarray], stride: int) -> None:
    """Lowerings that differ by > 1e-5: each must be within 1e-5 of the float64 result, or no further from it
    than the first lowering (XLA's own kernel gradient of a 256² image is 1.1e-5 off; the taps' 8e-7)."""
    x, w, dy = (a.astype(np.float64) for a in args)
    kh, kw, cin, cout = w.shape
    b, ho, wo, _ = dy.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = [xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride].reshape(-1, cin)
               for i in range(kh) for j in range(kw)]
    if op == "forward":
        exact = (np.concatenate(windows, axis=1) @ w.reshape(-1, cout)).reshape(b, ho, wo, cout)
    elif op == "kernel_grad":
        exact = np.stack([t.T @ dy.reshape(-1, cout) for t in windows]).reshape(w.shape)
    else:
        raise BenchError(f"{what}: the lowerings differ by more than 1e-5 (no float64 reference for {op})")
    errors = {conv: _rel(out, exact) for conv, out in outs.items()}
    bound = max(1e-5, next(iter(errors.values())))
    if any(e > bound for e in errors.values()):
        raise BenchError(f"{what}: relative error vs float64 {errors}, above {bound:.2g}")


def _timed_interleaved(fns: dict, config: dict) -> dict[str, list[float]]:
    """{name: [ms]}: warm-up, then each repeat runs every fn once in turn."""
    for _ in range(config["warmup"]):
        for fn in fns.values():
            fn()
    out = {name: [] for name in fns}
    for _ in range(config["repeats"]):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def _jax_ops(stride: int, conv_impl: str = "xla") -> dict:
    """(x, w, dy) -> the op's result, per op (NHWC / HWIO), on one of jaxsd's lowerings."""
    import jax

    from jaxsd.models.im2col import LOWERINGS

    pad = ((1, 1), (1, 1))
    lowering = LOWERINGS[conv_impl]

    def conv(x, w):
        return lowering(x, w, stride, pad)

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
