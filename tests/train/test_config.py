"""Config schema: presets load, overrides apply, errors name the key and the nearest valid one."""

import pytest

from jaxsd.config import Config, ConfigError, from_yaml_text, list_presets, load_config, to_yaml


def test_all_presets_load_with_their_architecture():
    assert {"tiny", "sd15", "sd2", "sdxl", "sd15_t5"} <= set(list_presets())
    dims = {p: load_config(p).model.unet["cross_attention_dim"] for p in ("sd15", "sd2", "sdxl", "sd15_t5")}
    assert dims == {"sd15": 768, "sd2": 1024, "sdxl": 2048, "sd15_t5": 4096}
    assert load_config("sd2").diffusion.prediction_type == "v_prediction"
    assert load_config("sdxl").model.unet["addition_embed_type"] == "text_time"


def test_overrides_and_round_trip():
    cfg = load_config("tiny", ["optimizer.learning_rate=3e-4", "train.trainable=[attn,to_q]",
                               "sharding.rules.embed=null", "model.unet.layers_per_block=2"])
    assert cfg.optimizer.learning_rate == 3e-4 and cfg.train.trainable == ["attn", "to_q"]
    assert cfg.sharding.rules["embed"] is None and cfg.model.unet["layers_per_block"] == 2
    assert isinstance(cfg, Config) and from_yaml_text(to_yaml(cfg)) == cfg


def test_on_off_choices_survive_yaml_booleans(tmp_path):
    # YAML 1.1 reads on/off as booleans; sharding.distributed=on must still mean "on"
    assert load_config("tiny", ["sharding.distributed=on"]).sharding.distributed == "on"
    (tmp_path / "c.yaml").write_text("sharding:\n  distributed: off\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.sharding.distributed == "off" and from_yaml_text(to_yaml(cfg)) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("optimzer.name=lion", "unknown config key 'optimzer'; did you mean 'optimizer'?"),
    ("loss.min_snr_gama=5", "did you mean 'loss.min_snr_gamma'?"),
    ("train.steps=many", "wrong type for config key 'train.steps'"),
    ("optimizer.name=adamw9bit", "'optimizer.name' = 'adamw9bit' is not one of"),
    ("train.steps", "must look like key.sub=value"),
    ("train.steps_in_flight=-1", "train.steps_in_flight = -1 must be >= 0"),
    ("checkpoint.every=0", "checkpoint.every = 0 must be >= 1"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert message in str(e.value)


def test_bad_yaml_key_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.batch_sise'; did you mean "
                                          r"'train.batch_size'"):
        load_config(p)
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("no_such_preset")


def test_train_command_help_lists_presets():
    import argparse

    from jaxsd.commands import train
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert "sd15_t5" in parser.format_help() and "tiny" in parser.format_help()
