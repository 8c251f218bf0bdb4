"""Random weights files for the UNet's perceptual loss (`loss.perceptual`), in the real on-disk formats: a diffusers
VAE folder (the frozen decoder) and one LPIPS `.safetensors` (VGG16 `features.N.*` + `linN.model.1.weight`, the
layout `jaxsd.losses.weights.save_lpips_safetensors` writes). Drawn from abstract shapes with NumPy: nothing is
initialised or compiled. Used by `jaxsd bench train-step --perceptual` and the perceptual-loss tests."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxsd.convert.safetensors_io import save_file
from jaxsd.convert.vae import save_vae
from jaxsd.losses.vgg import VGG16Features
from jaxsd.models.params import abstract_params
from jaxsd.models.vae import AutoencoderKL, VAEConfig, example_inputs

# the VAE a UNet preset is benchmarked with: SD's structure (factor 8) at a quarter of its width for `small`,
# as `jaxsd bench sample` builds its pipeline
BENCH_VAE_BLOCKS = {"micro": (16, 32), "tiny": (16, 32, 32), "small": (32, 64, 128, 128), "sd15": (128, 256, 512, 512),
                    "sdxl": (128, 256, 512, 512)}


def save_random_lpips(path: Path, seed: int = 0) -> Path:
    """He-initialised VGG16 convs (OIHW) and non-negative LPIPS heads ([1, C, 1, 1]), as one .safetensors."""
    rng = np.random.default_rng(seed)
    shapes, _ = abstract_params(VGG16Features(), np.zeros((1, 32, 32, 3), np.float32))
    state = {}
    for name, leaves in shapes.items():  # features_N: {"kernel": [3, 3, I, O], "bias": [O]}
        index = name.split("_")[1]
        h, w, i, o = leaves["kernel"].shape
        state[f"features.{index}.weight"] = (rng.standard_normal((o, i, h, w)) * np.sqrt(2.0 / (h * w * i))
                                             ).astype(np.float32)
        state[f"features.{index}.bias"] = (0.01 * rng.standard_normal(o)).astype(np.float32)
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.model.1.weight"] = np.abs(rng.standard_normal((1, c, 1, 1)) / c).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, {"format": "pt", "jaxsd": "lpips-vgg16-v0.1"})
    return path


def save_random_vae(folder: Path, blocks: tuple[int, ...], seed: int = 0) -> Path:
    """A diffusers AutoencoderKL folder of SD's layout with `blocks` channels (downscale 2^(len-1)), random weights."""
    n = len(blocks)
    config = VAEConfig(block_out_channels=tuple(blocks), down_block_types=("DownEncoderBlock2D",) * n,
                       up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=2,
                       norm_num_groups=min(32, blocks[0]), latent_channels=4)
    shapes, _ = abstract_params(AutoencoderKL(config), *example_inputs(config))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    save_vae(folder, config, params)
    return Path(folder)
