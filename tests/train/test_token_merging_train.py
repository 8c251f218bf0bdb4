"""`model.token_merging` in training: the config key reaches the UNet of the train step, and a run trains with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxsd.config import load_config
from jaxsd.errors import ConfigError
from jaxsd.models.token_merging import TokenMerging
from jaxsd.train.model import build_unet, unet_config
from tests.helpers import jaxsd_command


def test_config_key_reaches_the_unet_and_ratio_zero_is_off():
    cfg = load_config("tiny", ["model.token_merging.ratio=0.5", "model.token_merging.use_rand=false"])
    assert build_unet(cfg.model, unet_config(cfg.model)).token_merging == TokenMerging(ratio=0.5, use_rand=False)
    plain = load_config("tiny")
    assert plain.model.token_merging.ratio == 0.0
    assert build_unet(plain.model, unet_config(plain.model)).token_merging is None


def test_bad_ratio_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model.token_merging.ratio=0.9 must be in \[0, 0.75\]"):
        load_config("tiny", ["model.token_merging.ratio=0.9"])


@pytest.mark.slow  # compiling the tiny UNet's train step takes ~30-45 s on the shared CPUs
def test_jaxsd_train_runs_with_token_merging(tmp_path):
    run_dir = tmp_path / "run"
    jaxsd_command("train", "tiny", "train.steps=2", "train.batch_size=2", "model.token_merging.ratio=0.5",
                  f"train.run_dir={run_dir}", "checkpoint.every=2", "logging.every=1",
                  "logging.progress_bar=false")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["skipped"] == 0 for r in logged)
    assert "token_merging" in (run_dir / "config.yaml").read_text()
