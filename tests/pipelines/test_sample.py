"""End to end: `jaxsd sample` / StableDiffusion vs diffusers' pipelines on tiny random models.

Decoded uint8 images must agree to ≤ 0.3 levels on average and ≤ 3 at most with
the same latents, prompts, sampler, steps and guidance; each test also checks that
a wrong guidance (or sampler) misses that tolerance by far, so passing means something.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd import cli
from jaxsd.diffusion.samplers import DIFFUSERS_EQUIVALENT
from jaxsd.pipelines.generate import split_run_key
from jaxsd.pipelines.pipeline import StableDiffusion, generation_keys
from tests.pipelines.conftest import assert_images_close, assert_images_differ, to_uint8

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT, NEGATIVE = "a photo of a cat", "a dog"


def _diffusers_scheduler(pipe, name):
    import diffusers
    cls_name, overrides = DIFFUSERS_EQUIVALENT[name]
    config = getattr(pipe, "folder_scheduler_config", pipe.scheduler.config)
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def _latents(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def test_cli_txt2img_matches_diffusers(sd_folder, sd_reference, sd_pipe, tmp_path, capsys, torch_single_thread):
    torch = torch_single_thread
    latents = _latents(2)
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "out" / "cat.png"
    rc = cli.main(["sample", "--model", str(sd_folder), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                   "--steps", "10", "--guidance", "7.5", "--scheduler", "dpmpp_2m", "--num-images", "2",
                   "--latents", str(tmp_path / "latents.npy"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "compile:" in printed.out and "generation:" in printed.out
    assert "10/10" in printed.err  # the progress bar over the steps
    ours = np.stack([np.asarray(Image.open(out.with_name(f"cat-{i}.png"))) for i in range(2)])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (16, 32, 3) and np.array_equal(grid[:, :16], ours[0])

    sd_reference.scheduler = _diffusers_scheduler(sd_reference, "dpmpp_2m")
    ref = to_uint8(sd_reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
                                num_images_per_prompt=2, latents=torch.from_numpy(latents), output_type="np").images)
    assert_images_close(ours, ref)
    wrong = sd_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=10, guidance=5.0, sampler="dpmpp_2m",
                             num_images=2, latents=latents)
    assert_images_differ(wrong, ref)


def test_batch_of_prompts_guidance_rescale_karras(sd_reference, sd_pipe, torch_single_thread):
    """Two prompts (same shapes as the CLI test's 1 x 2 images, and dpmpp_2m_karras differs from dpmpp_2m only
    in its tables, so this reuses that compiled program)."""
    torch = torch_single_thread
    prompts, latents = ["a photo of a cat", "an oil painting of a castle"], _latents(2, seed=1)
    sd_reference.scheduler = _diffusers_scheduler(sd_reference, "dpmpp_2m_karras")
    ref = to_uint8(sd_reference(prompts, num_inference_steps=10, guidance_scale=6.0, guidance_rescale=0.7,
                                latents=torch.from_numpy(latents), output_type="np").images)
    ours = sd_pipe.generate(prompts, steps=10, guidance=6.0, guidance_rescale=0.7, sampler="dpmpp_2m_karras",
                            latents=latents)
    assert_images_close(ours, ref)
    assert sd_pipe.last_compile_seconds == 0.0
    assert_images_differ(sd_pipe.generate(prompts, steps=10, guidance=6.0, guidance_rescale=0.0,
                                          sampler="dpmpp_2m_karras", latents=latents), ref)
    assert_images_differ(sd_pipe.generate(prompts, steps=10, guidance=6.0, guidance_rescale=0.7,
                                          sampler="dpmpp_2m", latents=latents), ref)


def test_img2img_matches_driven_diffusers_components(sd_folder, sd_reference, sd_pipe, torch_single_thread):
    """diffusers' img2img pipeline draws its noise internally, so the reference drives its components
    (encode_prompt, VAE, scheduler with set_begin_index, UNet, CFG) with our noise and posterior ε."""
    torch = torch_single_thread
    steps, strength, guidance, seed = 10, 0.6, 7.5, 3
    image = (np.random.default_rng(5).uniform(0, 255, (16, 16, 3))).astype(np.uint8)
    noise = _latents(1, seed=4)
    ours = sd_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance, sampler="euler",
                            seed=seed, latents=noise, init_image=image, strength=strength)

    ref = sd_reference
    sched = _diffusers_scheduler(ref, "euler")
    sched.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    timesteps = sched.timesteps[t_start:]
    sched.set_begin_index(t_start)
    with torch.no_grad():
        pixels = torch.from_numpy(image.astype(np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)[None]
        dist = ref.vae.encode(pixels).latent_dist
        encode_key, _ = split_run_key(generation_keys(seed)[1])
        eps = np.array(jax.random.normal(encode_key, (1, 8, 8, 4))).transpose(0, 3, 1, 2).copy()
        z0 = (dist.mean + dist.std * torch.from_numpy(eps)) * ref.vae.config.scaling_factor
        x = sched.add_noise(z0, torch.from_numpy(noise), timesteps[:1])
        cond, uncond = ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        context = torch.cat([uncond, cond])
        for t in timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            u, c = ref.unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        decoded = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
    ref_img = to_uint8((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    assert_images_close(ours, ref_img)
    assert_images_differ(sd_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance,
                                          sampler="euler", seed=seed, latents=noise, init_image=image,
                                          strength=0.9), ref_img)


def test_sdxl_matches_diffusers(sdxl_folder, torch_single_thread):
    import diffusers
    torch = torch_single_thread
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe = StableDiffusion.from_folder(sdxl_folder)
    assert pipe.family == "sdxl"
    latents = _latents(1, seed=7)
    kw = {"original_size": (24, 32), "crops_coords_top_left": (2, 4), "target_size": (16, 16)}
    # negative prompt absent: diffusers' force_zeros_for_empty_prompt gives zero uncond embeddings
    ref_img = to_uint8(ref(PROMPT, num_inference_steps=8, guidance_scale=5.0, height=16, width=16,
                           latents=torch.from_numpy(latents), output_type="np", **kw).images)
    ours = pipe.generate(PROMPT, steps=8, guidance=5.0, sampler="euler", height=16, width=16, latents=latents, **kw)
    assert_images_close(ours, ref_img)
    # the micro-conditioning is live: other sizes change the image
    other = pipe.generate(PROMPT, steps=8, guidance=5.0, sampler="euler", height=16, width=16, latents=latents,
                          original_size=(512, 512))
    assert_images_differ(other, ref_img)


def test_hybrid_t5_pipeline_matches_driven_components(tmp_path, sd_pipe, torch_single_thread):
    """SD UNet + T5 through the text projection (no diffusers pipeline class exists for it): the reference
    drives transformers' T5 (padding masked), the projection and diffusers' UNet/VAE/scheduler. The UNet and
    VAE configs equal the SD fixture's, so this reuses that compiled program."""
    import diffusers
    import transformers

    from tests.pipelines.tiny import build_hybrid
    torch = torch_single_thread
    folder = build_hybrid(tmp_path / "hybrid")
    pipe = StableDiffusion.from_folder(folder)
    assert pipe.family == "hybrid"
    latents, guidance, steps = _latents(2, seed=9), 7.0, 10
    ours = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance, sampler="dpmpp_2m",
                         num_images=2, latents=latents)
    # same architecture as the SD fixture → the same compiled program (in a full run: no compile here)
    assert (pipe.pipe.unet_config, pipe.pipe.vae_config) == (sd_pipe.pipe.unet_config, sd_pipe.pipe.vae_config)

    tok = transformers.T5Tokenizer.from_pretrained(folder / "tokenizer")
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    from safetensors.torch import load_file
    proj = load_file(str(folder / "text_projection" / "diffusion_pytorch_model.safetensors"))
    sched = _diffusers_scheduler(diffusers.StableDiffusionPipeline.from_pretrained(folder), "dpmpp_2m")
    sched.set_timesteps(steps)
    with torch.no_grad():
        def encode(text):
            batch = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            h = t5(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            return (h @ proj["linear.weight"].T + proj["linear.bias"]).repeat(2, 1, 1)
        context = torch.cat([encode(NEGATIVE), encode(PROMPT)])
        x = torch.from_numpy(latents)
        for t in sched.timesteps:
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        decoded = vae.decode(x / vae.config.scaling_factor).sample
    ref = to_uint8((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    assert_images_close(ours, ref)
    assert_images_differ(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=2.0,
                                       sampler="dpmpp_2m", num_images=2, latents=latents), ref)


def test_v_prediction_zero_snr_folder_matches_diffusers(sd_folder, sd_pipe, tmp_path, torch_single_thread):
    """An SD2.1-style scheduler config (v-prediction, zero terminal SNR, trailing spacing) on the same
    weights: the config alone changes the math, and the compiled program is shared (prediction is traced)."""
    import json
    import shutil

    import diffusers
    torch = torch_single_thread
    folder = tmp_path / "v"
    shutil.copytree(sd_folder, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    cfg_path.write_text(json.dumps(cfg))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ref.scheduler = _diffusers_scheduler(ref, "dpmpp_2m")
    latents = _latents(2, seed=11)
    ref_img = to_uint8(ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
                           guidance_rescale=0.7, num_images_per_prompt=2, latents=torch.from_numpy(latents),
                           output_type="np").images)
    pipe = StableDiffusion.from_folder(folder)
    ours = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=10, guidance=7.5, guidance_rescale=0.7,
                         sampler="dpmpp_2m", num_images=2, latents=latents)
    assert_images_close(ours, ref_img)
    assert_images_differ(sd_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=10, guidance=7.5,
                                          guidance_rescale=0.7, sampler="dpmpp_2m", num_images=2,
                                          latents=latents), ref_img)


def test_sdxl_vae_latent_statistics_match_diffusers(sdxl_folder, tmp_path, monkeypatch, torch_single_thread):
    """A VAE config with latents_mean / latents_std (Playground-v2.5 style) through diffusers'
    StableDiffusionXLImg2ImgPipeline, which encodes with (z - mean) * scaling_factor / std and decodes with
    z * std / scaling_factor + mean (the same decode as StableDiffusionXLPipeline). Its two random draws
    (posterior sample, noise) are replaced by ours; everything else is diffusers' own code."""
    import json
    import shutil

    import diffusers
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_img2img as img2img,
    )
    torch = torch_single_thread
    folder = tmp_path / "stats"
    shutil.copytree(sdxl_folder, folder)
    config_path = folder / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(latents_mean=[0.3, -0.5, 0.2, 0.6], latents_std=[1.7, 0.8, 1.2, 2.2])
    config_path.write_text(json.dumps(config))

    seed, strength, noise = 5, 0.6, _latents(1, seed=14)
    image = np.random.default_rng(6).uniform(0, 255, (16, 16, 3)).astype(np.uint8)
    encode_key, _ = split_run_key(generation_keys(seed)[1])
    eps = torch.from_numpy(np.array(jax.random.normal(encode_key, (1, 8, 8, 4))).transpose(0, 3, 1, 2).copy())
    monkeypatch.setattr(img2img, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mean + out.latent_dist.std * eps)
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **k: torch.from_numpy(noise).to(k.get("dtype")))

    def diffusers_image(path):
        ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(path)
        ref.scheduler = _diffusers_scheduler(ref, "euler")
        return to_uint8(ref(PROMPT, image=Image.fromarray(image), strength=strength, num_inference_steps=10,
                            guidance_scale=5.0, output_type="np").images)

    ours = StableDiffusion.from_folder(folder).generate(PROMPT, init_image=image, strength=strength, steps=10,
                                                        guidance=5.0, sampler="euler", seed=seed, latents=noise)
    assert_images_close(ours, diffusers_image(folder))
    assert_images_differ(ours, diffusers_image(sdxl_folder))  # the statistics change the image by far
