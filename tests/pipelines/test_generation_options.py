"""`jaxsd sample`'s generation options against diffusers on tiny pipelines (uint8 within 0.3 mean / 3 max).

Each CLI test groups options whose effects stay visible together; for each option a run without it
(or with another value) must miss the tolerance by far, so passing means the option took effect.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.diffusion.samplers import DIFFUSERS_EQUIVALENT
from jaxsd.pipelines.generate import split_run_key
from jaxsd.pipelines.pipeline import generation_keys
from tests.helpers import jaxsd_command
from tests.pipelines.conftest import assert_images_close, assert_images_differ, to_uint8

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT, NEGATIVE = "a photo of a cat", "a dog"


def scheduler(pipe, name, config=None):
    import diffusers
    cls_name, overrides = DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, cls_name).from_config(config or pipe.scheduler.config, **overrides)


def sampler_noises(seed: int, steps: int, shape_nchw: tuple) -> list:
    """The per-step noise of our stochastic samplers for `seed` (denoise: normal(fold_in(key, i))), NCHW torch."""
    import torch
    _, sample_key = split_run_key(generation_keys(seed)[1])
    n, c, h, w = shape_nchw
    return [torch.from_numpy(np.array(jax.random.normal(jax.random.fold_in(sample_key, i), (n, h, w, c)))
                             .transpose(0, 3, 1, 2).copy()) for i in range(steps)]


def allow_diffusers_clip_skip(pipe):
    """diffusers 0.42's clip-skip branch reads `text_encoder.text_model.final_layer_norm`, which transformers 5's
    CLIPTextModel keeps at `text_encoder.final_layer_norm`: alias it (outside torch's module registry, so
    nothing recurses), and diffusers' own clip-skip code runs."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None and not hasattr(encoder, "text_model"):
            object.__setattr__(encoder, "text_model", encoder)
    return pipe


def decode(vae, latents):
    """diffusers' decode + postprocess of output_type="latent" latents → uint8 NHWC."""
    import torch
    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor).sample
    return to_uint8((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def test_cli_clip_skip_ddim_eta_rescale_vae_tiled_latents(sd_folder, tmp_path, monkeypatch, torch_single_thread):
    """--clip-skip, --scheduler ddim --eta, --guidance-rescale, --vae, --tiled-vae (48 px: 24x24 latents, tiles
    of 16) and --output-latents through the real command, against StableDiffusionPipeline(clip_skip, eta,
    guidance_rescale) with the other VAE, tiling enabled and output_type="latent"; DDIM's per-step noise is ours."""
    import diffusers
    from diffusers.schedulers import scheduling_ddim

    from tests.pipelines.tiny_options import build_vae
    torch = torch_single_thread
    vae_dir = build_vae(tmp_path / "vae")
    steps, seed, size = 8, 4, 48
    latents = np.random.default_rng(0).standard_normal((1, 4, size // 2, size // 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", latents)
    out, lat_out = tmp_path / "out.png", tmp_path / "final.npy"
    jaxsd_command("sample", "--model", sd_folder, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                  "--steps", steps, "--guidance", 7.0, "--scheduler", "ddim", "--eta", 0.7, "--clip-skip", 1,
                  "--guidance-rescale", 0.6, "--vae", vae_dir, "--tiled-vae", "--seed", seed, "--height", size,
                  "--width", size, "--latents", tmp_path / "noise.npy", "--output-latents", lat_out, "--out", out)
    ours = np.asarray(Image.open(out))[None]
    ours_latents = np.load(lat_out)
    assert ours_latents.dtype == np.float32 and ours_latents.shape == latents.shape

    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    ref = allow_diffusers_clip_skip(diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, vae=vae))
    ref.scheduler = scheduler(ref, "ddim")
    noises = sampler_noises(seed, steps, latents.shape)

    def reference(**overrides):
        calls = iter(noises)
        monkeypatch.setattr(scheduling_ddim, "randn_tensor", lambda *a, **k: next(calls))
        kw = dict(negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, eta=0.7, clip_skip=1,
                  guidance_rescale=0.6, height=size, width=size, output_type="latent")
        return ref(PROMPT, latents=torch.from_numpy(latents), **{**kw, **overrides}).images

    ref_latents = reference()
    ref.vae.enable_tiling()
    ref_image = decode(ref.vae, ref_latents)
    assert_images_close(ours, ref_image)
    # the saved latents are the image's: diffusers decodes them to it (latents have no tolerance of their own;
    # guidance 7 amplifies float32 rounding over the steps to ~1e-3 relative, as on the plain path)
    assert_images_close(decode(ref.vae, torch.from_numpy(ours_latents)), ref_image)
    # each option took effect: without it the images miss the tolerance by far
    for change in ({"clip_skip": None}, {"eta": 0.0}, {"guidance_rescale": 0.0}):
        assert_images_differ(ours, decode(ref.vae, reference(**change)))
    ref.vae.disable_tiling()
    d = np.abs(decode(ref.vae, ref_latents).astype(int) - ours.astype(int))
    assert d.max() > 3, "untiled decoding is as close as tiled: the tiles were not used"
    original_vae = diffusers.AutoencoderKL.from_pretrained(sd_folder / "vae").eval()
    assert_images_differ(ours, decode(original_vae, ref_latents))
