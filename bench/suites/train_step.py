"""train-step: forward + backward + optimizer update of a UNet, jaxsd vs diffusers + torch.

Both frameworks run the same network with the same weights (a random diffusers
UNet folder written once by a `prepare` child and loaded by both) on the same
batch, each in its own process. jaxsd's step is AOT-compiled first so compile time
is measured apart from step time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator

from bench.harness import comparison_table, make_record, repeat_children, run_child
from bench.presets import DEFAULT_LATENT, UNET_PRESETS, numpy_batch, unet_preset

LABELS = ("preset", "step", "clip", "latent", "batch", "dtype", "optimizer")


def add_unet_arguments(p: argparse.ArgumentParser, *, preset: str = "tiny") -> None:
    p.add_argument("--preset", default=preset, choices=sorted(UNET_PRESETS),
                   help=f"UNet architecture (default {preset}); sd15 needs ~15 GB RAM per framework")
    p.add_argument("--step", default="train", choices=("train", "simple", "grad"),
                   help="train: jaxsd's real training step (noise drawn in the step, clipping, NaN guard) vs "
                        "the same recipe in torch (diffusers' train_text_to_image); simple: bare forward+"
                        "backward+update on fixed inputs, whose first losses must agree; grad: forward+"
                        "backward only, no optimizer (default train)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype; params stay fp32 (torch side: torch.autocast)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "adafactor"))
    p.add_argument("--attention", default="auto", choices=("auto", "einsum", "xla", "cudnn"),
                   help="jaxsd attention implementation")
    p.add_argument("--remat", default=None, metavar="POLICY",
                   help="jaxsd rematerialisation policy name (default: none)")
    p.add_argument("--clip", type=float, default=1.0, metavar="NORM",
                   help="--step train: global-norm gradient clipping in both frameworks (default 1.0, as "
                        "diffusers' recipe); 0 = off, which lets jaxsd update each param as soon as its "
                        "gradient exists instead of holding every gradient")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="keep the shared random UNet weights here between runs (default: a temp dir)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_unet_arguments(p)
    p.add_argument("--latent", type=int, default=None,
                   help="latent height = width (default per preset: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_LATENT.items()) + ")")
    p.add_argument("--batch", type=int, default=1)


# ----------------------------------------------------------------------------- parent side

def base_config(args: argparse.Namespace) -> dict:
    """The knobs every UNet-step measurement shares (recorded in each JSON line)."""
    config = {"preset": args.preset, "step": args.step, "dtype": args.dtype, "optimizer": args.optimizer,
              "attention": args.attention, "remat": args.remat, "warmup": args.warmup, "repeats": args.repeats,
              "processes": args.processes}
    if args.step == "train":
        config["clip"] = args.clip
    return config


@contextlib.contextmanager
def shared_weights(args: argparse.Namespace, frameworks: tuple[str, ...]) -> Iterator[str | None]:
    """A diffusers UNet folder both frameworks load (None when only jaxsd runs: it inits its own)."""
    if "torch" not in frameworks:
        yield None
        return
    cfg = unet_preset(args.preset)
    if args.weights_dir:
        folder = os.path.join(args.weights_dir, f"unet-{args.preset}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            run_child("train_step", "prepare", {"unet": cfg, "folder": folder}, timeout=args.timeout)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-unet-") as tmp:
        run_child("train_step", "prepare", {"unet": cfg, "folder": tmp}, timeout=args.timeout)
        yield tmp


def measure(args: argparse.Namespace, config: dict, folder: str | None, frameworks: tuple[str, ...]) -> dict:
    """Run each framework's children for one configuration; returns {framework: figures}."""
    child_cfg = {**config, "unet": unet_preset(config["preset"]), "folder": folder}
    return {fw: repeat_children("train_step", fw, child_cfg, args.processes, timeout=args.timeout)
            for fw in frameworks}


def run(args: argparse.Namespace) -> list[dict]:
    frameworks = tuple(args.frameworks)
    config = {**base_config(args), "latent": args.latent or DEFAULT_LATENT[args.preset], "batch": args.batch}
    with shared_weights(args, frameworks) as folder:
        results = measure(args, config, folder, frameworks)
    return [make_record("train-step", config, results, note=args.note)]


def normalize_config(config: dict) -> dict:
    """What identifies a configuration in the report: records from before --clip existed clipped
    "train" steps at 1.0; warm-up and repeat counts are measurement effort, not configuration
    (a newer run with more repeats replaces an older one)."""
    config = {k: v for k, v in config.items() if k not in ("warmup", "repeats")}
    if config.get("step") == "train" and "clip" not in config:
        return {**config, "clip": 1.0}
    return config


def format_table(records: list[dict]) -> str:
    shown = [{**r, "config": {"clip": "—", **normalize_config(r["config"])}} for r in records]
    return comparison_table(shown, LABELS)


# ----------------------------------------------------------------------------- children

def _rss_gb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak so far (VmHWM), GB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_prepare(config: dict) -> dict:
    from bench.torch_unet import save_random_unet

    return {"num_params": save_random_unet(config["unet"], config["folder"], seed=0)}


def child_jaxsd(config: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from bench import jaxsd_unet as J
    from bench.jaxsd_steps import make_kit

    baseline = _rss_gb()
    cfg = config["unet"]
    model = J.build_model(cfg, config["dtype"], config["attention"], config.get("remat"))
    kit = make_kit(config["step"], model, config["optimizer"], clip=config.get("clip", 1.0))
    batch = kit.to_batch({k: jnp.asarray(v) for k, v in numpy_batch(cfg, config["batch"], config["latent"],
                                                                        seed=1).items()})
    if config.get("folder"):
        from jaxsd.convert.unet import load_unet

        _, params = load_unet(config["folder"])
    else:
        params = J.init_params(model)
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    state = jax.jit(kit.init, donate_argnums=0)(params)  # donated: the state takes over the params' buffers
    del params
    compiled, lower_s, compile_s = J.timed_compile(kit.step, *state, batch, donate_argnums=kit.donate,
                                                   compiler_options=kit.compiler_options)
    mem = compiled.memory_analysis()
    flops = J.flops_of(compiled)
    if kit.kind == "train":  # as the trainer does after compiling (jaxsd.train.compile.compile_train_step)
        from jaxsd.train.compile import release_freed_host_memory

        release_freed_host_memory()
    # where the peak comes from: the high-water mark once compiled vs. the child's final peak
    peak_after_compile = _rss_gb("VmHWM")
    n = len(state)
    first_loss, times = None, []
    for i in range(config["warmup"] + config["repeats"]):
        t0 = time.perf_counter()
        out = compiled(*state, batch)
        jax.block_until_ready(out)
        if i >= config["warmup"]:
            times.append(time.perf_counter() - t0)
        if kit.updates_state:
            state, aux = out[:n], out[n]
        else:
            aux = out
        if first_loss is None:
            first_loss = float(kit.loss(aux))
    return {"step_s": times, "compile_s": lower_s + compile_s, "lower_s": lower_s,
            "info": {"backend": jax.default_backend(), "devices": jax.device_count(), "first_loss": first_loss,
                     "flops": flops, "baseline_rss_gb": baseline,
                     "peak_rss_after_compile_gb": peak_after_compile,
                     "xla_temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 1e9 if mem else None,
                     "num_params": num_params}}


def child_torch(config: dict) -> dict:
    import torch

    from bench import torch_unet as T

    baseline = _rss_gb()
    cfg = config["unet"]
    model = T.load_unet(config.get("folder"), cfg)
    opt = T.make_optimizer(config["optimizer"], model.parameters())
    step = T.make_train_step(model, opt, config["dtype"], config["step"], clip=config.get("clip", 1.0))
    batch = T.torch_batch(numpy_batch(cfg, config["batch"], config["latent"], seed=1))
    first_loss, times = None, []
    for i in range(config["warmup"] + config["repeats"]):
        t0 = time.perf_counter()
        loss = step(batch)  # returns a Python float: the step has finished
        if i >= config["warmup"]:
            times.append(time.perf_counter() - t0)
        if first_loss is None:
            first_loss = loss
    return {"step_s": times,
            "info": {"threads": torch.get_num_threads(), "first_loss": first_loss, "baseline_rss_gb": baseline,
                     "num_params": sum(p.numel() for p in model.parameters())}}

