"""Train (fine-tune or from scratch) a UNet over cached latents, or with `model.kind: vae` the VAE on images
(docs/vae-training.md).

    jaxsd train CONFIG.yaml [key.sub=value ...]

CONFIG is a YAML file or the name of a preset in configs/. Overrides use dotted
keys of the schema in jaxsd/config_schema.py, e.g. `train.steps=200 optimizer.name=adamw8bit`.
Everything lands in `train.run_dir` (a local path or gs://BUCKET/PATH): config.yaml (the resolved
config), checkpoints/, tensorboard/, metrics.jsonl, train.log. Running the same command again resumes.
Init order: resume from run_dir → model.pretrained (diffusers folder) → from scratch.
See docs/training.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxsd.config import list_presets
    parser.add_argument("config", help=f"YAML config file or preset name; presets: {', '.join(list_presets())}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    parser.epilog = "presets (configs/): " + ", ".join(list_presets())


def run(args: argparse.Namespace) -> int:
    from jaxsd.config import load_config
    cfg = load_config(args.config, args.overrides)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    for name in cfg.logging.debug:
        logging.getLogger(name).setLevel(logging.DEBUG)
    from jaxsd.train.loop import train
    result = train(cfg)
    print(f"jaxsd train: {result.stopped} at step {result.step} ({result.init_from}); run dir {cfg.train.run_dir}")
    return 0 if result.stopped in ("done", "signal") else 1
