"""`jaxsd sample --scheduler euler_a --eta`: eta 0 removes the ancestral noise, so the image is the plain
Euler sampler's (diffusers' EulerDiscreteScheduler pipeline, same latents; uint8 within 0.3 mean / 3 max),
and far from the default (eta 1 = diffusers' EulerAncestralDiscreteScheduler)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxsd import cli
from tests.helpers import jaxsd_command
from tests.pipelines.conftest import assert_images_close, assert_images_differ
from tests.pipelines.test_sample_schedulers import NEGATIVE, PROMPT, STEPS, _reference

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.mark.slow  # ~10 s; --eta through the CLI runs by default with ddim (test_generation_options.py)
def test_cli_euler_a_eta_zero_is_euler(sd_folder, sd_reference, tmp_path, torch_single_thread):
    torch = torch_single_thread
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    jaxsd_command("sample", "--model", sd_folder, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                  "--steps", STEPS, "--latents", tmp_path / "latents.npy", "--scheduler", "euler_a",
                  "--eta", 0, "--seed", 3, "--out", tmp_path / "eta0.png")
    ours = np.asarray(Image.open(tmp_path / "eta0.png"))[None]
    assert_images_close(ours, _reference(sd_reference, "euler", latents, torch))
    # the sensitivity check: diffusers' ancestral sampler (eta 1, its own noise) draws another image
    torch.manual_seed(0)
    assert_images_differ(ours, _reference(sd_reference, "euler_a", latents, torch))


def test_cli_refuses_a_negative_eta(sd_folder, tmp_path, capsys):
    assert cli.main(["sample", "--model", str(sd_folder), "--prompt", PROMPT, "--scheduler", "euler_a",
                     "--eta", "-1", "--out", str(tmp_path / "x.png")]) == 2
    assert "--eta must be >= 0" in capsys.readouterr().err
