"""`jaxsd bench conv-ab` (one train step per convolution lowering, interleaved) and the `demo` UNet
preset it times by default."""

from __future__ import annotations

import json

import pytest

from bench.presets import input_shapes, unet_preset
from tests.helpers import jaxsd_command


def test_demo_preset_is_the_demos_unet():
    from jaxsd.demo.run import unet_config
    from jaxsd.demo.settings import DemoSettings
    from jaxsd.demo.tokenizer import MAX_LENGTH

    cfg = unet_preset("demo")
    assert cfg == unet_config(DemoSettings())
    assert input_shapes(cfg, 64, 8)["encoder_hidden_states"] == (64, MAX_LENGTH, 32)
    assert input_shapes(unet_preset("tiny"), 1, 8)["encoder_hidden_states"][1] == 77


@pytest.mark.slow  # two micro train steps compiled (~90 s at load 6)
def test_conv_ab_compiles_each_lowering_and_times_them(tmp_path):
    path = tmp_path / "ab.jsonl"
    jaxsd_command("bench", "conv-ab", "--preset", "micro", "--batch", "1", "--conv", "xla,im2col",
                  "--repeats", "2", "--warmup", "0", "--json", path)
    xla, im2col = (json.loads(line) for line in path.read_text().splitlines())
    assert (xla["config"]["conv"], im2col["config"]["conv"]) == ("xla", "im2col")
    # the im2col program has no convolution left (the suite refuses one that has); XLA's has them all
    assert xla["jaxsd"]["convolutions"] > 0 == im2col["jaxsd"]["convolutions"]
    assert xla["vs_xla"]["step_s"] == 1.0 and im2col["vs_xla"]["step_s"] > 0
    assert im2col["jaxsd"]["step_s"]["n"] == 2 and im2col["jaxsd"]["temp_gb"] > 0


def test_conv_ab_needs_two_lowerings():
    proc = jaxsd_command("bench", "conv-ab", "--conv", "xla", check=False)
    assert proc.returncode == 2 and "--conv takes two or more distinct names" in proc.stderr
