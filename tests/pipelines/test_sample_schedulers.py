"""`jaxsd sample --scheduler` with the second round of samplers, end to end against diffusers' pipeline
with the same scheduler (`Class.from_config(folder config, **overrides)`), same latents and, for the
stochastic ones, the same per-step noise: `auto` (the default; the tiny SD folder's own PNDM) and
DPM++ 2M SDE Karras. uint8 images within 0.3 mean / 3 max levels."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd import cli
from jaxsd.diffusion.samplers import resolve_sampler_name
from jaxsd.pipelines import generate as generate_module
from jaxsd.pipelines.generate import split_run_key
from jaxsd.pipelines.pipeline import generation_keys
from tests.diffusion.parity import diffusers_scheduler
from tests.helpers import jaxsd_command
from tests.pipelines.conftest import assert_images_close, assert_images_differ, to_uint8

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT, NEGATIVE, STEPS = "a photo of a cat", "a dog", 6


def _reference(pipe, name, latents, torch, steps=STEPS):
    pipe.scheduler = diffusers_scheduler(name, pipe.folder_scheduler_config)
    try:
        images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                      latents=torch.from_numpy(latents), output_type="np").images
    finally:
        pipe.scheduler = diffusers_scheduler("pndm", pipe.folder_scheduler_config)
    return to_uint8(images)


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("latents") / "latents.npy"
    np.save(path, np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32))
    return path


@pytest.mark.slow  # ~12 s; every default-run `jaxsd sample` test runs --scheduler auto, PNDM's steps are checked in-process
def test_cli_default_auto_runs_the_folders_pndm_as_diffusers(sd_folder, sd_reference, latents_file, tmp_path,
                                                               torch_single_thread):
    """The folder ships PNDMScheduler (skip_prk_steps): `jaxsd sample` without --scheduler (auto, the
    default) runs it as PLMS — n + 1 model calls, n steps on the bar — and draws diffusers' image."""
    latents = np.load(latents_file)
    proc = jaxsd_command("sample", "--model", sd_folder, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                         "--steps", STEPS, "--latents", latents_file, "--out", tmp_path / "auto.png")
    assert f"{STEPS}/{STEPS}" in proc.stderr and f"{STEPS} steps, pndm)" in proc.stdout
    ours = np.asarray(Image.open(tmp_path / "auto.png"))[None]
    ref = _reference(sd_reference, "pndm", latents, torch_single_thread)
    assert_images_close(ours, ref)
    assert_images_differ(ours, _reference(sd_reference, "euler", latents, torch_single_thread))
    # `--scheduler pndm` and the A1111 name are the same sampler (their images: tests/diffusion parity)
    assert {resolve_sampler_name(n, {}) for n in ("pndm", "PLMS", "plms")} == {"pndm"}


def _our_noise(seed: int, calls: int, shape_nhwc: tuple[int, ...]) -> list[np.ndarray]:
    """The per-call sampler noise `jaxsd sample --seed` draws (denoise: normal(fold_in(key, i))), NCHW."""
    _, sample_key = split_run_key(generation_keys(seed)[1])
    return [np.asarray(jax.random.normal(jax.random.fold_in(sample_key, i), shape_nhwc)).transpose(0, 3, 1, 2)
            for i in range(calls)]


def test_cli_sde_sampler_matches_diffusers_with_the_same_noise(sd_folder, sd_reference, sd_pipe, latents_file,
                                                               tmp_path, monkeypatch, torch_single_thread):
    """DPM++ 2M SDE Karras (A1111 display name on the command line): diffusers draws its per-step noise
    from our seed's stream; another seed changes the image and does not recompile."""
    torch = torch_single_thread
    from diffusers.schedulers import scheduling_dpmsolver_multistep

    out = tmp_path / "sde.png"
    assert cli.main(["sample", "--model", str(sd_folder), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                     "--steps", str(STEPS), "--latents", str(latents_file), "--scheduler", "DPM++ 2M SDE Karras",
                     "--seed", "3", "--out", str(out)]) == 0
    ours = np.asarray(Image.open(out))[None]
    queue = _our_noise(3, STEPS, (1, 8, 8, 4))
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "randn_tensor",
                        lambda shape, **k: torch.from_numpy(queue.pop(0).copy()).to(k.get("dtype") or torch.float32))
    ref = _reference(sd_reference, "dpmpp_2m_sde_karras", np.load(latents_file), torch)
    assert not queue  # one draw per step
    assert_images_close(ours, ref)

    latents = np.load(latents_file)
    # (the CLI's program also returns the latents: this call may compile the images-only one once)
    again = sd_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="dpmpp_2m_sde_karras", seed=3,
                             latents=latents)
    before = len(generate_module._COMPILED)
    other = sd_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="dpmpp_2m_sde_karras", seed=4,
                             latents=latents)
    assert np.array_equal(again, ours)
    assert sd_pipe.last_compile_seconds == 0.0 and len(generate_module._COMPILED) == before  # seed: no recompile
    assert_images_differ(other, ref)


def test_cli_auto_names_a_scheduler_class_it_cannot_run(sd_folder, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "kdpm2"
    shutil.copytree(sd_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "KDPM2DiscreteScheduler"}))
    assert cli.main(["sample", "--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "scheduler class KDPM2DiscreteScheduler is not implemented in jaxsd" in err
    assert "pass --scheduler explicitly, one of: ddim, ddpm, pndm, lms" in err
