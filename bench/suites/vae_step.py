"""vae-step: one VAE training step (autoencoder + discriminator, LPIPS, KL, adaptive weight), jaxsd vs PyTorch.

jaxsd: `jaxsd train`'s step for `model.kind: vae`, built from its config as the trainer builds it
(`jaxsd.train.plan`), fine-tuning the VAE folder of `model.pretrained` with `loss.vae.lpips_weight: 1` and
`disc_start: 0` (the discriminator trains and the generator sees it from the first step: the step measured
is the one after disc_start), AdamW, clipping at 1, fp32. PyTorch: the same loss and updates from diffusers'
`AutoencoderKL`, the `lpips` package and taming's PatchGAN discriminator (bench/torch_vae.py), with LDM's
`torch.autograd.grad` for the adaptive weight.

A `prepare` child (jax only) writes the shared files: the VAE folder (a jaxsd init saved with
`jaxsd.convert.vae.save_vae`), a random LPIPS file (VGG16 + heads); with torch measured also the initial
discriminator of jaxsd's train state (`flax_to_torch`) and the posterior noise of jaxsd's first step. Both
frameworks then start from the same weights and batch, and their first steps' forward figures (L1, LPIPS, KL,
d_loss) must agree within 1e-4 before anything is recorded; the relative differences of those and of the
figures made from gradients (loss with its adaptive weight, gradient norms) are in the record's `agreement`.

Presets: `sd` (SD's VAE: 128, 256, 512, 512 channels, 256², a 3-layer 64-channel discriminator) and `tiny`
(one 8-channel block at 32², a 1-layer discriminator: a smoke run; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import BenchError, comparison_table, make_record, repeat_children, run_child

_SD_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
           "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256}
PRESETS = {
    "sd": {"vae": _SD_VAE, "resolution": 256, "disc_layers": 3, "disc_channels": 64},
    "tiny": {"vae": {**_SD_VAE, "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
                     "block_out_channels": [8], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32},
             "resolution": 32, "disc_layers": 1, "disc_channels": 8},
}
LABELS = ("preset", "resolution", "batch", "dtype", "optimizer")
# the first step's forward figures: functions of the same weights, batch and noise, which must agree within RTOL
# (fp32 whole models) before anything is recorded
AGREE = ("rec", "lpips", "kl", "d_loss")
# figures made from gradients (the adaptive weight is a ratio of last-layer gradient norms, and the loss holds it):
# their relative differences are recorded (`agreement`): 7e-7 at most on `tiny` (the smoke test asserts 1e-4 for
# these too), up to 4e-4 on `sd` (the adaptive weight; not traced yet — fp32 order of sums through SD's decoder,
# the discriminator's LeakyReLU kinks and L1's sign are the suspects)
GRADIENT_FIGURES = ("loss", "adaptive_weight", "grad_norm", "disc_grad_norm")
RTOL = 1e-4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="tiny (smoke run) or sd (SD's VAE at 256², batch 1; a few GB per framework); default tiny")
    p.add_argument("--batch", type=int, default=1, help="images per step (default 1)")


def run(args: argparse.Namespace) -> list[dict]:
    from jaxsd.errors import InputError

    if args.batch < 1:
        raise InputError(f"--batch {args.batch}: must be ≥ 1")
    preset = PRESETS[args.preset]
    config = {"preset": args.preset, "resolution": preset["resolution"], "batch": args.batch, "dtype": "float32",
              "optimizer": "adamw", "clip": 1.0, "lpips_weight": 1.0, "disc_start": 0,
              "warmup": args.warmup, "repeats": args.repeats, "processes": args.processes}
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-vae-") as folder:
        child_cfg = {**config, **preset, "folder": folder, "torch": "torch" in args.frameworks}
        run_child("vae_step", "prepare", child_cfg, timeout=args.timeout)
        results = {fw: repeat_children("vae_step", fw, child_cfg, args.processes, timeout=args.timeout)
                   for fw in args.frameworks}
    if "jaxsd" in results and "torch" in results:
        ours, theirs = results["jaxsd"]["info"]["first_metrics"], results["torch"]["info"]["first_metrics"]
        check_agreement(ours, theirs)
        results["agreement"] = {k: abs(ours[k] - theirs[k]) / abs(theirs[k]) for k in (*AGREE, *GRADIENT_FIGURES)}
    return [make_record("vae-step", config, results, note=args.note)]


def check_agreement(ours: dict, theirs: dict) -> None:
    """The same weights, batch and posterior noise: the first step's figures agree, or nothing is recorded."""
    off = {k: (ours[k], theirs[k]) for k in AGREE if abs(ours[k] - theirs[k]) > RTOL * abs(theirs[k])}
    if off:
        raise BenchError(f"vae-step: jaxsd's and torch's first steps disagree beyond {RTOL} (jaxsd, torch): {off}")


def normalize_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("warmup", "repeats")}


def format_table(records: list[dict]) -> str:
    return comparison_table(records, LABELS)


# ----------------------------------------------------------------------------- children

def _pixels(config: dict) -> np.ndarray:
    """The benchmark batch: [B, R, R, 3] uniform in [-1, 1] (NHWC; the torch side transposes it)."""
    r = config["resolution"]
    return np.random.default_rng(1).uniform(-1, 1, (config["batch"], r, r, 3)).astype(np.float32)


def _trainer_config(config: dict):
    """The `jaxsd train` config whose step is measured (validated as the command line's)."""
    from jaxsd.config import load_config

    folder = Path(config["folder"])
    return load_config(None, [
        "model.kind=vae", f"model.pretrained={folder / 'vae'}", f"model.dtype={config['dtype']}",
        f"loss.lpips.weights={folder / 'lpips.safetensors'}", f"loss.vae.lpips_weight={config['lpips_weight']}",
        f"loss.vae.disc_start={config['disc_start']}", f"loss.vae.disc_layers={config['disc_layers']}",
        f"loss.vae.disc_channels={config['disc_channels']}", f"optimizer.name={config['optimizer']}",
        f"optimizer.clip_grad_norm={config['clip']}", f"train.batch_size={config['batch']}",
        f"data.roots=[{folder}]", f"data.image.resolution={config['resolution']}"])


def child_prepare(config: dict) -> dict:
    import jax

    from bench.jaxsd_steps import vae_trainer_kit
    from bench.perceptual_files import save_random_lpips
    from jaxsd.convert.rules import flax_to_torch
    from jaxsd.convert.safetensors_io import save_file
    from jaxsd.convert.vae import save_vae
    from jaxsd.models.params import init_params
    from jaxsd.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, example_inputs
    from jaxsd.train.vae_step import step_key

    folder = Path(config["folder"])
    vae_config = VAEConfig.from_diffusers(config["vae"])
    save_vae(folder / "vae", vae_config, init_params(AutoencoderKL(vae_config), jax.random.key(0),
                                                     *example_inputs(vae_config)))
    save_random_lpips(folder / "lpips.safetensors")
    cfg = _trainer_config(config)
    (folder / "trainer.json").write_text(json.dumps({"loss": dataclasses.asdict(cfg.loss.vae),
                                                     "optimizer": dataclasses.asdict(cfg.optimizer)}))
    if not config["torch"]:
        return {}
    (state,) = vae_trainer_kit(cfg).start()  # the train state jaxsd's child starts from
    save_file(flax_to_torch(jax.device_get(state.params["disc"])), folder / "disc.safetensors")
    side = config["resolution"] // vae_config.downscale
    zeros = np.zeros((config["batch"], side, side, vae_config.latent_channels), np.float32)
    eps = DiagonalGaussian(mean=zeros, logvar=zeros).sample(step_key(state))  # N(0, 1) as the step draws it
    np.save(folder / "noise.npy", np.asarray(eps).transpose(0, 3, 1, 2))
    return {}


def child_jaxsd(config: dict) -> dict:
    from bench.jaxsd_steps import vae_trainer_kit
    from bench.suites.train_step import _rss_gb, time_jaxsd_step

    baseline = _rss_gb()
    return time_jaxsd_step(config, vae_trainer_kit(_trainer_config(config)), baseline, {"pixels": _pixels(config)})


def child_torch(config: dict) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from bench.suites.train_step import _rss_gb
    from bench.torch_discriminator import NLayerDiscriminator, load_state
    from bench.torch_vae import load_lpips, make_vae_step

    baseline = _rss_gb()
    folder = Path(config["folder"])
    trainer = json.loads((folder / "trainer.json").read_text())
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    disc = NLayerDiscriminator(config["disc_layers"], config["disc_channels"])
    if (folder / "disc.safetensors").exists():  # jaxsd's initial discriminator (prepare writes it when torch runs)
        disc = load_state(disc, load_file(folder / "disc.safetensors"))
    lpips = load_lpips(load_file(folder / "lpips.safetensors"))
    noise = np.load(folder / "noise.npy") if (folder / "noise.npy").exists() else None
    step = make_vae_step(vae, disc, lpips, trainer["loss"], trainer["optimizer"], first_noise=noise)
    x = torch.from_numpy(np.ascontiguousarray(_pixels(config).transpose(0, 3, 1, 2)))
    first, times = None, []
    for i in range(config["warmup"] + config["repeats"]):
        t0 = time.perf_counter()
        metrics = step(x)  # floats: the step has finished
        if i >= config["warmup"]:
            times.append(time.perf_counter() - t0)
        first = first or metrics
    return {"step_s": times,
            "info": {"threads": torch.get_num_threads(), "first_loss": first["loss"], "first_metrics": first,
                     "baseline_rss_gb": baseline,
                     "num_params": sum(p.numel() for m in (vae, disc, lpips) for p in m.parameters()),
                     "num_trainable": sum(p.numel() for m in (vae, disc) for p in m.parameters())}}
