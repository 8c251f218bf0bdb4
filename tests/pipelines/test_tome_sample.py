"""Token merging where the user meets it: `jaxsd sample --tome`, and a ToMe pipeline vs diffusers + tomesd."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxsd.models.token_merging import TokenMerging
from jaxsd.pipelines.pipeline import StableDiffusion
from tests.helpers import jaxsd_command
from tests.pipelines.conftest import assert_images_close, assert_images_differ, to_uint8
from tests.pipelines.test_sample import _diffusers_scheduler

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT, STEPS = "a photo of a cat", 10


def _latents() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)


def test_cli_sample_with_tome_runs_and_merges(sd_folder, sd_pipe, tmp_path):
    np.save(tmp_path / "latents.npy", _latents())
    out = tmp_path / "tome.png"
    jaxsd_command("sample", "--model", sd_folder, "--prompt", PROMPT, "--steps", STEPS, "--latents",
                  tmp_path / "latents.npy", "--tome", "0.5", "--out", out)
    merged = np.asarray(Image.open(out))
    plain = sd_pipe.generate(PROMPT, steps=STEPS, latents=_latents())[0]
    d = np.abs(merged.astype(np.int32) - plain.astype(np.int32))
    assert d.mean() > 0.5, f"--tome 0.5 changed the image only by mean {d.mean():.3f} levels"

    bad = jaxsd_command("sample", "--model", sd_folder, "--prompt", PROMPT, "--tome", "0.9", "--out", out,
                        check=False)
    assert bad.returncode == 2 and "--tome 0.9 must be in [0, 0.75]" in bad.stderr


@pytest.mark.slow  # ~6 s; the UNet with ToMe equals tomesd's by default (tests/models/test_token_merging.py)
def test_tome_pipeline_matches_diffusers_with_tomesd(sd_folder, sd_reference, sd_pipe, torch_single_thread):
    tomesd = pytest.importorskip("tomesd")
    torch = torch_single_thread

    pipe = StableDiffusion.from_folder(sd_folder, token_merging=TokenMerging(ratio=0.5, use_rand=False))
    ours = pipe.generate(PROMPT, steps=STEPS, latents=_latents(), sampler="dpmpp_2m")
    sd_reference.scheduler = _diffusers_scheduler(sd_reference, "dpmpp_2m")
    tomesd.apply_patch(sd_reference, ratio=0.5, use_rand=False)
    try:
        ref = to_uint8(sd_reference(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5,
                                    latents=torch.from_numpy(_latents()), output_type="np").images)
    finally:
        tomesd.remove_patch(sd_reference)
    assert_images_close(ours, ref)
    # without merging (the CLI test's compiled program) the same run misses that tolerance by far
    assert_images_differ(sd_pipe.generate(PROMPT, steps=STEPS, latents=_latents()), ref)
