"""Encode images and captions into cached latents and text embeddings (sidecar files + manifest).

    jaxsd cache CONFIG [data.key=value ...] [--only latents|text] [--pack DIR]

CONFIG is a YAML file or the name of a preset in configs/, as for `jaxsd train`
(e.g. `jaxsd cache sd15 data.roots=[imgs] ...`). Reads its `data:` section: the
sources (data.roots, data.tfds), the validation policy, preprocessing (data.image:
resolution, crop, flip, buckets) and what encodes (data.cache.vae,
data.cache.text_encoder, data.cache.text).
First every image and caption is validated (report: console + jaxsd_validation.json),
then latents (`foo.<vae suffix>`) and text embeddings (`foo.<text suffix>`) are
written next to each image with a manifest `jaxsd_cache.json` per root.
Re-running skips everything already cached and still current. With several
processes (jax.distributed), each process encodes its own share of the files.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxsd.config import list_presets

    parser.add_argument("config", help="YAML config file or preset name with a data: section; presets: "
                        f"{', '.join(list_presets())}")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.roots=[imgs] data.cache.dtype=float32"
                        " (overrides of other sections are accepted and ignored)")
    parser.add_argument("--only", choices=("latents", "text"), help="rebuild only this kind of cache")
    parser.add_argument("--pack", metavar="DIR", help="afterwards, also write the cache as ArrayRecord shards to DIR "
                        "(train from it with data.packed=[DIR])")
    parser.add_argument("--validate-only", action="store_true",
                        help="only run the validation pass and write its report (no models needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host; cluster auto-detected)")


def run(args: argparse.Namespace) -> int:
    from jaxsd.config import resolve_preset
    from jaxsd.data.config import load_data_config
    from jaxsd.errors import ConfigError

    cfg = load_data_config(str(resolve_preset(args.config)), args.overrides)
    from jaxsd.data.subsets import without_ungenerated_class_folder

    cfg, later = without_ungenerated_class_folder(cfg)
    if later:
        print(f"jaxsd cache: {', '.join(later)} does not exist yet: DreamBooth's class images are generated and "
              "cached by `jaxsd dreambooth-classes CONFIG` (or by `jaxsd train` before it starts)")
    if args.validate_only:
        from jaxsd.data.cache import validate_only

        validate_only(cfg)
        return 0
    import jax

    if args.distributed:
        jax.distributed.initialize()
    from jaxsd.data.cache import build_cache

    want_latents = args.only in (None, "latents")
    want_text = args.only in (None, "text")
    missing = [k for k, want, v in (("data.cache.vae", want_latents, cfg.cache.vae),
                                    ("data.cache.text_encoder", want_text, cfg.cache.text_encoder)) if want and not v]
    if missing:
        raise ConfigError(f"set {' and '.join(missing)} (or use --only)")
    vae = text = None
    if want_latents:
        from jaxsd.data.model_encoders import vae_encoder

        vae = vae_encoder(cfg)
    if want_text:
        from jaxsd.data.model_encoders import text_encoder

        text = text_encoder(cfg)
    result = build_cache(cfg, vae=vae, text=text, only=args.only, progress=not args.no_progress)
    enc, reused = result.encoded, result.reused
    if jax.process_index() == 0:
        print(f"cached in {result.seconds:.1f}s: latents {enc['latents']} encoded / {reused['latents']} reused, "
              f"text {enc['text']} encoded / {reused['text']} reused")
    if args.pack and jax.process_index() == 0:
        from jaxsd.data.pack import pack_cache

        out = pack_cache(cfg, args.pack)
        print(f"packed into {out} (train from it with data.packed=[{out}])")
    return 0
