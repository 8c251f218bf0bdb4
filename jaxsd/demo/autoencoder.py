"""Phase 1 of latent diffusion, as a user runs it: the tiny `AutoencoderKL` trained from scratch by
`jaxsd train` (`model.kind: vae`, docs/vae-training.md) and written by `jaxsd export`.

`vae_train_config` is the YAML config `jaxsd/demo/run.py` writes to OUT/vae.yaml: L2 reconstruction +
a small KL, no LPIPS and no discriminator (`loss.vae.discriminator: false`; flat-coloured shapes
reconstruct well without them). After the export, the latent scaling factor is set the way SD's was
chosen: 1 / std of the training latents, so the diffusion model sees latents of unit variance;
`evaluate` gives those latents and the held-out reconstructions (their PSNR) in one program.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxsd.demo.settings import DemoSettings


def vae_architecture(s: DemoSettings) -> dict:
    """diffusers AutoencoderKL config keys of the demo's VAE (`model.vae`): one down/up block per width,
    so 32 px images → 8×8×4 latents with three widths."""
    n = len(s.vae_block_out_channels)
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(s.vae_block_out_channels),
            "latent_channels": s.vae_latent_channels, "layers_per_block": 1, "norm_num_groups": 16,
            "sample_size": s.resolution}


def vae_train_config(s: DemoSettings, train_dir: Path, run_dir: Path) -> dict:
    """The `jaxsd train` config (as a dict) of the demo's autoencoder on the images of `train_dir`."""
    v = s.vae
    return {
        "model": {"kind": "vae", "vae": vae_architecture(s), "dtype": "float32"},
        "loss": {"vae": {"reconstruction": "l2", "kl_weight": v.kl_weight, "lpips_weight": 0.0,
                         "discriminator": False}},
        "optimizer": {"name": "adamw", "learning_rate": v.learning_rate, "warmup_steps": v.warmup_steps,
                      "schedule": "cosine", "min_lr_ratio": v.min_lr_ratio, "weight_decay": 0.0},
        "train": {"run_dir": str(run_dir), "steps": v.steps, "batch_size": v.batch_size, "seed": s.seed},
        "checkpoint": {"every": v.steps, "keep": 1, "async_save": False},
        "logging": {"every": max(1, v.steps // 4), "tensorboard": False, "progress_bar": False},
        "data": {"roots": [str(train_dir)], "image": {"resolution": s.resolution, "crop": "center",
                                                       "random_flip": False},
                 "loader": {"batch_size": v.batch_size, "seed": s.seed, "threads": 1, "prefetch": 2}},
    }


def evaluate(folder: Path, images_uint8: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The AutoencoderKL folder's (posterior means [N, h, w, C] (unscaled latents), reconstructions
    decode(mode(encode(x))) in [-1, 1] [N, H, W, 3]) of images uint8 [N, H, W, 3]: one jitted program
    for both (one compile), a fixed batch shape (the last chunk is padded)."""
    import jax
    import jax.numpy as jnp

    from jaxsd.convert.vae import load_vae
    from jaxsd.models.vae import AutoencoderKL

    config, params = load_vae(folder)
    model = AutoencoderKL(config)

    @jax.jit
    def f(p, x):
        mean = model.apply({"params": p}, x, method="encode").mode()
        return mean, model.apply({"params": p}, mean, method="decode").astype(jnp.float32)

    data = images_uint8.astype(np.float32) / 127.5 - 1.0
    means, recons = [], []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        pad = batch_size - len(chunk)
        m, r = f(params, jnp.asarray(np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk))
        means.append(np.asarray(m)[:len(chunk)])
        recons.append(np.asarray(r)[:len(chunk)])
    return np.concatenate(means), np.concatenate(recons)


def latent_scaling_factor(means: np.ndarray) -> float:
    """1 / std of the training latents (how SD's 0.18215 was chosen)."""
    return float(1.0 / np.std(means))


def set_scaling_factor(folder: Path, scale: float) -> None:
    """Record `scale` as the AutoencoderKL folder's `scaling_factor` (config.json), which the cache,
    sampling and diffusers read."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["scaling_factor"] = scale
    path.write_text(json.dumps(config, indent=2) + "\n")
