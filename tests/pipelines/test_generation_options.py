"""`jaxsd sample`'s generation options against diffusers on tiny pipelines (uint8 within 0.3 mean / 3 max).

Each CLI test groups options whose effects stay visible together; for each option a run without it
(or with another value) must miss the tolerance by far, so passing means the option took effect.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.errors import InputError
from jaxsd.pipelines.generate import split_run_key
from jaxsd.pipelines.pipeline import generation_keys
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


def test_cli_prompts_file_clip_skip_ddim_eta_rescale_vae_tiled_latents(sd_folder, tmp_path, monkeypatch,
                                                                        torch_single_thread):
    """One run of the real command with --prompts (3 prompts, --batch-size 2: the last batch padded, one compiled
    program), --clip-skip, --scheduler ddim --eta, --guidance-rescale, --vae, --tiled-vae (48 px: 24x24 latents,
    tiles of 16) and --output-latents, against StableDiffusionPipeline(clip_skip, eta, guidance_rescale) with
    the other VAE, tiling enabled, output_type="latent", and our noise (batch b: seed + b; DDIM's per-step
    noise too)."""
    import diffusers
    from diffusers.schedulers import scheduling_ddim

    from tests.pipelines.tiny_options import build_vae
    torch = torch_single_thread
    vae_dir = build_vae(tmp_path / "vae")
    steps, seed, size, shape = 8, 4, 48, (2, 4, 24, 24)
    prompts = ["a photo of a cat", "an oil painting, of a castle!", "a red cube"]
    (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", prompts[1], prompts[2], ""]) + "\n")
    out, lat_out = tmp_path / "grid.png", tmp_path / "final.npy"
    proc = jaxsd_command("sample", "--model", sd_folder, "--prompts", tmp_path / "prompts.txt", "--batch-size", 2,
                         "--negative-prompt", NEGATIVE, "--steps", steps, "--guidance", 7.0, "--scheduler", "ddim",
                         "--eta", 0.7, "--clip-skip", 1, "--guidance-rescale", 0.6, "--vae", vae_dir, "--tiled-vae",
                         "--seed", seed, "--height", size, "--width", size, "--output-latents", lat_out, "--out", out)
    assert "(1 program(s) compiled)" in proc.stdout and "3/3" in proc.stderr
    names = ["grid-000-a-photo-of-a-cat.png", "grid-001-an-oil-painting-of-a-castle.png", "grid-002-a-red-cube.png"]
    ours = np.stack([np.asarray(Image.open(tmp_path / name)) for name in names])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * size, 2 * size, 3) and np.array_equal(grid[size:, :size], ours[2])
    ours_latents = np.load(lat_out)
    assert ours_latents.dtype == np.float32 and ours_latents.shape == (3, 4, 24, 24)

    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    ref = allow_diffusers_clip_skip(diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, vae=vae))
    ref.scheduler = diffusers_scheduler(ref, "ddim")

    def reference(batch: int, **overrides):
        calls = iter(sampler_noises(seed + batch, steps, shape))
        monkeypatch.setattr(scheduling_ddim, "randn_tensor", lambda *a, **k: next(calls))
        noise = np.array(jax.random.normal(generation_keys(seed + batch)[0], (2, 24, 24, 4))).transpose(0, 3, 1, 2)
        kw = {"negative_prompt": [NEGATIVE] * 2, "num_inference_steps": steps, "guidance_scale": 7.0, "eta": 0.7,
              "clip_skip": 1, "guidance_rescale": 0.6, "height": size, "width": size, "output_type": "latent"}
        texts = prompts[:2] if batch == 0 else [prompts[2]] * 2
        return ref(texts, latents=torch.from_numpy(noise.copy()), **{**kw, **overrides}).images

    ref_latents = torch.cat([reference(0), reference(1)[:1]])
    ref.vae.enable_tiling()
    expected = decode(ref.vae, ref_latents)
    assert_images_close(ours, expected)
    # the saved latents are the images': diffusers decodes them to them (latents have no tolerance of their own;
    # guidance 7 amplifies float32 rounding over the steps to ~1e-3 relative, as on the plain path)
    assert_images_close(decode(ref.vae, torch.from_numpy(ours_latents)), expected)
    # each option took effect: without it the images miss the tolerance by far
    for change in ({"clip_skip": None}, {"eta": 0.0}, {"guidance_rescale": 0.0}):
        assert_images_differ(ours[:2], decode(ref.vae, reference(0, **change)))
    assert_images_differ(ours[:1], expected[1:2])  # each file holds its own prompt's image
    ref.vae.disable_tiling()
    d = np.abs(decode(ref.vae, ref_latents).astype(int) - ours.astype(int))
    assert d.max() > 3, "untiled decoding is as close as tiled: the tiles were not used"
    original_vae = diffusers.AutoencoderKL.from_pretrained(sd_folder / "vae").eval()
    assert_images_differ(ours, decode(original_vae, ref_latents))


@pytest.mark.slow  # a second CLI run; the default suite runs the options through the SD CLI test
def test_cli_sdxl_second_prompts_clip_skip_fp16_variant(sdxl_folder, tmp_path, torch_single_thread):
    """SDXL's --prompt-2 / --negative-prompt-2 with --clip-skip, from a folder holding only the fp16 variant's
    weights (--variant fp16), against StableDiffusionXLPipeline(prompt_2, negative_prompt_2, clip_skip)
    loaded with variant="fp16" in float32."""
    import diffusers

    from tests.pipelines.tiny_options import save_fp16_variant
    torch = torch_single_thread
    folder = save_fp16_variant(sdxl_folder, tmp_path / "xl16", "StableDiffusionXLPipeline")
    assert not list(folder.glob("unet/diffusion_pytorch_model.safetensors"))  # only *.fp16.safetensors
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", latents)
    prompt_2, negative_2 = "an oil painting", "blurry photo"
    out = tmp_path / "xl.png"
    jaxsd_command("sample", "--model", folder, "--variant", "fp16", "--prompt", PROMPT, "--prompt-2", prompt_2,
                  "--negative-prompt", NEGATIVE, "--negative-prompt-2", negative_2, "--clip-skip", 1,
                  "--steps", 8, "--guidance", 5.0, "--scheduler", "euler", "--height", 16, "--width", 16,
                  "--latents", tmp_path / "noise.npy", "--out", out)
    ours = np.asarray(Image.open(out))[None]

    ref = allow_diffusers_clip_skip(diffusers.StableDiffusionXLPipeline.from_pretrained(
        folder, variant="fp16", torch_dtype=torch.float32))
    ref.scheduler = diffusers_scheduler(ref, "euler")
    kw = {"prompt_2": prompt_2, "negative_prompt": NEGATIVE, "negative_prompt_2": negative_2, "clip_skip": 1,
          "num_inference_steps": 8, "guidance_scale": 5.0, "height": 16, "width": 16, "output_type": "np"}

    def reference(**overrides):
        return to_uint8(ref(PROMPT, latents=torch.from_numpy(latents), **{**kw, **overrides}).images)

    assert_images_close(ours, reference())
    for change in ({"prompt_2": None}, {"negative_prompt_2": None}, {"clip_skip": None}):
        assert_images_differ(ours, reference(**change))


def test_no_recompilation_for_clip_skip_eta_rescale(sd_pipe):
    """After one DDIM run, another prompt, seed, guidance, rescale, clip skip and eta compile nothing: neither
    the generation program nor the text encoder (clip skip is a traced layer index). After one euler_a run
    (default eta 1), another eta compiles nothing either."""
    compiles, listening = [], [True]

    def listener(event, duration, **kw):  # listeners cannot be removed: switched off at the end instead
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    options = {"num_images": 2, "steps": 6, "sampler": "ddim"}
    first = sd_pipe.generate("warm up", seed=0, **options)
    ancestral = {**options, "sampler": "euler_a"}
    euler_a = sd_pipe.generate("warm up", seed=0, **ancestral)
    encoder_programs = sd_pipe.text._encode._cache_size()
    compiles.clear()
    second = sd_pipe.generate("a photo of a dog", negative_prompt="blurry", seed=1, guidance=3.0,
                              guidance_rescale=0.5, clip_skip=2, eta=0.8, **options)
    third = sd_pipe.generate("warm up", seed=0, clip_skip=1, **options)
    euler_a_eta = sd_pipe.generate("warm up", seed=0, eta=0.3, **ancestral)
    listening[0] = False
    assert compiles == [], f"{len(compiles)} XLA compilations for changed prompt/seed/guidance/clip skip/eta"
    assert sd_pipe.last_compile_seconds == 0.0 and sd_pipe.text._encode._cache_size() == encoder_programs
    assert_images_differ(first, second)
    assert_images_differ(first, third)  # clip skip alone changes the image
    assert_images_differ(euler_a, euler_a_eta)


def test_clip_skip_and_eta_are_checked(sd_pipe):
    with pytest.raises(ValueError, match="layers for a clip skip of 0 to 3"):
        sd_pipe.generate("x", clip_skip=4, steps=2)
    with pytest.raises(ValueError, match="eta=0.5 applies to the ddim and euler_a samplers only"):
        sd_pipe.generate("x", sampler="euler", eta=0.5, steps=2)
    with pytest.raises(InputError, match="eta must be >= 0"):
        sd_pipe.generate("x", sampler="euler_a", eta=-0.5, steps=2)


@pytest.mark.slow  # compiles a bfloat16 program of its own
def test_dtype_option_loads_and_computes_in_bfloat16(sd_folder, sd_pipe):
    """--dtype bfloat16 as the command parses it: weights stored and models computing in bfloat16 (a reduced
    precision run is not held to the float32 parity tolerance: bfloat16 rounding moves the images by
    several levels in diffusers too), and the image it gives is not the float32 one."""
    import argparse

    import jax.numpy as jnp

    from jaxsd.commands import sample
    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    args = parser.parse_args(["--model", str(sd_folder), "--prompt", PROMPT, "--dtype", "bfloat16", "--out", "x.png"])
    pipe = sample.load_pipeline(args)
    stored = {leaf.dtype for tree in (pipe.pipe.unet_params, pipe.pipe.vae_params, pipe.text.params)
              for leaf in jax.tree.leaves(tree)}
    assert stored == {jnp.dtype(jnp.bfloat16)}
    assert {jnp.dtype(m.dtype) for m in (pipe.unet, pipe.vae, *(c.model for c in pipe.text.components))} == \
        {jnp.dtype(jnp.bfloat16)}
    options = {"negative_prompt": NEGATIVE, "steps": 10, "sampler": "dpmpp_2m", "num_images": 2}  # test_sample's
    low = pipe.generate(PROMPT, **options)
    assert np.abs(low.astype(int) - sd_pipe.generate(PROMPT, **options).astype(int)).max() > 0


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x", "--prompts", "p.txt"], "--prompt TEXT, or --prompts FILE"),
    ([], "--prompt TEXT, or --prompts FILE"),
    (["--prompt", "x", "--batch-size", "2"], "--batch-size goes with --prompts"),
    (["--prompt", "x", "--mask", "m.png"], "--mask needs --init-image"),
    (["--prompt", "x", "--guidance-rescale", "1.5"], "--guidance-rescale in [0, 1]"),
    (["--prompt", "x", "--clip-skip", "-1"], "--clip-skip must be >= 0"),
    (["--prompt", "x", "--output-latents", "z.png"], "--output-latents must be a .npy path"),
    (["--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
])
def test_cli_option_errors(tmp_path, capsys, argv, message):
    """Bad option combinations stop before any model is loaded, with exit status 2 and what to change."""
    from jaxsd import cli
    assert cli.main(["sample", "--model", str(tmp_path), *argv, "--out", str(tmp_path / "o.png")]) == 2
    assert message in capsys.readouterr().err
