"""train-step: forward + backward + optimizer update of a UNet, jaxsd vs diffusers + torch.

Both frameworks run the same network with the same weights (a random diffusers
UNet folder written once by a `prepare` child and loaded by both) on the same
batch, each in its own process. jaxsd's step is AOT-compiled first so compile time
is measured apart from step time.

--lora RANK: a LoRA run's step instead of full fine-tuning. jaxsd: `jaxsd train`'s step for
`lora: {rank: RANK, alpha: RANK, targets: attn, base_dtype: B}`, one record per
--base-dtype B; torch: diffusers + PEFT (`unet.add_adapter(LoraConfig(r=RANK,
lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))`, the base frozen,
AdamW over the adapters only), fp32, measured once and compared with each jaxsd record.
--perceptual: jaxsd only — its step with the UNet's perceptual loss (`loss.perceptual.lpips_weight: 1`, every
sample of every step): the x0 prediction and the clean latents decoded by a random VAE of SD's layout
(`bench.perceptual_files.BENCH_VAE_BLOCKS`: a quarter of SD's width for `small`), LPIPS on a random VGG16.
Compare with the same run without it (docs/losses.md's cost table).
--memory-only: compile jaxsd's step from shapes (nothing allocated, nothing run) and
report XLA's memory analysis of it: arguments, outputs, aliased (donated), temporaries.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator

from bench.harness import (
    comparison_table,
    compiled_memory_figures,
    make_record,
    repeat_children,
    run_child,
    table,
)
from bench.presets import DEFAULT_LATENT, UNET_PRESETS, numpy_batch, unet_preset
from jaxsd.errors import InputError

LABELS = ("preset", "step", "clip", "lora", "base_dtype", "perceptual", "latent", "batch", "dtype", "optimizer")
MEMORY_LABELS = ("preset", "lora", "base_dtype", "perceptual", "latent", "batch", "dtype", "remat", "optimizer")
MEMORY_HEADERS = ("args GB", "temp GB", "total GB", "trained M", "compile s")
BASE_DTYPES = ("float32", "bfloat16")


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


def _rank(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a LoRA rank is ≥ 1 (0 = full fine-tuning)")
    return value


def _base_dtypes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in BASE_DTYPES for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated subset of {','.join(BASE_DTYPES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_unet_arguments(p)
    p.add_argument("--latent", type=int, default=None,
                   help="latent height = width (default per preset: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_LATENT.items()) + ")")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora", type=_rank, default=0, metavar="RANK",
                   help="measure a LoRA run's step (adapters of rank RANK, alpha RANK, on attn1/attn2 "
                        "to_q/to_k/to_v/to_out.0; the UNet frozen) vs diffusers + PEFT; 0 = full fine-tuning "
                        "(default)")
    p.add_argument("--base-dtype", type=_base_dtypes, default=None, metavar="DTYPES",
                   help="--lora: dtype(s) jaxsd stores the frozen base in (lora.base_dtype), comma-separated, "
                        "one record each against one torch measurement (torch: fp32); default float32")
    p.add_argument("--perceptual", action="store_true",
                   help="jaxsd only: the step with loss.perceptual's LPIPS term on every sample (random VAE of "
                        "SD's layout + random VGG16); compare with the same run without it")
    p.add_argument("--memory-only", action="store_true",
                   help="jaxsd only: compile the step from shapes (no weights allocated, nothing run) and "
                        "report XLA's memory analysis (arguments, outputs, temporaries)")


def frameworks(args: argparse.Namespace) -> list[str]:
    """The frameworks this run measures: --memory-only compiles jaxsd's step alone."""
    return ["jaxsd"] if args.memory_only else list(args.frameworks)


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


def _variants(args: argparse.Namespace, config: dict) -> list[dict]:
    """The jaxsd configurations of this run: one, or one per --base-dtype of a LoRA run."""
    if args.lora and args.step != "train":
        raise InputError(f"--lora {args.lora} measures jaxsd train's LoRA step: use --step train, not --step "
                         f"{args.step}")
    if args.base_dtype and not args.lora:
        raise InputError("--base-dtype is the dtype of a LoRA run's frozen base: add --lora RANK")
    if args.memory_only and "jaxsd" not in args.frameworks:
        raise InputError("--memory-only compiles jaxsd's step: include jaxsd in --frameworks")
    if args.perceptual:
        if args.step != "train" or (not args.memory_only and list(args.frameworks) != ["jaxsd"]):
            raise InputError("--perceptual measures jaxsd train's step with loss.perceptual, which has no torch "
                             "counterpart here: use --step train --frameworks jaxsd")
        config = {**config, "perceptual": "lpips"}
    if not args.lora:
        return [config]
    return [{**config, "lora": args.lora, "base_dtype": d} for d in args.base_dtype or ["float32"]]


def run(args: argparse.Namespace) -> list[dict]:
    config = {**base_config(args), "latent": args.latent or DEFAULT_LATENT[args.preset], "batch": args.batch}
    variants = _variants(args, config)
    if args.memory_only:
        return [memory_record(args, c) for c in variants]
    fws = tuple(args.frameworks)
    with shared_weights(args, fws) as folder:
        ours = [measure(args, c, folder, ("jaxsd",)) if "jaxsd" in fws else {} for c in variants]
        # torch has no base dtype: one fp32 measurement, compared with every jaxsd variant
        theirs = measure(args, {k: v for k, v in variants[0].items() if k != "base_dtype"}, folder, ("torch",)) \
            if "torch" in fws else {}
    return [make_record("train-step", c, {**o, **theirs}, note=args.note) for c, o in zip(variants, ours)]


def memory_record(args: argparse.Namespace, config: dict) -> dict:
    """XLA's memory analysis of jaxsd's step compiled from shapes."""
    config = {**config, "memory_only": True}
    for key in ("warmup", "repeats", "processes"):  # nothing runs
        config.pop(key)
    out = run_child("train_step", "memory", {**config, "unet": unet_preset(config["preset"])},
                    timeout=args.timeout)
    return make_record("train-step", config, {"jaxsd": {**compiled_memory_figures(out), "info": out["info"]}},
                       note=args.note)


def normalize_config(config: dict) -> dict:
    """What identifies a configuration in the report: records from before --clip existed clipped
    "train" steps at 1.0; warm-up and repeat counts are measurement effort, not configuration
    (a newer run with more repeats replaces an older one)."""
    config = {k: v for k, v in config.items() if k not in ("warmup", "repeats")}
    if config.get("step") == "train" and "clip" not in config:
        return {**config, "clip": 1.0}
    return config


def format_table(records: list[dict]) -> str:
    shown = [{**r, "config": {"clip": "—", "lora": "—", "base_dtype": "—", "perceptual": "—",
                              **normalize_config(r["config"])}}
             for r in records]
    steps = [r for r in shown if not r["config"].get("memory_only")]
    memory = [r for r in shown if r["config"].get("memory_only")]
    parts = [comparison_table(steps, LABELS)] if steps else []
    if memory:
        rows = [[*(str(r["config"].get(k)) for k in MEMORY_LABELS), *memory_cells(r["jaxsd"])] for r in memory]
        parts.append(table([*MEMORY_LABELS, *MEMORY_HEADERS], rows))
    return "\n\n".join(parts)


def memory_cells(figures: dict) -> list[str]:
    """XLA memory analysis columns of a compiled step (`MEMORY_HEADERS`)."""
    trained = figures.get("info", {}).get("num_trainable")  # records from before it was recorded have none
    return [f"{figures['argument_gb']:.3g}", f"{figures['temp_gb']:.3g}", f"{figures['per_device_gb']:.3g}",
            "—" if trained is None else f"{trained / 1e6:.3g}", f"{figures['compile_s']['median']:.0f}"]


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


@contextlib.contextmanager
def _jaxsd_kit(config: dict):
    """The StepKit of a child's configuration (model, step kind, optimizer, LoRA, perceptual loss, shared
    weights); with the perceptual loss, its random VAE and LPIPS files live in a temp dir while the kit is used."""
    from bench import jaxsd_unet as J
    from bench.jaxsd_steps import LoRABench, PerceptualBench, make_kit
    from bench.perceptual_files import BENCH_VAE_BLOCKS, save_random_lpips, save_random_vae

    model = J.build_model(config["unet"], config["dtype"], config["attention"], config.get("remat"))
    lora = LoRABench(config["lora"], config["base_dtype"]) if config.get("lora") else None
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-perceptual-") as tmp:
        perceptual = None
        if config.get("perceptual"):
            perceptual = PerceptualBench(str(save_random_vae(os.path.join(tmp, "vae"), BENCH_VAE_BLOCKS[config["preset"]])),
                                         str(save_random_lpips(os.path.join(tmp, "lpips.safetensors"))))
        yield make_kit(config["step"], model, config["optimizer"], clip=config.get("clip", 1.0),
                       folder=config.get("folder"), lora=lora, perceptual=perceptual)


def _param_info(kit, state: tuple) -> dict:
    num_params, num_trainable = kit.param_counts(state)
    return {"num_params": num_params, "num_trainable": num_trainable}


def child_jaxsd(config: dict) -> dict:
    baseline = _rss_gb()
    with _jaxsd_kit(config) as kit:
        return time_jaxsd_step(config, kit, baseline, numpy_batch(config["unet"], config["batch"], config["latent"],
                                                                  seed=1))


def time_jaxsd_step(config: dict, kit, baseline: float, np_batch: dict) -> dict:
    """A kit's step on `np_batch` (`kit.to_batch` maps it): AOT compile from the state's shapes (timed apart),
    then the state loaded, then `config["warmup"]` untimed and `config["repeats"]` timed steps. info: the first
    step's loss and, for a step whose aux is a dict of metrics (the trainer's), every scalar of it
    (`first_metrics`), XLA's memory figures, RSS marks."""
    import jax
    import jax.numpy as jnp

    from bench import jaxsd_unet as J
    from jaxsd.host_memory import release_freed_host_memory

    batch = kit.to_batch({k: jnp.asarray(v) for k, v in np_batch.items()})
    # compiled from the state's shapes (and shardings) before any weight is loaded, as `jaxsd train` does
    # (jaxsd.train.loop._FirstBatch): the compiler's transient memory is handed back before the weights arrive
    compiled, lower_s, compile_s = J.timed_compile(kit.step, *kit.abstract_state(), batch,
                                                   donate_argnums=kit.donate, compiler_options=kit.compiler_options)
    mem = J.memory_figures(compiled)
    flops = J.flops_of(compiled)
    if kit.kind == "train":  # as the trainer does after compiling (jaxsd.train.compile.compile_train_step)
        release_freed_host_memory()
    # where the peak comes from: the high-water marks once compiled, once loaded, vs. the child's final peak
    peak_after_compile, rss_after_compile = _rss_gb("VmHWM"), _rss_gb()
    state = kit.start()
    jax.block_until_ready(state)
    peak_after_load, rss_after_load = _rss_gb("VmHWM"), _rss_gb()
    if kit.kind == "train":  # as the trainer does once the state exists (jaxsd.train.loop._train)
        release_freed_host_memory()
    rss_after_load_trim = _rss_gb()
    info = _param_info(kit, state)
    n = len(state)
    first_loss, first_metrics, times = None, None, []
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
            if isinstance(aux, dict):
                first_metrics = {k: float(v) for k, v in aux.items() if jnp.ndim(v) == 0}
    extra = {} if first_metrics is None else {"first_metrics": first_metrics}
    return {"step_s": times, "compile_s": lower_s + compile_s, "lower_s": lower_s,
            "info": {"backend": jax.default_backend(), "devices": jax.device_count(), "first_loss": first_loss,
                     **extra,
                     "flops": flops, "baseline_rss_gb": baseline, "peak_rss_after_load_gb": peak_after_load,
                     "peak_rss_after_compile_gb": peak_after_compile,
                     "rss_after_compile_gb": rss_after_compile, "rss_after_load_gb": rss_after_load,
                     "rss_after_load_trimmed_gb": rss_after_load_trim,
                     "xla_temp_gb": mem["temp_gb"], "xla_memory": mem, **info}}


def child_memory(config: dict) -> dict:
    """jaxsd's step compiled from ShapeDtypeStructs (no weights exist): XLA's memory analysis."""
    import jax

    from bench import jaxsd_unet as J

    with _jaxsd_kit(config) as kit:
        state = kit.abstract_state()
        batch = kit.to_batch(J.abstract_batch(config["unet"], config["batch"], config["latent"]))
        compiled, lower_s, compile_s = J.timed_compile(kit.step, *state, batch, donate_argnums=kit.donate,
                                                       compiler_options=kit.compiler_options)
    return {**J.memory_figures(compiled), "compile_s": lower_s + compile_s, "lower_s": lower_s,
            "info": {"backend": jax.default_backend(), **_param_info(kit, state)}}


def child_torch(config: dict) -> dict:
    import torch

    from bench import torch_unet as T

    baseline = _rss_gb()
    cfg = config["unet"]
    model = T.load_unet(config.get("folder"), cfg)
    if config.get("lora"):
        T.add_lora(model, config["lora"])
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = T.make_optimizer(config["optimizer"], trained)
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
                     "num_params": sum(p.numel() for p in model.parameters()),
                     "num_trainable": sum(p.numel() for p in trained)}}

