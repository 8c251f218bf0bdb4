"""`jaxsd <command>`: the command-line entry point.

Each command lives in `jaxsd/commands/<name>.py` with two functions:
`add_arguments(parser)` and `run(args) -> int`. Commands are imported lazily so
`jaxsd --help` is instant and a command's heavy imports (jax, torch) only load
when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help. Order is the order users meet them in the data flow.
COMMANDS: dict[str, str] = {
    "demo": "train a tiny text-to-image model from scratch on the CPU and show it follows prompts",
    "cache": "encode images and captions into cached latents and text embeddings",
    "train": "train (fine-tune or from scratch) a UNet over cached latents",
    "sample": "generate images from a diffusers pipeline folder",
    "export": "write a training checkpoint as a diffusers folder or LoRA file",
    "convert": "convert between diffusers folders and other weight layouts",
    "compare": "compare jaxsd and diffusers PyTorch outputs on the same folder",
    "bench": "side-by-side benchmarks against diffusers PyTorch",
}


def _load(name: str):
    try:
        return importlib.import_module(f"jaxsd.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"jaxsd.commands.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsd",
        description="Train Stable Diffusion family models in JAX/Flax; export diffusers folders and LoRA files.",
        epilog="Run `jaxsd <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_text in COMMANDS.items():
        module = _load(name)
        available = module is not None
        p = sub.add_parser(name, help=help_text if available else f"{help_text} (not available yet)",
                           description=(module.__doc__ if available else help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if available:
            module.add_arguments(p)
        p.set_defaults(_module=module, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        return 0
    if args._module is None:
        print(f"jaxsd {args._name}: this command is not implemented in this version of jaxsd yet.", file=sys.stderr)
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
