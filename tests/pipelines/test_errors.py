"""Bad input to `jaxsd sample` / StableDiffusion: each a clear error; and no recompilation for
changes of prompt, seed, guidance or strength (counted with JAX's compile events)."""

from __future__ import annotations

import logging
import shutil

import jax
import numpy as np
import pytest

from jaxsd import cli
from jaxsd.pipelines.loading import PipelineFolderError, load_pipeline

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VALID = ("ddim, ddpm, pndm, lms, lms_karras, heun, heun_karras, euler, euler_karras, euler_a, dpmpp_2m, "
         "dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, dpmpp_3m_sde, dpmpp_3m_sde_karras, dpmpp_sde, "
         "dpmpp_sde_karras, unipc, unipc_karras, lcm")


def _cli(capsys, *args):
    rc = cli.main(["sample", *args])
    return rc, capsys.readouterr().err


def test_unknown_scheduler_lists_valid_ones(sd_folder, sd_pipe, capsys, tmp_path):
    rc, err = _cli(capsys, "--model", str(sd_folder), "--prompt", "x", "--scheduler", "DPM++ 4M",
                   "--out", str(tmp_path / "a.png"))
    assert rc == 2 and "unknown sampler 'DPM++ 4M'" in err and f"auto, {VALID}" in err
    with pytest.raises(ValueError, match=f"unknown sampler 'heunn'; valid samplers: auto, {VALID}"):
        sd_pipe.generate("x", sampler="heunn")


def test_size_not_divisible_by_vae_factor(sd_folder, sd_pipe, capsys, tmp_path):
    with pytest.raises(ValueError, match="height 15 must be a positive multiple of 2"):
        sd_pipe.generate("x", height=15, width=16, steps=2)
    rc, err = _cli(capsys, "--model", str(sd_folder), "--prompt", "x", "--width", "17", "--height", "16",
                   "--out", str(tmp_path / "a.png"))
    assert rc == 2 and "width 17 must be a positive multiple of 2" in err


def test_strength_outside_unit_interval(sd_folder, sd_pipe, capsys, tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 1.5"):
        sd_pipe.generate("x", init_image=image, strength=1.5, steps=4)
    rc, err = _cli(capsys, "--model", str(sd_folder), "--prompt", "x", "--strength", "-0.1",
                   "--init-image", "whatever.png", "--out", str(tmp_path / "a.png"))
    assert rc == 2 and "--strength must be in [0, 1], got -0.1" in err


def test_missing_model_index(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    with pytest.raises(PipelineFolderError, match="no model_index.json — not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    rc, err = _cli(capsys, "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert rc == 2 and "no model_index.json" in err


def test_missing_component(sd_folder, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(sd_folder, broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(PipelineFolderError, match="component 'vae' is missing"):
        load_pipeline(broken)


def test_latents_of_wrong_shape(sd_pipe):
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 16, 16\); this run needs \(2, 4, 8, 8\)"):
        sd_pipe.generate("x", num_images=2, steps=10, latents=np.zeros((1, 4, 16, 16), np.float32))


def test_no_recompilation_for_prompt_seed_guidance_strength(sd_pipe, caplog):
    """After one run per program, new prompts / negative prompts / seeds / guidance / rescale /
    strength compile nothing (the program for (shapes, steps, sampler) is reused)."""
    compiles, listening = [], [True]

    def listener(event, duration, **kw):  # listeners cannot be removed: switched off at the end instead
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    image = np.full((16, 16, 3), 128, np.uint8)
    sd_pipe.generate("warm up", num_images=2, steps=10, sampler="dpmpp_2m", seed=0)
    sd_pipe.generate("warm up", steps=10, sampler="euler", seed=0, init_image=image, strength=0.6)
    compiles.clear()
    sd_pipe.generate("a photo of a dog", negative_prompt="blurry", num_images=2, steps=10, sampler="dpmpp_2m",
                     seed=1, guidance=3.0, guidance_rescale=0.5)
    sd_pipe.generate("an oil painting", num_images=2, steps=10, sampler="dpmpp_2m", seed=2, guidance=9.0)
    sd_pipe.generate("a castle", steps=10, sampler="euler", seed=3, init_image=image, strength=0.3, guidance=4.0)
    sd_pipe.generate("a castle", steps=10, sampler="euler", seed=3, init_image=image, strength=1.0)
    assert compiles == [], f"{len(compiles)} XLA compilations for changed prompt/seed/guidance/strength"
    assert sd_pipe.last_compile_seconds == 0.0

    # an over-long prompt is truncated to the tokenizer's 77 tokens with a warning, not silently
    with caplog.at_level(logging.WARNING):
        sd_pipe.generate(" ".join(["astronaut riding a horse"] * 30), num_images=2, steps=10, sampler="dpmpp_2m")
    assert any("truncated" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert compiles == []
    listening[0] = False


def test_eta_only_with_ddim_and_euler_a(sd_pipe):
    with pytest.raises(ValueError, match="eta=0.5 applies to the ddim and euler_a samplers only"):
        sd_pipe.generate("x", sampler="euler", eta=0.5, steps=4)


def test_prompt_embeds_stand_in_for_prompts(sd_pipe):
    """Embeddings from `encode_with_negative` give the very images their prompts give; mixing or halving
    the two ways is refused, and so are prompts once the text encoders are unloaded."""
    options = {"num_images": 2, "steps": 10, "sampler": "dpmpp_2m", "seed": 4}
    cond, uncond = sd_pipe.text.encode_with_negative(["a red cube"], "blurry")
    np.testing.assert_array_equal(sd_pipe.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, **options),
                                  sd_pipe.generate("a red cube", negative_prompt="blurry", **options))
    with pytest.raises(ValueError, match="give prompts or prompt_embeds, not both"):
        sd_pipe.generate("x", prompt_embeds=cond, negative_prompt_embeds=uncond)
    with pytest.raises(ValueError, match="prompt_embeds needs negative_prompt_embeds"):
        sd_pipe.generate(prompt_embeds=cond)
    with pytest.raises(ValueError, match="negative_prompt_embeds without prompt_embeds"):
        sd_pipe.generate(negative_prompt_embeds=uncond)
    text, sd_pipe.text = sd_pipe.text, None
    try:
        with pytest.raises(ValueError, match="text encoders were unloaded; pass prompt_embeds"):
            sd_pipe.generate("x")
    finally:
        sd_pipe.text = text
