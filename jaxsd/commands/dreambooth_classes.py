"""Generate DreamBooth's missing class images with the base model and cache them.

    jaxsd dreambooth-classes CONFIG [key.sub=value ...]

Reads the `dreambooth:` section (class_prompt, class_dir, num_class_images, the sampler settings,
model: the base pipeline folder, default model.pretrained) and `data.cache` (the models that cache
them). Only the missing images are generated, so an interrupted run resumes; `jaxsd train` runs the
same step first by itself. See docs/dreambooth.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxsd.config import list_presets
    parser.add_argument("config", help=f"YAML config file or preset name; presets: {', '.join(list_presets())}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from jaxsd.config import load_config
    from jaxsd.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    if not cfg.dreambooth.enabled:
        raise ConfigError("dreambooth.class_prompt is not set: there are no class images to make")
    from jaxsd.train.dreambooth import missing_class_images, prepare_class_images

    generated, encoded = prepare_class_images(cfg, progress=not args.no_progress)
    left = len(missing_class_images(cfg.dreambooth))
    print(f"class images in {cfg.dreambooth.class_dir}: {cfg.dreambooth.num_class_images - left} of "
          f"{cfg.dreambooth.num_class_images} ({generated} generated now); {encoded} cache entries encoded")
    return 0
