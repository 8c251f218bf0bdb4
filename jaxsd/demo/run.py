"""`jaxsd demo`'s phases, run in order through the same code paths users run.

OUT/
  data/train/      generated images + captions (+ the cache's sidecars and manifest)
  data/heldout/    real images never trained on: classifier check and VAE PSNR
  components/      tokenizer/, text_encoder/ (random, frozen), vae/ (phase 1's export), scheduler/,
                   model_index.json: the pipeline minus its unet
  vae.yaml         phase 1's `jaxsd train` config (model.kind: vae)
  vae_run/         its run dir
  demo.yaml        the jaxsd config `jaxsd cache` and `jaxsd train` read (the UNet)
  run/             `jaxsd train`'s run dir (checkpoints, metrics.jsonl, train.log)
  pipeline/        `jaxsd export --pipeline components`: the trained unet/ + components' files (hard links)
  samples/         grid.png (labelled) and one PNG per sample
  metrics.json     colour_accuracy, shape_accuracy, vae_psnr, seconds_total
  metrics_detail.json  per-phase seconds, classifier accuracy on real images, diffusers check
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxsd.demo import classifier, shapes
from jaxsd.demo.report import psnr, to_uint8, write_metrics
from jaxsd.demo.settings import DemoSettings
from jaxsd.demo.tokenizer import MAX_LENGTH, build_tokenizer, tiny_text_encoder_config
from jaxsd.errors import InputError
from jaxsd.pipelines.grids import label_grid


@dataclass
class DemoState:
    out: Path
    settings: DemoSettings
    log: Callable[[str], None]
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    # ---- layout ---------------------------------------------------------------
    @property
    def train_dir(self) -> Path:
        return self.out / "data" / "train"

    @property
    def heldout_dir(self) -> Path:
        return self.out / "data" / "heldout"

    @property
    def components(self) -> Path:
        return self.out / "components"

    @property
    def vae_config_path(self) -> Path:
        return self.out / "vae.yaml"

    @property
    def vae_run_dir(self) -> Path:
        return self.out / "vae_run"

    @property
    def config_path(self) -> Path:
        return self.out / "demo.yaml"

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def pipeline_dir(self) -> Path:
        return self.out / "pipeline"

    @property
    def samples_dir(self) -> Path:
        return self.out / "samples"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.log(f"== {name}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.log(f"   {name}: {self.seconds[name]:.1f}s")


def run_cli(argv: list[str]) -> None:
    """Run a `jaxsd` subcommand in this process (same code path as the shell; jax imported once)."""
    from jaxsd.cli import parse_args, run_command

    try:
        code = run_command(parse_args(argv))
    except InputError as e:  # the demo wrote these inputs itself: one jaxsd refuses is a bug in the demo
        raise RuntimeError(f"`jaxsd {' '.join(argv)}` refused the demo's own input: {e}") from e
    if code != 0:
        raise RuntimeError(f"`jaxsd {' '.join(argv)}` failed with exit code {code}")


# ---- phase 0: data ------------------------------------------------------------------------
def make_data(st: DemoState) -> None:
    s = st.settings
    shapes.write_dataset(st.train_dir, s.train_images, seed=s.seed, resolution=s.resolution)
    shapes.write_dataset(st.heldout_dir, s.heldout_images, seed=s.seed + 1_000_003, resolution=s.resolution)
    images, labels = shapes.read_labelled_folder(st.heldout_dir)
    acc = classifier.accuracy(images, labels)
    st.details["classifier_on_real_heldout"] = acc
    st.log(f"   {s.train_images} training + {s.heldout_images} held-out images of "
           f"{len(shapes.all_prompts())} prompts at {s.resolution} px in {st.out / 'data'}")
    st.log(f"   classifier on real held-out images: colour {acc['colour_accuracy']:.1%}, "
           f"shape {acc['shape_accuracy']:.1%}")


# ---- text side: tokenizer + tiny random frozen CLIP text encoder --------------------------
def make_text_encoder(st: DemoState) -> None:
    import jax

    from jaxsd.convert.text_encoders import save_clip
    from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel, example_inputs
    from jaxsd.models.params import init_params
    from jaxsd.train.compile import run_once

    vocab = build_tokenizer(st.components / "tokenizer", [e.caption for e in shapes.all_prompts()])
    config = CLIPTextConfig.from_transformers(tiny_text_encoder_config(vocab))
    model = CLIPTextModel(config)
    params = run_once(lambda k: init_params(model, k, *example_inputs(config)), jax.random.key(st.settings.seed + 7))
    save_clip(st.components / "text_encoder", config, params)
    st.log(f"   CLIP BPE tokenizer over the captions' words ({len(vocab)} tokens) and a tiny CLIP text "
           f"encoder ({config.num_hidden_layers} layers, width {config.hidden_size}): RANDOM and FROZEN — "
           "the UNet learns to read its outputs")


# ---- phase 1: the autoencoder, through `jaxsd train` / `jaxsd export` --------------------
def train_autoencoder(st: DemoState) -> None:
    from omegaconf import OmegaConf

    from jaxsd.demo.autoencoder import (
        evaluate,
        latent_scaling_factor,
        set_scaling_factor,
        vae_train_config,
    )

    s, folder = st.settings, st.components / "vae"
    st.vae_config_path.write_text(OmegaConf.to_yaml(OmegaConf.create(vae_train_config(s, st.train_dir,
                                                                                      st.vae_run_dir))))
    train_to_the_end(st.vae_config_path, st.vae_run_dir, s.vae.steps)
    run_cli(["export", str(st.vae_run_dir), "--out", str(folder)])
    train_images, _ = shapes.read_labelled_folder(st.train_dir)
    held, held_labels = shapes.read_labelled_folder(st.heldout_dir)
    # One call (one compile): latents of the training images, reconstructions of the held-out ones.
    means, recon = evaluate(folder, np.concatenate([train_images, held]))
    means, recon = means[:len(train_images)], recon[len(train_images):]
    scale = latent_scaling_factor(means)
    set_scaling_factor(folder, scale)
    st.details["vae_psnr"] = psnr(to_uint8(recon), held)
    st.details["vae_scaling_factor"] = scale
    # the autoencoder must not be what limits prompt adherence: the classifier on its reconstructions
    st.details["classifier_on_vae_reconstructions"] = classifier.accuracy(to_uint8(recon), held_labels)
    acc = st.details["classifier_on_vae_reconstructions"]
    st.log(f"   held-out reconstruction PSNR {st.details['vae_psnr']:.2f} dB (classifier on the reconstructions: "
           f"colour {acc['colour_accuracy']:.1%}, shape {acc['shape_accuracy']:.1%}); latent scaling factor "
           f"{scale:.4f}")


# ---- the shared jaxsd config of `jaxsd cache` and `jaxsd train` ---------------------------
def unet_config(s: DemoSettings) -> dict:
    """diffusers UNet2DConditionModel config of the demo's from-scratch UNet (8x8x4 latents)."""
    if len(s.unet_cross_attention) != len(s.unet_block_out_channels):
        raise ValueError(f"DemoSettings: unet_cross_attention {s.unet_cross_attention} needs one entry per UNet "
                         f"level of unet_block_out_channels {s.unet_block_out_channels}")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s.unet_cross_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(s.unet_cross_attention)]
    return {"sample_size": s.resolution // 2 ** (len(s.vae_block_out_channels) - 1),
            "in_channels": s.vae_latent_channels, "out_channels": s.vae_latent_channels,
            "block_out_channels": list(s.unet_block_out_channels),
            "down_block_types": down, "up_block_types": up,
            "layers_per_block": s.unet_layers_per_block, "attention_head_dim": s.unet_heads,
            "cross_attention_dim": 32, "norm_num_groups": 16}


def scheduler_config() -> dict:
    """The training noise schedule (SD's) as the DDIM scheduler config the exported pipeline samples with."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
            "rescale_betas_zero_snr": False}


def demo_config(st: DemoState) -> dict:
    """The YAML config (as a dict) both `jaxsd cache` (its data: section) and `jaxsd train` read."""
    s = st.settings
    sched = scheduler_config()
    return {
        "model": {"unet": unet_config(s), "dtype": "float32"},
        "diffusion": {k: sched[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                                             "prediction_type")},
        "loss": {"cond_dropout": s.cond_dropout, "min_snr_gamma": 5.0},
        "optimizer": {"name": "adamw", "learning_rate": s.unet_learning_rate, "warmup_steps": s.unet_warmup_steps,
                      "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.0},
        "train": {"run_dir": str(st.run_dir), "steps": s.unet_steps, "batch_size": s.unet_batch_size,
                  "seed": s.seed, "ema": {"enabled": True, "decay": s.ema_decay}},
        "checkpoint": {"every": s.unet_steps, "keep": 1, "async_save": False},
        "logging": {"every": max(1, s.unet_steps // 20), "tensorboard": False, "progress_bar": False},
        "data": {
            "roots": [str(st.train_dir)],
            "image": {"resolution": s.resolution},
            "cache": {"vae": str(st.components / "vae"), "text_encoder": str(st.components), "text": "clip",
                      "max_length": MAX_LENGTH, "dtype": "float32", "batch_size": 64},
            "loader": {"batch_size": s.unet_batch_size, "seed": s.seed, "threads": 1, "prefetch": 2},
        },
    }


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
    "image_encoder": [None, None], "requires_safety_checker": False,
}
"""components/ is this pipeline minus its unet: `jaxsd export --pipeline` places the trained one beside the rest."""


def write_components(st: DemoState) -> None:
    """scheduler/, model_index.json and demo.yaml (the tokenizer, text encoder and VAE are written by their phases)."""
    from omegaconf import OmegaConf

    (st.components / "scheduler").mkdir(parents=True, exist_ok=True)
    (st.components / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2))
    (st.components / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    st.config_path.write_text(OmegaConf.to_yaml(OmegaConf.create(demo_config(st))))


# ---- caching, training, export ------------------------------------------------------------
def cache(st: DemoState) -> None:
    run_cli(["cache", str(st.config_path), "--no-progress"])


def train_unet(st: DemoState) -> None:
    train_to_the_end(st.config_path, st.run_dir, st.settings.unet_steps)


def train_to_the_end(config: Path, run_dir: Path, steps: int) -> None:
    """`jaxsd train CONFIG`, then stop the demo unless it reached `steps`: on SIGTERM/SIGINT the trainer
    saves and exits 0 (a preempted run resumes from there), and the demo must not go on to export and
    judge a half-trained model."""
    run_cli(["train", str(config)])
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    if max(saved, default=0) < steps:
        raise SystemExit(f"jaxsd demo: training in {run_dir} stopped at step {max(saved, default=0)} of {steps} "
                         "(interrupted); nothing after it ran")


def export(st: DemoState) -> None:
    """The trained UNet (EMA params) and the other components as one diffusers folder, via `jaxsd export`."""
    run_cli(["export", str(st.run_dir), "--out", str(st.pipeline_dir), "--ema", "--pipeline", str(st.components)])


# ---- sampling and evaluation --------------------------------------------------------------
def initial_noise(st: DemoState, n: int) -> np.ndarray:
    """The initial latents of every sample (NCHW float32, diffusers' `latents` layout), fixed by the seed."""
    s = st.settings
    side = s.resolution // 2 ** (len(s.vae_block_out_channels) - 1)
    rng = np.random.default_rng(s.seed + 99)
    return rng.standard_normal((n, s.vae_latent_channels, side, side)).astype(np.float32)


def sample(st: DemoState) -> None:
    from jaxsd.pipelines.pipeline import StableDiffusion

    s = st.settings
    prompts = [e.caption for e in shapes.all_prompts()]
    pipe = StableDiffusion.from_folder(st.pipeline_dir)
    noise = initial_noise(st, len(prompts) * s.samples_per_prompt)
    images = pipe.generate(prompts, num_images=s.samples_per_prompt, latents=noise, sampler="ddim",
                           steps=s.sample_steps, guidance=s.guidance_scale, seed=s.seed)
    st.samples_dir.mkdir(parents=True, exist_ok=True)
    np.save(st.samples_dir / "latents.npy", noise)
    np.save(st.samples_dir / "images.npy", images)
    from PIL import Image

    k = s.samples_per_prompt
    labels = [e for e in shapes.all_prompts() for _ in range(k)]
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(st.samples_dir / f"{i:03d}_{label.colour}_{label.shape}.png")
    preds = [classifier.classify(im) for im in images]
    hits = [(p.colour == l.colour, p.shape == l.shape) for p, l in zip(preds, labels)]
    st.details["samples"] = len(images)
    st.details["colour_accuracy"] = float(np.mean([c for c, _ in hits]))
    st.details["shape_accuracy"] = float(np.mean([sh for _, sh in hits]))
    rows = [(prompts[r], list(images[r * k:(r + 1) * k])) for r in range(len(prompts))]
    marks = [[c and sh for c, sh in hits[r * k:(r + 1) * k]] for r in range(len(prompts))]
    label_grid(rows, marks=marks).save(st.samples_dir / "grid.png")
    st.log(f"   {len(images)} samples ({k} per prompt, {s.sample_steps} DDIM steps, CFG {s.guidance_scale}) → "
           f"{st.samples_dir / 'grid.png'} (bar under each: green = classifier agrees with the prompt)")
    st.log(f"   prompt adherence: colour {st.details['colour_accuracy']:.1%}, "
           f"shape {st.details['shape_accuracy']:.1%}")


def diffusers_check(st: DemoState) -> None:
    """Load the export in diffusers' StableDiffusionPipeline, generate from the same latents, compare pixels."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        st.details["diffusers_max_pixel_diff"] = None
        st.log("   torch/diffusers not installed: skipped (to run it, install the [torch] extra: "
               "`.venv/bin/pip install -c constraints.txt -e '.[torch]'` in the checkout)")
        return
    import diffusers
    import torch
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    s = st.settings
    pipe = StableDiffusionPipeline.from_pretrained(st.pipeline_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [e.caption for e in shapes.all_prompts()]
    noise = np.load(st.samples_dir / "latents.npy")
    with torch.no_grad():
        out = pipe(prompts, num_images_per_prompt=s.samples_per_prompt, latents=torch.from_numpy(noise),
                   num_inference_steps=s.sample_steps, guidance_scale=s.guidance_scale, output_type="np").images
    theirs = np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
    ours = np.load(st.samples_dir / "images.npy")
    diff = int(np.max(np.abs(theirs.astype(np.int16) - ours.astype(np.int16))))
    st.details["diffusers_max_pixel_diff"] = diff
    st.log(f"   diffusers StableDiffusionPipeline on the exported folder, same latents: max pixel difference "
           f"{diff}/255")


PHASES: tuple[tuple[str, Callable[[DemoState], None]], ...] = (
    ("data", make_data),
    ("text_encoder", make_text_encoder),
    ("vae", train_autoencoder),
    ("cache", lambda st: (write_components(st), cache(st))),
    ("train", train_unet),
    ("export", export),
    ("sample", sample),
    ("diffusers_check", diffusers_check),
)


MARKER = ".jaxsd_demo"
OWNED = ("data", "components", "vae_run", "run", "pipeline", "samples", "vae.yaml", "demo.yaml", "metrics.json",
         "metrics_detail.json")


def prepare_out(out: Path) -> None:
    """Start from scratch: clear a previous demo's outputs (else `jaxsd train` would resume its
    checkpoint and stale images would join the dataset). A non-empty folder that a demo did not
    create is refused rather than touched."""
    import shutil

    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"--out {out} is not empty and was not written by `jaxsd demo`; "
                         "choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (out / MARKER).write_text("written by `jaxsd demo`; its outputs here are replaced by the next run\n")


def run_demo(out: str | Path, settings: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Run every phase; write OUT/metrics.json. Returns {"metrics", "details"}."""
    import jax

    from jaxsd.train.compile import split_cpu_into_devices, warm_cpu_heap

    out = Path(out)
    prepare_out(out)
    warm_cpu_heap()  # before JAX's CPU threads first allocate (jaxsd/train/compile.py)
    # before JAX's backend starts: the small steps' batches split over two CPU devices, one per core
    split_cpu_into_devices(min(2, len(os.sched_getaffinity(0))))
    st = DemoState(out, settings, log)
    start = time.perf_counter()
    for name, fn in PHASES:
        with st.phase(name):
            fn(st)
    total = time.perf_counter() - start
    st.details["cpu_devices"] = len(jax.devices("cpu"))
    st.details["seconds"] = {**st.seconds, "total": round(total, 2)}
    (out / "metrics_detail.json").write_text(json.dumps(st.details, indent=2, default=float) + "\n")
    metrics = write_metrics(out / "metrics.json", {
        "colour_accuracy": st.details["colour_accuracy"], "shape_accuracy": st.details["shape_accuracy"],
        "vae_psnr": st.details["vae_psnr"], "seconds_total": total}, extra=st.details)
    return {"metrics": metrics, "details": st.details}
