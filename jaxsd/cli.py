"""`jaxsd <command>`: the command-line entry point.

Each command lives in `jaxsd/commands/<name>.py` with two functions:
`add_arguments(parser)` and `run(args) -> int`. Commands are imported lazily so
`jaxsd --help` is instant and a command's heavy imports (jax, torch) only load
when it runs.

Errors follow one rule for every command, applied here: an `InputError` (jaxsd/errors.py:
a missing folder, a bad config value, a mismatched cache, ...) is printed as one message and
exits 2 (`--traceback` shows where it was raised); any other exception is a bug and keeps
its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxsd.errors import InputError
from jaxsd.models.conv_select import requested_implementation as requested_conv

# name -> one-line help. Order is the order users meet them in the data flow.
# Only commands that exist are listed: a new command adds its line with its module.
COMMANDS: dict[str, str] = {
    "demo": "train a tiny text-to-image model from scratch on the CPU and show it follows prompts",
    "cache": "encode images and captions into cached latents and text embeddings",
    "dreambooth-classes": "generate (and cache) DreamBooth's missing class images with the base model",
    "train": "train (fine-tune or from scratch) a UNet over cached latents",
    "sample": "generate images from a diffusers pipeline folder",
    "export": "write a training checkpoint as a diffusers folder, or a LoRA run's adapters as a LoRA file",
    "eval": "image metrics: PSNR/SSIM/LPIPS of image pairs, FID statistics of a folder, a model's FID and CLIP score",
    "compare": "compare training runs side by side: loss curves, sample grids, config differences (HTML)",
    "convert": "convert single-file checkpoints (A1111/ComfyUI .safetensors) to diffusers folders and back",
    "bench": "side-by-side benchmarks against diffusers PyTorch",
}
TRACEBACK_HINT = "(add --traceback to see where this was raised)"


def _add_traceback_option(parser: argparse.ArgumentParser) -> None:
    """--traceback on `parser` and on every sub-parser below it (e.g. `jaxsd bench SUITE`), so it may
    follow any part of the command line. SUPPRESS: a sub-parser's default must not reset a given flag."""
    parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="on an input error (missing folder, bad config value, mismatched cache, ...) "
                             "show the Python traceback too, not just the message")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_traceback_option(child)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `jaxsd`: every command listed with its help line, and `command`'s own options. Only
    that command's module is imported (some import a lot to list their options: `bench` imports each of
    its suites), so a command starts without the others' imports."""
    parser = argparse.ArgumentParser(
        prog="jaxsd",
        description="Train Stable Diffusion family models in JAX/Flax; export diffusers folders.",
        epilog="Run `jaxsd <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_text in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"jaxsd.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        _add_traceback_option(p)
        p.set_defaults(_module=module)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the command is the first word: `jaxsd` itself takes no option with a value
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    # Dotted overrides may follow options (`jaxsd train cfg.yaml --x y key=v`): argparse
    # stops filling a positional list at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
    return args


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; its exceptions, InputError included, propagate."""
    return int(args._module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        return 0
    try:
        requested_conv()  # $JAXSD_CONV is input too: refuse a bad value before any work
        return run_command(args)
    except InputError as e:
        if getattr(args, "traceback", False):
            raise
        print(f"jaxsd {args.command}: {type(e).__name__}: {e}\n{TRACEBACK_HINT}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
