"""The `jaxsd` entry point: every command has help, overrides may follow options."""

import pytest

from jaxsd.cli import COMMANDS, main


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: jaxsd " + name), name


def test_overrides_after_options_are_collected(monkeypatch):
    import jaxsd.commands.cache as cache

    seen = {}
    monkeypatch.setattr(cache, "run", lambda args: seen.update(vars(args)) or 0)
    assert main(["cache", "cfg.yaml", "a.b=1", "--only", "text", "data.x=1"]) == 0
    assert seen["overrides"] == ["a.b=1", "data.x=1"] and seen["only"] == "text"


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "cfg.yaml", "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_train_reports_unusable_input_as_one_message(tmp_path, capsys):
    """A missing folder or an unconfigured cache stops `jaxsd train` with exit 2 and a message naming the
    setting — no traceback unless --traceback asks for it."""
    run = f"train.run_dir={tmp_path / 'run'}"
    cases = {
        (f"model.pretrained={tmp_path / 'nothing'}",): "FileNotFoundError: model.pretrained=",
        ("train.data_source=cache", f"data.roots=[{tmp_path}]"): "ValueError: set data.cache.vae and "
                                                                  "data.cache.text_encoder",
    }
    for overrides, message in cases.items():
        assert main(["train", "tiny", run, *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "add --traceback" in err, err
    with pytest.raises(FileNotFoundError, match="no unet/config.json"):
        main(["train", "tiny", "--traceback", run, f"model.pretrained={tmp_path / 'nothing'}"])
