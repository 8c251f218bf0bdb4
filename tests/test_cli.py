"""The `jaxsd` entry point: the commands it lists exist, every one has help and --traceback, overrides
may follow options, and one error rule for every command: an InputError is one message and exit 2;
anything else is a bug and keeps its traceback."""

import os
import re
from pathlib import Path

import pytest

import jaxsd.commands
from jaxsd.cli import COMMANDS, TRACEBACK_HINT, main
from tests.helpers import REPO, jaxsd_command


def test_help_lists_exactly_the_implemented_commands(capsys):
    """`jaxsd --help` names each command that has a module, and nothing that is not built."""
    modules = {p.stem.replace("_", "-") for p in Path(jaxsd.commands.__file__).parent.glob("*.py")
               if p.stem != "__init__"}  # commands/dreambooth_classes.py is `jaxsd dreambooth-classes`
    assert set(COMMANDS) == modules
    assert main([]) == 0
    out = capsys.readouterr().out
    listed = set(re.findall(r"^    ([\w-]+)\s", out, flags=re.MULTILINE))
    assert listed == modules, out
    assert not re.search(r"not available|not implemented", out, flags=re.IGNORECASE), out


def test_every_command_has_help_and_traceback(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: jaxsd " + name), name
        assert "--traceback" in out, name
        assert not re.search(r"not available yet", out, flags=re.IGNORECASE), (name, out)


def test_overrides_after_options_are_collected(monkeypatch):
    from jaxsd.commands import cache

    seen = {}
    monkeypatch.setattr(cache, "run", lambda args: seen.update(vars(args)) or 0)
    assert main(["cache", "cfg.yaml", "a.b=1", "--only", "text", "data.x=1"]) == 0
    assert seen["overrides"] == ["a.b=1", "data.x=1"] and seen["only"] == "text"


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "cfg.yaml", "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def _input_error_cases(tmp: Path) -> dict:
    """command -> (argv that gives an input error, the error type and message it must print)."""
    user_folder = tmp / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("not the demo's")
    run = f"train.run_dir={tmp / 'run'}"
    return {
        "demo": (["demo", "--out", str(user_folder)], "InputError: --out"),
        "cache": (["cache", "tiny", f"data.roots=[{tmp / 'nothing'}]", "--validate-only"],
                  f"InputNotFoundError: data root {tmp / 'nothing'} does not exist"),
        "train": (["train", "tiny", run, f"model.pretrained={tmp / 'nothing'}"],
                  "InputNotFoundError: model.pretrained="),
        "sample": (["sample", "--model", str(tmp / "nothing"), "--prompt", "x", "--out", str(tmp / "a.png")],
                   "PipelineFolderError: "),
        # commands/export.py reports its own errors until its rewrite; the type name then joins the message
        "export": (["export", str(tmp), "--out", str(tmp / "out")], ""),
        "bench": (["bench", "optimizer-state", "--optimizers", "nope"], "InputError: --optimizers 'nope'"),
        "convert": (["convert", str(tmp / "nothing.safetensors"), "--out", str(tmp / "out")],
                    f"SingleFileError: {tmp / 'nothing.safetensors'}: no such file"),
        "dreambooth-classes": (["dreambooth-classes", "tiny", run], "ConfigError: dreambooth.class_prompt is not set"),
        "eval": (["eval", "--pairs", str(tmp / "nothing"), str(tmp), "--out", str(tmp / "ev")],
                 f"InputNotFoundError: {tmp / 'nothing'}: no such folder"),
        "compare": (["compare", str(user_folder), str(tmp), "--out", str(tmp / "cmp")],
                    f"InputError: {user_folder}: no metrics.jsonl or config.yaml"),
    }


@pytest.mark.parametrize("command", list(COMMANDS))
def test_input_error_is_one_message_and_exit_2(command, tmp_path, capsys):
    argv, message = _input_error_cases(tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    mine = [line for line in err.splitlines() if line.startswith(f"jaxsd {command}: ")]
    assert len(mine) == 1 and mine[0].startswith(f"jaxsd {command}: {message}"), err
    assert "Traceback" not in err, err
    if command != "export":
        assert TRACEBACK_HINT in err, err


def test_traceback_flag_reraises_the_input_error(tmp_path):
    cases = _input_error_cases(tmp_path)
    with pytest.raises(FileNotFoundError, match="no unet/config.json"):
        main([*cases["train"][0], "--traceback"])
    with pytest.raises(ValueError, match="--optimizers 'nope'"):  # after a nested sub-command too
        main([*cases["bench"][0], "--traceback"])


def _bug(*args, **kwargs):
    raise ValueError("bug: not an input error")


# command -> (where the bug is planted, an argv that reaches it)
BUG_SITES = {
    "demo": ("jaxsd.demo.run.run_demo", ["demo", "--out", "{tmp}/demo"]),
    "cache": ("jaxsd.data.config.load_data_config", ["cache", "tiny", "data.roots=[{tmp}]"]),
    "train": ("jaxsd.train.loop.train", ["train", "tiny", "train.run_dir={tmp}/run"]),
    "sample": ("jaxsd.pipelines.pipeline.StableDiffusion.from_folder",
               ["sample", "--model", "{tmp}", "--prompt", "x", "--out", "{tmp}/a.png"]),
    "export": ("jaxsd.train.export_vae.run_model_kind", ["export", "{tmp}", "--out", "{tmp}/out"]),
    "bench": ("bench.suites.optimizer_state.run", ["bench", "optimizer-state", "--no-record"]),
    "convert": ("jaxsd.convert.single_file.read.SingleFile", ["convert", "{tmp}/x.safetensors", "--out", "{tmp}/out"]),
    "dreambooth-classes": ("jaxsd.train.dreambooth.prepare_class_images",
                           ["dreambooth-classes", "tiny", "dreambooth.class_prompt=a dog", "dreambooth.class_dir={tmp}/c"]),
    "eval": ("jaxsd.metrics.pairs.find_pairs", ["eval", "--pairs", "{tmp}", "{tmp}", "--out", "{tmp}/ev"]),
    "compare": ("jaxsd.compare.runs.load_run", ["compare", "{tmp}", "{tmp}", "--out", "{tmp}/cmp"]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bug_keeps_its_exception(command, tmp_path, monkeypatch):
    target, argv = BUG_SITES[command]
    monkeypatch.setattr(target, _bug)
    with pytest.raises(ValueError, match="bug: not an input error"):
        main([a.format(tmp=tmp_path) for a in argv])


def test_console_script_exit_codes(tmp_path):
    """Through the installed `jaxsd` script: an input error prints exactly one message (exit 2); a bug
    prints its traceback (exit 1); so does an input error with --traceback."""
    missing = tmp_path / "nothing"
    argv = ["cache", "tiny", f"data.roots=[{missing}]", "--validate-only"]
    proc = jaxsd_command(*argv, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"jaxsd cache: InputNotFoundError: data root {missing} does not exist or is not a "
                           "directory (set data.roots to folders of foo.jpg + foo.txt pairs)\n"
                           f"{TRACEBACK_HINT}\n"), proc.stderr

    proc = jaxsd_command(*argv, "--traceback", check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("jaxsd.errors.InputNotFoundError: data root")

    # a bug planted before the command runs: sitecustomize is imported at interpreter start-up
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import jaxsd.data.config\n"
        "def _bug(*args, **kwargs):\n"
        "    raise ValueError('bug: not an input error')\n"
        "jaxsd.data.config.load_data_config = _bug\n")
    env = {"PYTHONPATH": os.pathsep.join([str(plant), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = jaxsd_command(*argv, env=env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("ValueError: bug: not an input error")
    assert TRACEBACK_HINT not in proc.stderr


def test_bench_without_torch_says_how_to_get_it(monkeypatch, capsys):
    """`make demo` installs no torch: a torch-side benchmark then names what is missing and the way out."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "torch" else real(name, *a, **k))
    assert main(["bench", "train-step", "--preset", "micro"]) == 2
    err = capsys.readouterr().err
    assert "InputError: --frameworks jaxsd,torch needs torch, not installed" in err and "--frameworks jaxsd" in err
