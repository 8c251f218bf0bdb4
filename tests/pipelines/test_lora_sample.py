"""`jaxsd sample --lora FILE --lora-scale S` against diffusers' `load_lora_weights` + the same scale,
and the compiled programs surviving scale and file changes.

The LoRA (attn_ff + LoCon on the UNet, the text encoder too; rank != alpha) is written by jaxsd in
the kohya layout; tests/pipelines/test_lora_parity.py shows both layouts load into the same model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from jaxsd import cli
from jaxsd.convert.lora import LoraInfo, write_lora
from jaxsd.pipelines.lora import lora_model
from jaxsd.pipelines.pipeline import StableDiffusion
from tests.convert.lora_tiny import random_lora
from tests.helpers import jaxsd_command
from tests.pipelines.conftest import (
    assert_images_close,
    assert_images_differ,
    lora_loaded,
    to_uint8,
)
from tests.pipelines.test_sample import NEGATIVE, PROMPT, _diffusers_scheduler, _latents

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS, GUIDANCE = 8, 7.5


@pytest.fixture(scope="module")
def lora_files(sd_pipe, tmp_path_factory):
    """Two LoRA files with the same layers (other values); the first records another base UNet."""
    model = lora_model(sd_pipe.pipe)
    folder = tmp_path_factory.mktemp("loras")
    files = []
    for seed, base in ((7, "0123456789abcdef"), (8, None)):
        path = folder / f"lora{seed}.safetensors"
        write_lora(path, random_lora(model, seed=seed), model, layout="kohya",
                   info=LoraInfo("sd1", rank=4, alpha=8, conv_rank=2, conv_alpha=1, base_unet_hash=base))
        files.append(path)
    return files


def _reference(pipe, latents, torch, **kw):
    pipe.scheduler = _diffusers_scheduler(pipe, "euler")
    return to_uint8(pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         latents=torch.from_numpy(latents), output_type="np", **kw).images)


def test_cli_sample_with_a_lora_at_scale_matches_diffusers(sd_folder, sd_reference, lora_files, tmp_path,
                                                           torch_single_thread):
    torch = torch_single_thread
    latents = _latents(1, seed=12)
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "lora.png"
    proc = jaxsd_command("sample", "--model", sd_folder, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                         "--steps", STEPS, "--guidance", GUIDANCE, "--scheduler", "euler", "--latents",
                         tmp_path / "latents.npy", "--lora", lora_files[0], "--lora-scale", "0.7", "--out", out)
    assert "applied 1 LoRA file(s)" in proc.stderr and "×0.7" in proc.stderr
    assert "LoraBaseWarning" in proc.stderr and "another base UNet" in proc.stderr  # a warning, not an error
    ours = np.asarray(Image.open(out))[None]

    with lora_loaded(sd_reference, lora_files[0]) as pipe:
        ref = _reference(pipe, latents, torch, cross_attention_kwargs={"scale": 0.7})
    assert_images_close(ours, ref)
    assert_images_differ(ours, _reference(sd_reference, latents, torch))  # the LoRA is visible



def test_cli_refuses_a_scale_count_that_differs_from_the_files(sd_folder, lora_files, tmp_path, capsys):
    rc = cli.main(["sample", "--model", str(sd_folder), "--prompt", PROMPT, "--lora", str(lora_files[0]),
                   "--lora", str(lora_files[1]), "--lora-scale", "0.5", "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "1 --lora-scale values for 2 --lora files" in capsys.readouterr().err


def test_scales_and_files_of_the_same_shapes_reuse_the_compiled_programs(sd_pipe, lora_files):
    pipe = StableDiffusion(sd_pipe.pipe)  # the session's loaded weights; its text encoders get adapters here
    try:
        _scale_and_file_changes(pipe, lora_files)
    finally:
        pipe.load_loras([])  # the shared text encoders without adapters again
    assert all(c.lora is None for c in sd_pipe.pipe.text.components)


def _scale_and_file_changes(pipe, lora_files):
    latents = _latents(1, seed=13)
    run = lambda: pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance=GUIDANCE,
                                sampler="euler", latents=latents)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second file records no base: no warning
        pipe.load_loras([lora_files[1]], [0.7])
    first = run()
    encoder = pipe.text._encode  # the jitted text encoding (LoRA variables are its arguments)
    programs = encoder._cache_size()
    images = [first]
    for change in (lambda: pipe.set_lora_scales([1.0]), lambda: pipe.set_lora_scales([0.0]),
                   lambda: pipe.load_loras([lora_files[0]], [0.7])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            change()
        images.append(run())
        assert pipe.last_compile_seconds == 0.0 and encoder._cache_size() == programs
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            assert np.abs(images[a].astype(int) - images[b].astype(int)).max() > 10, (a, b)


@pytest.mark.slow
def test_two_loras_at_once_match_diffusers_set_adapters(sd_folder, sd_reference, lora_files, torch_single_thread):
    torch = torch_single_thread
    latents = _latents(1, seed=14)
    pipe = StableDiffusion.from_folder(sd_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_loras(lora_files, [0.7, 0.4])
    ours = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                         latents=latents)
    with lora_loaded(sd_reference, *lora_files, weights=[0.7, 0.4]) as ref_pipe:
        ref = _reference(ref_pipe, latents, torch)
    assert_images_close(ours, ref)
    with lora_loaded(sd_reference, lora_files[0], weights=[0.7]) as ref_pipe:
        assert_images_differ(ours, _reference(ref_pipe, latents, torch))
