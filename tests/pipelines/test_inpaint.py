"""Inpainting (`--init-image` + `--mask`) against diffusers' StableDiffusionInpaintPipeline on tiny pipelines.

diffusers draws the VAE posterior samples (and, without `latents`, the noise) itself; the references
replace those draws with ours (the keys `StableDiffusion.generate` uses), everything else is diffusers' code.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.pipelines.generate import split_run_key
from jaxsd.pipelines.pipeline import StableDiffusion, generation_keys
from tests.helpers import jaxsd_command
from tests.pipelines.conftest import (
    assert_images_close,
    assert_images_differ,
    diffusers_scheduler,
    to_uint8,
)

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT, NEGATIVE = "a photo of a cat", "a dog"


def posterior_eps(seed: int, shape_nhwc: tuple) -> dict:
    """Our posterior-sample noise, NCHW torch: "image" (the init image's latents), "masked" (the masked image's)."""
    import torch
    encode_key, _ = split_run_key(generation_keys(seed)[1])
    draw = lambda key: torch.from_numpy(np.array(jax.random.normal(key, shape_nhwc)).transpose(0, 3, 1, 2).copy())
    return {"image": draw(encode_key), "masked": draw(jax.random.fold_in(encode_key, 1))}


class DiffusersDraws:
    """Replaces diffusers' inpaint pipeline's random draws: posterior samples from our keys, initial noise =
    `noise`. `expect(k)` before each call: it encodes k images, the masked image last (the init image first,
    when its latents are needed)."""

    def __init__(self, monkeypatch, seed: int, noise: np.ndarray):
        import torch
        from diffusers.pipelines.stable_diffusion import (
            pipeline_stable_diffusion_inpaint as inpaint,
        )
        n, c, h, w = noise.shape
        self.eps, self.encodes, self.calls = posterior_eps(seed, (n, h, w, c)), 0, 0
        monkeypatch.setattr(inpaint, "retrieve_latents", self.retrieve_latents)
        monkeypatch.setattr(inpaint, "randn_tensor", lambda shape, **k: torch.from_numpy(noise))

    def expect(self, encodes: int) -> None:
        self.encodes, self.calls = encodes, 0

    def retrieve_latents(self, out, generator=None, sample_mode="sample"):
        self.calls += 1
        which = "masked" if self.calls == self.encodes else "image"
        return out.latent_dist.mean + out.latent_dist.std * self.eps[which]


def pictures(tmp_path, size: int = 16):
    """(init image uint8 [H,W,3], mask uint8 [H,W] with a white rectangle to repaint), also saved as PNGs."""
    image = np.random.default_rng(5).uniform(0, 255, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[3:11, 5:14] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return image, mask


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory, torch_single_thread):
    from tests.pipelines.tiny_options import build_sd_inpaint
    return build_sd_inpaint(tmp_path_factory.mktemp("inpaint") / "pipe")


def test_cli_inpainting_unet_matches_diffusers(inpaint_folder, tmp_path, monkeypatch, torch_single_thread):
    """A 9-channel inpainting UNet through `jaxsd sample --init-image --mask` (strength 1: pure noise)."""
    import diffusers
    torch = torch_single_thread
    image, mask = pictures(tmp_path)
    seed, noise = 2, np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "out.png"
    jaxsd_command("sample", "--model", inpaint_folder, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                  "--init-image", tmp_path / "image.png", "--mask", tmp_path / "mask.png", "--steps", 8,
                  "--guidance", 7.0, "--scheduler", "euler", "--seed", seed, "--latents", tmp_path / "noise.npy",
                  "--out", out)
    ours = np.asarray(Image.open(out))[None]

    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpaint_folder)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    draws = DiffusersDraws(monkeypatch, seed, noise)

    def reference(mask_image):
        draws.expect(1)  # given latents at strength 1: only the masked image is encoded
        return to_uint8(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(image),
                            mask_image=Image.fromarray(mask_image), num_inference_steps=8, guidance_scale=7.0,
                            latents=torch.from_numpy(noise), output_type="np").images)

    assert_images_close(ours, reference(mask))
    assert_images_differ(ours, reference(255 - mask))  # the mask steers the result


def test_plain_unet_inpainting_blends_as_diffusers(sd_folder, sd_pipe, tmp_path, monkeypatch, torch_single_thread):
    """A plain 4-channel UNet: diffusers' latent blending after every step, at strength 0.7 (the image noised
    to the first step run) and with dpmpp_2m (a multistep solver: only the latents are blended)."""
    import diffusers
    image, mask = pictures(tmp_path)
    seed, strength, steps = 6, 0.7, 10
    noise = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours = sd_pipe.generate(PROMPT, negative_prompt=NEGATIVE, init_image=image, mask=mask / 255.0,
                            strength=strength, steps=steps, guidance=7.5, sampler="dpmpp_2m", seed=seed,
                            latents=noise)

    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(sd_folder)
    ref.scheduler = diffusers_scheduler(ref, "dpmpp_2m")
    draws = DiffusersDraws(monkeypatch, seed, noise)

    def reference(strength=strength, mask_image=mask):
        draws.expect(2)  # image latents (start and blend), then the masked image
        return to_uint8(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(image),
                            mask_image=Image.fromarray(mask_image), strength=strength, num_inference_steps=steps,
                            guidance_scale=7.5, output_type="np").images)

    assert_images_close(ours, reference())
    assert_images_differ(ours, reference(strength=1.0))  # strength decides where the run starts
    assert_images_differ(ours, reference(mask_image=255 - mask))  # the mask decides what is kept


def test_inpainting_inputs_are_checked(sd_pipe, inpaint_folder):
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="a mask needs the image to inpaint"):
        sd_pipe.generate("x", mask=np.ones((16, 16)), steps=2)
    with pytest.raises(ValueError, match=r"mask has shape \(8, 8\)"):
        sd_pipe.generate("x", init_image=image, mask=np.ones((8, 8)), steps=2)
    with pytest.raises(ValueError, match="an inpainting UNet"):
        StableDiffusion.from_folder(inpaint_folder).generate("x", steps=2)
