"""`jaxsd cache` → `jaxsd train` with the UNet's perceptual terms (loss.perceptual): a random VGG16 + LPIPS heads
file in the real key layout and style images; the run logs loss_lpips / loss_style on the steps of the `every`
grid (0 off it), its checkpoints hold the UNet's state alone (the VAE decoder and VGG16 are reloaded), and a resume
reloads them and goes on."""

from __future__ import annotations

import jax
import pytest

from jaxsd.config import CheckpointConfig
from jaxsd.train.checkpoint import Checkpointer
from tests.helpers import jaxsd_command
from tests.train.cli_runs import ENV, records
from tests.train.perceptual_files import save_random_lpips, save_style_images

OVERRIDES = ["loss.style.layers=[relu1_2,relu2_2]", "loss.perceptual.lpips_weight=0.5", "loss.perceptual.style_weight=2.0",
             "loss.perceptual.every=2", "loss.perceptual.max_timestep=999"]


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A 2-step run with both terms (every=2, every sample qualifies) on the shared tiny run's pipeline and cache
    (tests/train/tiny_run.py): (config, its overrides, run dir)."""
    base = tmp_path_factory.mktemp("perceptual_cli")
    lpips = save_random_lpips(base / "lpips_vgg16.safetensors")
    style = save_style_images(base / "style")
    overrides = [f"train.run_dir={base / 'run'}", "train.steps=2", "train.ema.enabled=false", "logging.sample_every=0",
                 f"loss.lpips.weights={lpips}", f"loss.style.references=[{style}]", *OVERRIDES]
    jaxsd_command("train", tiny_run.yaml, *overrides, env=ENV)
    return tiny_run.yaml, overrides, base / "run"


def test_train_with_lpips_and_style_terms_logs_them_and_checkpoints_no_vgg_or_vae(run):
    _, _, run_dir = run
    logged = records(run_dir)
    assert [r["step"] for r in logged] == [1, 2]
    first, second = logged
    # step 1 (0-based step 0) is on the every=2 grid, every sample qualifies (t <= 999); step 2 is off it
    assert first["perceptual_samples"] == 2 and first["loss_lpips"] > 0 and first["loss_style"] > 0
    assert first["loss"] > first["loss_raw"]  # the weighted terms are part of the optimised loss
    assert second["perceptual_samples"] == 0 and second["loss_lpips"] == 0 and second["loss_style"] == 0

    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig())
    stored = ckpt.manager.item_metadata(2)["state"]
    ckpt.close()
    assert "frozen" not in stored
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(stored["params"])[0]}
    assert paths and not any(k in p for p in paths for k in ("features_", "lin0", "decoder", "perceptual"))


@pytest.mark.slow
def test_resume_reloads_the_frozen_vae_decoder_and_vgg(run):
    yaml, overrides, run_dir = run
    jaxsd_command("train", yaml, *overrides, "train.steps=3", env=ENV)
    third = records(run_dir)[-1]
    assert third["step"] == 3 and third["perceptual_samples"] == 2 and third["loss_lpips"] > 0
    assert "resumed from checkpoint step 2" in (run_dir / "train.log").read_text()
