"""bench/demo_step_ab.py times the step `jaxsd demo` trains: its synthetic-data config must stay the demo's."""

from __future__ import annotations

from bench.demo_step_ab import demo_like_config
from jaxsd.demo.run import DemoState, demo_config
from jaxsd.demo.settings import DemoSettings
from jaxsd.demo.tokenizer import MAX_LENGTH


def test_synthetic_config_trains_the_demos_step(tmp_path):
    ours = demo_like_config(str(tmp_path / "run"), steps=100, data=None)
    demo = demo_config(DemoState(tmp_path, DemoSettings(), print))
    for section in ("model", "diffusion", "loss", "optimizer"):
        assert ours[section] == demo[section], section
    for key in ("batch_size", "seed", "ema"):
        assert ours["train"][key] == demo["train"][key], key
    synthetic = ours["synthetic"]
    assert (synthetic["latent_size"], synthetic["latent_channels"]) == (8, demo["model"]["unet"]["in_channels"])
    assert (synthetic["text_len"], synthetic["text_dim"]) == (MAX_LENGTH, demo["model"]["unet"]["cross_attention_dim"])
    assert synthetic["num_examples"] == DemoSettings().train_images
