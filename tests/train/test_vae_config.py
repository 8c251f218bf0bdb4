"""`model.kind: vae` and `loss.vae`: what a config may say, and the clear errors for what it may not."""

from __future__ import annotations

import jax
import pytest

from jaxsd.config import ShardingConfig, load_config
from jaxsd.errors import ConfigError
from jaxsd.train.sharding import make_mesh
from tests.helpers import jaxsd_command


def _load(*overrides: str):
    return load_config("vae_tiny", ["data.roots=[/nowhere]", *overrides])


def test_the_preset_loads_and_the_default_kind_is_the_unet():
    cfg = _load()
    assert cfg.model.kind == "vae" and cfg.loss.vae.disc_layers == 2 and cfg.model.vae["latent_channels"] == 4
    assert load_config("tiny").model.kind == "unet"


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.vae.kl_wieght=1"], "did you mean 'loss.vae.kl_weight'"),
    (["model.kind=vea"], "model.kind = 'vea' is not one of"),
    (["loss.vae.disc_loss=wgan"], "loss.vae.disc_loss = 'wgan' is not one of ('hinge', 'vanilla')"),
    (["loss.vae.reconstruction=l3"], "loss.vae.reconstruction"),
    (["loss.vae.kl_weight=-1"], "loss.vae.kl_weight = -1.0 must be >= 0"),
    (["loss.vae.disc_layers=0"], "disc_layers = 0"),
    (["loss.vae.train_encoder=false"], "train_encoder = false fine-tunes the decoder of a trained VAE"),
    (["loss.vae.lpips_weight=1"], "needs the VGG16 backbone: set loss.lpips.weights"),
    (["train.grad_accum_steps=2"], "does not go with: train.grad_accum_steps > 1"),
    (["train.data_source=synthetic"], "train.data_source = synthetic"),
    (["data.subsets=[{roots: [/a], loss_weight: 2.0}]"], "data.subsets with a loss_weight other than 1"),
    (["validation.every=5", "validation.roots=[/x]"], "validation.every > 0"),
    (["model.segmented_backward=true"], "does not go with: model.segmented_backward"),
])
def test_impossible_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    assert message in str(e.value)


def test_a_vae_needs_an_architecture():
    with pytest.raises(ConfigError, match="model.vae is empty and model.pretrained is not set"):
        load_config("tiny", ["model.kind=vae", "train.data_source=cache", "data.roots=[/nowhere]"])


def test_a_frozen_last_decoder_layer_is_refused_by_name():
    from jaxsd.train.plan import plan_state

    cfg = _load("train.frozen=[decoder/conv_out]")
    with pytest.raises(ConfigError, match="decoder/conv_out/kernel"):
        plan_state(cfg, make_mesh(ShardingConfig(data=1), jax.devices()[:1]))


def test_the_command_names_the_impossible_setting():
    proc = jaxsd_command("train", "vae_tiny", "data.roots=[/nowhere]", "loss.vae.train_encoder=false", check=False)
    assert proc.returncode == 2
    assert "loss.vae.train_encoder = false" in proc.stderr and "model.pretrained" in proc.stderr
    assert "Traceback" not in proc.stderr
