"""sample: text-to-image generation — 20-step DPM++ 2M with classifier-free guidance.

jaxsd's `StableDiffusion.generate` (one jitted program: text encoding outside,
the whole denoising loop and VAE decode inside) vs diffusers' pipeline with
`DPMSolverMultistepScheduler` (dpmsolver++, order 2), same folder, same prompt,
same initial latents. jaxsd compiles first, from the UNet's and VAE's shapes, then reads
their weights (as `jaxsd sample`); its compile time is reported apart, the timed calls reuse the
program, and `info.rss_gb` records the RSS after each phase. A call's time is the wall time of
the whole `generate` / `pipe(...)` call (prompt encoding, sampling, decode).

  --preset tiny|small   a random pipeline built on the spot (tiny: 2-level UNet at
                        32 px; small: the `small` UNet at 256 px)
  --model DIR           any SD1/SD2/SDXL diffusers pipeline folder (a real model)
  --latent N [N ...]    latent side(s) instead of --resolution: one record each
  --tome RATIO          also time both sides with token merging (jaxsd's `token_merging`,
                        diffusers patched by `tomesd.apply_patch`), same ratio, tomesd's other
                        defaults but `use_rand=False` on both sides (the same merges, so the
                        images stay comparable): figures `jaxsd_tome`, `torch_tome`, and the
                        speed-ups in the record's `tome` entry
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import numpy as np

from bench.harness import comparison_table, make_record, repeat_children, run_child, table
from bench.presets import unet_preset

PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry"
# The diffusers scheduler jaxsd's "dpmpp_2m" sampler reproduces.
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
            "use_karras_sigmas": False}
_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False}
PRESETS = {
    "tiny": {"unet": "tiny", "vae": [16, 32, 32], "clip_width": 32, "resolution": 32},
    "small": {"unet": "small", "vae": [32, 64, 128, 128], "clip_width": 192, "resolution": 256},
}
LABELS = ("model", "resolution", "steps", "batch", "dtype")
TOME_LABELS = ("model", "resolution", "steps", "tome")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="random pipeline (default tiny)")
    p.add_argument("--model", default=None, metavar="DIR", help="a diffusers pipeline folder instead of a preset")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default per preset/model)")
    p.add_argument("--latent", type=int, nargs="+", default=None, metavar="N",
                   help="latent side(s) instead of --resolution (resolution = N × the VAE's factor); one record each")
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="also measure token merging at this ratio: jaxsd with and without it, diffusers with and "
                        "without tomesd (default 0: not measured)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (torch side: the pipeline in torch_dtype)")


@contextlib.contextmanager
def _folder(args: argparse.Namespace):
    if args.model:
        if not os.path.isfile(os.path.join(args.model, "model_index.json")):
            from jaxsd.errors import InputError

            raise InputError(f"--model {args.model}: no model_index.json — not a diffusers pipeline folder")
        yield args.model
        return
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-pipe-") as tmp:
        run_child("sample", "prepare", {**PRESETS[args.preset], "folder": tmp}, timeout=args.timeout)
        yield tmp


def _check(args: argparse.Namespace) -> None:
    from jaxsd.errors import InputError

    if args.latent and args.resolution:
        raise InputError("give --latent or --resolution, not both")
    if args.latent and min(args.latent) < 1:
        raise InputError(f"--latent {args.latent}: latent sides must be >= 1")
    if not 0.0 <= args.tome <= 0.75:
        raise InputError(f"--tome {args.tome} must be in [0, 0.75] (tomesd's limit with 2x2 cells)")


def run(args: argparse.Namespace) -> list[dict]:
    _check(args)
    records = []
    with _folder(args) as folder:
        if args.latent:
            factor = _size(folder, {"resolution": 1})[2]
            resolutions = [n * factor for n in args.latent]
        else:
            resolutions = [args.resolution or (PRESETS[args.preset]["resolution"] if not args.model else None)]
        for resolution in resolutions:
            config = {"model": args.model or args.preset, "resolution": resolution, "steps": args.steps,
                      "guidance": args.guidance, "batch": args.batch, "dtype": args.dtype, "sampler": "dpmpp_2m",
                      "warmup": args.warmup, "repeats": args.repeats, "processes": args.processes}
            if args.tome:
                config["tome"] = args.tome
            results = {}
            for fw in args.frameworks:
                for tome in (0.0, args.tome) if args.tome else (0.0,):
                    child_cfg = {**config, "folder": folder, "tome": tome}
                    results[fw + ("_tome" if tome else "")] = repeat_children("sample", fw, child_cfg,
                                                                               args.processes, timeout=args.timeout)
            record = make_record("sample", config, results, note=args.note)
            if args.tome:
                record["tome"] = tome_figures(results)
            records.append(record)
    return records


def tome_figures(results: dict) -> dict:
    """Speed-ups from token merging (time without / time with, medians) on each side, and jaxsd's
    time relative to diffusers' with and without it (jaxsd / torch)."""
    def div(a, b):
        return a / b if a is not None and b else None

    med = lambda name: _median_step(results, name)
    return {"speedup_jaxsd": div(med("jaxsd"), med("jaxsd_tome")), "speedup_torch": div(med("torch"), med("torch_tome")),
            "jaxsd_vs_torch": div(med("jaxsd"), med("torch")),
            "jaxsd_vs_torch_tome": div(med("jaxsd_tome"), med("torch_tome"))}


def _median_step(results: dict, name: str) -> float | None:
    return (results.get(name) or {}).get("step_s", {}).get("median")


def format_table(records: list[dict]) -> str:
    plain = comparison_table(records, LABELS)
    with_tome = [r for r in records if "tome" in r]
    if not with_tome:
        return plain
    fmt = lambda x, unit="": "—" if x is None else f"{x:.3g}{unit}"
    rows = []
    for r in with_tome:
        t = r["tome"]
        m = lambda name, rec=r: _median_step(rec, name)
        rows.append([*(str(r["config"].get(k, "")) for k in TOME_LABELS), fmt(m("jaxsd")), fmt(m("jaxsd_tome")),
                     fmt(t["speedup_jaxsd"], "×"), fmt(m("torch")), fmt(m("torch_tome")), fmt(t["speedup_torch"], "×"),
                     fmt(t["jaxsd_vs_torch"], "×"), fmt(t["jaxsd_vs_torch_tome"], "×")])
    headers = [*TOME_LABELS, "jaxsd s", "jaxsd+ToMe s", "ToMe speed-up", "torch s", "torch+tomesd s",
               "tomesd speed-up", "jaxsd/torch", "jaxsd/torch with ToMe"]
    return plain + "\n\n" + table(headers, rows)


# ----------------------------------------------------------------------------- children

def _latents(config: dict, channels: int, size: int) -> np.ndarray:
    """The initial noise, NCHW as diffusers takes it; jaxsd's generate takes the same array."""
    return np.random.default_rng(3).standard_normal((config["batch"], channels, size, size), dtype=np.float32)


def _write_tokenizer(folder: str) -> None:
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token (enough for timing)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):  # GPT-2's reversible byte → character map
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    chars = [table[b] for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump({t: i for i, t in enumerate(tokens)}, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as fh:
        json.dump(special, fh)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, fh)


def child_prepare(config: dict) -> dict:
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    unet_cfg = unet_preset(config["unet"])
    width = config["clip_width"]
    if unet_cfg["cross_attention_dim"] != width:
        raise ValueError(f"preset mismatch: UNet context {unet_cfg['cross_attention_dim']} != CLIP width {width}")
    tok_dir = os.path.join(config["folder"], "_tokenizer")
    _write_tokenizer(tok_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    blocks = config["vae"]
    vae = diffusers.AutoencoderKL(block_out_channels=blocks, down_block_types=["DownEncoderBlock2D"] * len(blocks),
                                  up_block_types=["UpDecoderBlock2D"] * len(blocks), layers_per_block=1,
                                  norm_num_groups=8, latent_channels=4, sample_size=config["resolution"])
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=diffusers.UNet2DConditionModel(**unet_cfg),
        scheduler=diffusers.PNDMScheduler(**_SCHEDULER, skip_prk_steps=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(config["folder"])
    return {}


def _size(folder: str, config: dict) -> tuple[int, int, int]:
    """(resolution, latent channels, VAE downscale) from the folder's configs."""
    with open(os.path.join(folder, "vae", "config.json")) as fh:
        vae = json.load(fh)
    with open(os.path.join(folder, "unet", "config.json")) as fh:
        unet = json.load(fh)
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return config["resolution"] or unet["sample_size"] * factor, unet["in_channels"], factor


def child_jaxsd(config: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.suites.train_step import _rss_gb
    from jaxsd.models.token_merging import TokenMerging
    from jaxsd.pipelines.pipeline import StableDiffusion

    res, channels, factor = _size(config["folder"], config)
    tm = TokenMerging(ratio=config.get("tome", 0.0), use_rand=False)
    # as `jaxsd sample`: the program compiles from the weights' shapes, before they are read
    pipe = StableDiffusion.from_folder(config["folder"], dtype=jnp.dtype(config["dtype"]), token_merging=tm,
                                       weights=False)
    latents = _latents(config, channels, res // factor)
    rss = {"text_loaded": _rss_gb()}

    def generate(**kw):
        return pipe.generate([PROMPT] * config["batch"], negative_prompt=[NEGATIVE] * config["batch"],
                             steps=config["steps"], guidance=config["guidance"], sampler="dpmpp_2m",
                             height=res, width=res, latents=latents, **kw)

    generate(compile_only=True)
    compile_s = pipe.last_compile_seconds
    rss.update(compiled=_rss_gb(), peak_after_compile=_rss_gb("VmHWM"))
    pipe.load_weights()
    rss["weights_loaded"] = _rss_gb()
    first = generate()
    rss.update(generated=_rss_gb(), peak_after_generate=_rss_gb("VmHWM"))
    times = []
    for i in range(config["warmup"] + config["repeats"]):
        t0 = time.perf_counter()
        generate()
        if i >= config["warmup"]:
            times.append(time.perf_counter() - t0)
    return {"step_s": times, "compile_s": compile_s,
            "info": {"image_mean": float(np.mean(first)), "backend": jax.default_backend(), "resolution": res,
                     "rss_gb": rss}}


def child_torch(config: dict) -> dict:
    import diffusers
    import torch

    res, channels, factor = _size(config["folder"], config)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config["dtype"]]
    pipe = diffusers.DiffusionPipeline.from_pretrained(config["folder"], torch_dtype=dtype)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **DPMPP_2M)
    pipe.set_progress_bar_config(disable=True)
    if config.get("tome"):
        import tomesd

        tomesd.apply_patch(pipe, ratio=config["tome"], use_rand=False)
    latents = torch.from_numpy(_latents(config, channels, res // factor)).to(dtype)

    def generate():
        return pipe([PROMPT] * config["batch"], negative_prompt=[NEGATIVE] * config["batch"],
                    num_inference_steps=config["steps"], guidance_scale=config["guidance"], height=res, width=res,
                    latents=latents, output_type="np").images

    first = None
    times = []
    for i in range(1 + config["warmup"] + config["repeats"]):  # the first call mirrors jaxsd's compiling one
        t0 = time.perf_counter()
        images = generate()
        if first is None:
            first = images
        elif i > config["warmup"]:
            times.append(time.perf_counter() - t0)
    return {"step_s": times,
            "info": {"image_mean": float(np.mean(np.round(first * 255))), "threads": torch.get_num_threads(),
                     "resolution": res}}
