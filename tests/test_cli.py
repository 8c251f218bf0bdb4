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
