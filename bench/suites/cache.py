"""cache: VAE encode + text encode throughput (images/s) — the compute of `jaxsd cache`.

One batch = encode `batch` images with the VAE (posterior mean and log-variance)
and their captions with the CLIP text encoder (last hidden states), jaxsd's
jitted Flax models vs diffusers' `AutoencoderKL` + transformers' `CLIPTextModel`
under `torch.no_grad()`, same random weights (written once by a `prepare` child),
same pixels and token ids. File I/O and tokenisation are not part of it: this is
the device-side cost that caching a data set multiplies.

Presets: `tiny` (a small VAE and 2-layer CLIP; CPU-friendly) and `sd15` (the SD1.x
VAE and CLIP ViT-L/14 text encoder; use with `--resolution 512` on a real machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np

from bench.harness import (
    comparison_table,
    make_record,
    repeat_children,
    run_child,
    timed_throughput,
)

_SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
           "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "act_fn": "silu",
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "sample_size": 512, "scaling_factor": 0.18215}
_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
           "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
PRESETS = {
    "tiny": {"vae": {**_SD_VAE, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                     "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                     "sample_size": 64},
             "clip": {**_CLIP_L, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "projection_dim": 64},
             "resolution": 64},
    "sd15": {"vae": _SD_VAE, "clip": _CLIP_L, "resolution": 512},
}
LABELS = ("preset", "resolution", "batch", "dtype")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="VAE + text encoder (default tiny)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default per preset)")
    p.add_argument("--batch", type=int, default=4, help="images (and captions) per encode call (default 4)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (the SD VAE upcasts to fp32 on both sides, as diffusers does)")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="keep the shared random weights here between runs (default: a temp dir)")


@contextlib.contextmanager
def _weights(args: argparse.Namespace, preset: dict):
    if args.weights_dir:
        folder = os.path.join(args.weights_dir, f"cache-{args.preset}")
        if not os.path.exists(os.path.join(folder, "vae", "config.json")):
            run_child("cache", "prepare", {**preset, "folder": folder}, timeout=args.timeout)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-cache-") as tmp:
        run_child("cache", "prepare", {**preset, "folder": tmp}, timeout=args.timeout)
        yield tmp


def run(args: argparse.Namespace) -> list[dict]:
    preset = PRESETS[args.preset]
    config = {"preset": args.preset, "resolution": args.resolution or preset["resolution"], "batch": args.batch,
              "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats, "processes": args.processes}
    with _weights(args, preset) as folder:
        child_cfg = {**config, "folder": folder}
        results = {fw: repeat_children("cache", fw, child_cfg, args.processes, timeout=args.timeout)
                   for fw in args.frameworks}
    return [make_record("cache", config, results, note=args.note)]


def format_table(records: list[dict]) -> str:
    lines = [comparison_table(records, LABELS)]
    for r in records:
        ips = {fw: r[fw]["images_per_s"]["median"] for fw in ("jaxsd", "torch") if fw in r}
        lines.append("images/s (median): " + ", ".join(f"{fw} {v:.3g}" for fw, v in ips.items()))
    return "\n".join(lines)


def _inputs(config: dict) -> tuple[np.ndarray, np.ndarray]:
    """pixels [B,H,W,3] in [-1,1] and CLIP token ids [B,77] (BOS, random words, EOS, EOS padding)."""
    rng = np.random.default_rng(2)
    b, r = config["batch"], config["resolution"]
    pixels = rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32)
    ids = np.full((b, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[:, 1:20] = rng.integers(0, 49406, (b, 19))
    return pixels, ids


def child_prepare(config: dict) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    AutoencoderKL(**config["vae"]).save_pretrained(os.path.join(config["folder"], "vae"), safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(**config["clip"])).save_pretrained(os.path.join(config["folder"], "text_encoder"),
                                                                   safe_serialization=True)
    return {}


def child_jaxsd(config: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.jaxsd_unet import DTYPES
    from jaxsd.convert.text_encoders import load_clip
    from jaxsd.convert.vae import load_vae
    from jaxsd.models.clip import CLIPTextModel
    from jaxsd.models.vae import AutoencoderKL

    dtype = DTYPES[config["dtype"]]
    vae_cfg, vae_params = load_vae(os.path.join(config["folder"], "vae"))
    clip_cfg, clip_params = load_clip(os.path.join(config["folder"], "text_encoder"))
    vae, clip = AutoencoderKL(vae_cfg, dtype=dtype), CLIPTextModel(clip_cfg, dtype=dtype)

    def encode(vp, cp, pixels, ids):
        posterior = vae.apply({"params": vp}, pixels, method="encode")
        hidden = clip.apply({"params": cp}, ids).last_hidden_state
        return posterior.mean, posterior.logvar, hidden

    pixels, ids = (jnp.asarray(a) for a in _inputs(config))
    t0 = time.perf_counter()
    compiled = jax.jit(encode).lower(vae_params, clip_params, pixels, ids).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(vae_params, clip_params, pixels, ids)
    times, ips = timed_throughput(lambda: jax.block_until_ready(compiled(vae_params, clip_params, pixels, ids)), config)
    return {"step_s": times, "images_per_s": ips, "compile_s": compile_s,
            "info": {"latent_mean_avg": float(jnp.mean(out[0])), "hidden_avg": float(jnp.mean(out[2])),
                     "backend": jax.default_backend()}}


def child_torch(config: dict) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(os.path.join(config["folder"], "vae")).eval()
    clip = CLIPTextModel.from_pretrained(os.path.join(config["folder"], "text_encoder")).eval()
    pixels, ids = _inputs(config)
    pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(ids.astype(np.int64))
    # diffusers' SD VAE upcasts to fp32 (force_upcast); only the text encoder runs in bf16
    autocast = config["dtype"] == "bfloat16"

    @torch.no_grad()
    def encode():
        dist = vae.encode(pixels).latent_dist
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = clip(ids).last_hidden_state
        return dist.mean, dist.logvar, hidden

    out = encode()
    times, ips = timed_throughput(encode, config)
    return {"step_s": times, "images_per_s": ips,
            "info": {"latent_mean_avg": float(out[0].mean()), "hidden_avg": float(out[2].float().mean()),
                     "threads": torch.get_num_threads()}}
