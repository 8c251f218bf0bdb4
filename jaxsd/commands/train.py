"""Train (fine-tune or from scratch) a UNet over cached latents.

    jaxsd train CONFIG.yaml [key.sub=value ...]

CONFIG is a YAML file or the name of a preset in configs/. Overrides use dotted
keys of the schema in jaxsd/config.py, e.g. `train.steps=200 optimizer.name=adamw8bit`.
Everything lands in `train.run_dir`: config.yaml (the resolved config), checkpoints/,
tensorboard/, metrics.jsonl, train.log. Running the same command again resumes.
Init order: resume from run_dir → model.pretrained (diffusers folder) → from scratch.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys

# What jaxsd raises for input it cannot use — a missing or odd folder, a mismatched cache, a config
# value the components do not fit (ConfigError, CacheMismatch, PipelineFolderError, ... all derive
# from these): reported as one message that says what to change. Other exceptions are bugs and keep
# their traceback.
INPUT_ERRORS = (ValueError, OSError, KeyError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxsd.config import list_presets
    parser.add_argument("config", help=f"YAML config file or preset name; presets: {', '.join(list_presets())}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    parser.add_argument("--traceback", action="store_true",
                        help="on an input error (missing folder, mismatched cache, ...) show the Python traceback "
                             "too, not just the message")
    parser.epilog = "presets (configs/): " + ", ".join(list_presets())


def run(args: argparse.Namespace) -> int:
    from jaxsd.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"jaxsd train: {e}", file=sys.stderr)
        return 2
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    from jaxsd.train.loop import train
    try:
        result = train(cfg)
    except INPUT_ERRORS as e:
        if args.traceback:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"jaxsd train: {type(e).__name__}: {message}\n(add --traceback to see where this was raised)",
              file=sys.stderr)
        return 2
    print(f"jaxsd train: {result.stopped} at step {result.step} ({result.init_from}); run dir {cfg.train.run_dir}")
    return 0 if result.stopped in ("done", "signal") else 1
