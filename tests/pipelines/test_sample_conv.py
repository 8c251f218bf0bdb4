"""`JAXSD_CONV` where a user meets it: `jaxsd sample` with every k×k conv forced onto the im2col matmul
draws diffusers' image (uint8 within 0.3 mean / 3 max), and an unknown value is one message, exit 2,
before any work."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxsd import cli
from tests.helpers import jaxsd_command
from tests.pipelines.conftest import assert_images_close
from tests.pipelines.test_sample_schedulers import NEGATIVE, PROMPT, STEPS, _reference

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.mark.torch
def test_cli_sample_on_im2col_draws_diffusers_image(sd_folder, sd_reference, tmp_path, torch_single_thread):
    latents = np.random.default_rng(11).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    jaxsd_command("sample", "--model", sd_folder, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                  "--steps", STEPS, "--latents", tmp_path / "latents.npy", "--scheduler", "ddim",
                  "--out", tmp_path / "im2col.png", env={"JAXSD_CONV": "im2col"})
    ours = np.asarray(Image.open(tmp_path / "im2col.png"))[None]
    assert_images_close(ours, _reference(sd_reference, "ddim", latents, torch_single_thread))


def test_cli_refuses_an_unknown_conv_lowering(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("JAXSD_CONV", "fast")
    assert cli.main(["sample", "--model", str(tmp_path / "absent"), "--prompt", PROMPT,
                     "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "$JAXSD_CONV: convolution implementation 'fast' unknown" in err and "'im2col'" in err
