"""eval: images/s of FID feature extraction and CLIP scoring — the compute of `jaxsd eval --model`'s metrics.

FID: InceptionV3 pool features of `batch` images [299 × 299] in [0, 1] (the network's own resize and
scaling included), jaxsd's jitted `FIDInceptionV3` vs pytorch-fid's `InceptionV3([3])` under
`torch.no_grad()`. CLIP score: image and text embeddings of `batch` (preprocessed image, prompt) pairs and
their clamped cosine, jaxsd's jitted CLIP towers vs transformers' `CLIPModel.get_image_features` /
`get_text_features`. Both sides load the same random weights (written once by a `prepare` child:
pytorch-fid's layout as safetensors, a CLIPModel folder); image decoding, resizing on the host and
tokenisation are not part of it.

Presets: `tiny` (a 2-layer CLIP at 32 px: a smoke run) and `small` (CLIP ViT-B/32's shapes: 224 px, 12 + 12
layers, and a batch of 8). InceptionV3 is the FID network in both: its shape is fixed by FID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np

from bench.harness import make_record, repeat_children, run_child, table, timed_throughput

_CLIP_B32 = {"text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                             "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                             "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
             "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                               "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
             "projection_dim": 512}
PRESETS = {
    "tiny": {"clip": {"text_config": {**_CLIP_B32["text_config"], "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 4},
                      "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                      "projection_dim": 24},
             "batch": 2},
    "small": {"clip": _CLIP_B32, "batch": 8},
}
FIGURES = ("fid", "clip")
LABELS = ("preset", "batch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="CLIP size and batch (default tiny)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default per preset)")


@contextlib.contextmanager
def _weights(args: argparse.Namespace, preset: dict):
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-eval-") as tmp:
        run_child("eval", "prepare", {**preset, "folder": tmp}, timeout=args.timeout)
        yield tmp


def run(args: argparse.Namespace) -> list[dict]:
    from jaxsd.errors import InputError

    preset = PRESETS[args.preset]
    batch = args.batch or preset["batch"]
    if batch < 1:
        raise InputError(f"--batch {batch}: must be ≥ 1")
    config = {"preset": args.preset, "batch": batch, "image_size": preset["clip"]["vision_config"]["image_size"],
              "warmup": args.warmup, "repeats": args.repeats, "processes": args.processes}
    with _weights(args, preset) as folder:
        child_cfg = {**config, "folder": folder}
        results = {fw: repeat_children("eval", fw, child_cfg, args.processes, timeout=args.timeout)
                   for fw in args.frameworks}
    return [make_record("eval", config, results, note=args.note)]


def format_table(records: list[dict]) -> str:
    def med(r, fw, key):
        value = (r.get(fw) or {}).get(key)
        return value["median"] if isinstance(value, dict) else None

    rows = []
    for r in records:
        for what in FIGURES:
            j, t = med(r, "jaxsd", f"{what}_images_per_s"), med(r, "torch", f"{what}_images_per_s")
            cells = [f"{v:.3g}" if v is not None else "—" for v in (j, t)]
            speed = f"{j / t:.3g}×" if j and t else "—"
            compile_s = med(r, "jaxsd", f"{what}_compile_s")
            rows.append([*(str(r["config"][k]) for k in LABELS), what, *cells, speed,
                         f"{compile_s:.1f}" if compile_s is not None else "—"])
    return table([*LABELS, "metric", "jaxsd img/s", "torch img/s", "jaxsd/torch speed", "jaxsd compile s"], rows)


def _inputs(config: dict, image_size: int) -> dict:
    """FID images [B, 299, 299, 3] in [0, 1]; CLIP pixels [B, S, S, 3] (normalised) and token ids + mask [B, 77]."""
    rng = np.random.default_rng(3)
    b = config["batch"]
    ids = np.full((b, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[:, 1:16] = rng.integers(0, 400, (b, 15))  # a 15-word prompt (ids < the tiny preset's vocab too)
    mask = np.zeros((b, 77), np.int32)
    mask[:, :17] = 1
    return {"fid": rng.random((b, 299, 299, 3), dtype=np.float32),
            "pixels": rng.normal(size=(b, image_size, image_size, 3)).astype(np.float32), "ids": ids, "mask": mask}


def child_prepare(config: dict) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file

    from bench.fid_reference import random_fid_state

    save_file({k: v.contiguous() for k, v in random_fid_state(seed=0).items()},
              os.path.join(config["folder"], "fid.safetensors"))
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(**config["clip"]))
    clip.save_pretrained(os.path.join(config["folder"], "clip"), safe_serialization=True)
    return {}


def child_jaxsd(config: dict) -> dict:
    import jax

    from jaxsd.convert.clip_model import load_clip_model
    from jaxsd.metrics.clip_score import clip_score_of_embeds
    from jaxsd.metrics.fid_weights import load_fid_weights
    from jaxsd.metrics.inception import FIDInceptionV3
    from jaxsd.models.clip import CLIPTextModel
    from jaxsd.models.clip_vision import CLIPVisionModelWithProjection

    fid_params = load_fid_weights(os.path.join(config["folder"], "fid.safetensors"))
    clip = load_clip_model(os.path.join(config["folder"], "clip"))
    vision, text = CLIPVisionModelWithProjection(clip.vision_config), CLIPTextModel(clip.text_config)
    x = _inputs(config, clip.vision_config.image_size)

    def embeds(vp, tp, pixels, ids, mask):
        return vision.apply({"params": vp}, pixels), text.apply({"params": tp}, ids, mask).text_embeds

    def cosine(a, b):  # the unclamped 100 · cos, to cross-check (random weights give many clamped zeros)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.mean(100 * np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))

    t0 = time.perf_counter()
    fid = jax.jit(lambda p, images: FIDInceptionV3().apply({"params": p}, images)).lower(fid_params, x["fid"]).compile()
    fid_compile = time.perf_counter() - t0
    clip_args = (clip.vision_params, clip.text_params, x["pixels"], x["ids"], x["mask"])
    t0 = time.perf_counter()
    clip_fn = jax.jit(embeds).lower(*clip_args).compile()
    clip_compile = time.perf_counter() - t0
    fid_times, fid_ips = timed_throughput(lambda: np.asarray(fid(fid_params, x["fid"])), config)
    clip_times, clip_ips = timed_throughput(lambda: clip_score_of_embeds(*clip_fn(*clip_args)), config)
    return {"fid_step_s": fid_times, "fid_images_per_s": fid_ips, "fid_compile_s": fid_compile,
            "clip_step_s": clip_times, "clip_images_per_s": clip_ips, "clip_compile_s": clip_compile,
            "info": {"fid_features_avg": float(np.asarray(fid(fid_params, x["fid"])).mean()),
                     "clip_cos_avg": cosine(*clip_fn(*clip_args)),
                     "backend": jax.default_backend()}}


def child_torch(config: dict) -> dict:
    import importlib

    import torch
    import transformers
    from safetensors.torch import load_file

    from bench.reference_packages import reference_packages

    state = load_file(os.path.join(config["folder"], "fid.safetensors"))
    with reference_packages():  # pytorch-fid imports torchvision's InceptionV3 definition
        inc = importlib.import_module("pytorch_fid.inception")
        inc.load_state_dict_from_url = lambda url, progress=True: state  # its weights download → our random ones
        fid = inc.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    clip = transformers.CLIPModel.from_pretrained(os.path.join(config["folder"], "clip")).eval()
    x = _inputs(config, clip.config.vision_config.image_size)
    images = torch.from_numpy(np.ascontiguousarray(x["fid"].transpose(0, 3, 1, 2)))
    pixels = torch.from_numpy(np.ascontiguousarray(x["pixels"].transpose(0, 3, 1, 2)))
    ids, mask = torch.from_numpy(x["ids"].astype(np.int64)), torch.from_numpy(x["mask"].astype(np.int64))

    def features(out):  # transformers 5 returns an output object, 4 the tensor
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def cosine():  # 100 · cos of each pair (the CLIP score before its clamp at 0)
        a = features(clip.get_image_features(pixel_values=pixels))
        b = features(clip.get_text_features(input_ids=ids, attention_mask=mask))
        return 100 * torch.nn.functional.cosine_similarity(a, b)

    def score():
        return cosine().clamp(min=0)

    with torch.no_grad():
        fid_times, fid_ips = timed_throughput(lambda: fid(images)[0], config)
        fid_avg = float(fid(images)[0].mean())
    clip_times, clip_ips = timed_throughput(score, config)
    return {"fid_step_s": fid_times, "fid_images_per_s": fid_ips, "clip_step_s": clip_times,
            "clip_images_per_s": clip_ips,
            "info": {"fid_features_avg": fid_avg, "clip_cos_avg": float(cosine().double().mean()),
                     "threads": torch.get_num_threads()}}
