"""Train a tiny text-to-image latent diffusion model from scratch on the CPU and show it follows prompts.

    jaxsd demo [--out DIR] [--quick]

No downloads. Generates a captioned dataset of coloured shapes ("a red circle"),
then walks the three phases of latent diffusion training through the same code
paths users run: (1) trains a tiny AutoencoderKL and reports its PSNR on
held-out images; caches latents and text embeddings (`jaxsd cache`); (2-3)
trains a text-conditioned UNet from scratch (`jaxsd train`, conditioning dropout
for classifier-free guidance, EMA). The text encoder is a tiny CLIP text model
that is RANDOM and FROZEN, with a real CLIP BPE tokenizer built over the
captions' words. Then it exports a diffusers folder, samples every prompt with
CFG into a labelled grid (DIR/samples/grid.png), measures prompt adherence with
a pixel classifier (first checked on real held-out images), and writes
DIR/metrics.json (colour_accuracy, shape_accuracy, vae_psnr, seconds_total).
With torch + diffusers installed it also loads the export in diffusers'
StableDiffusionPipeline and reports the max pixel difference from the same latents.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run for the test suite: every phase and file, far too short to learn")


def run(args: argparse.Namespace) -> int:
    from jaxsd.demo.run import run_demo
    from jaxsd.demo.settings import DemoSettings

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    result = run_demo(args.out, settings, log=lambda m: print(m, flush=True))
    m, d = result["metrics"], result["details"]
    print("\njaxsd demo results" + (" (--quick: not trained long enough to follow prompts)" if args.quick else ""))
    print(f"  classifier on real held-out images: colour {d['classifier_on_real_heldout']['colour_accuracy']:.1%}, "
          f"shape {d['classifier_on_real_heldout']['shape_accuracy']:.1%}")
    print(f"  generated samples ({d['samples']}): colour accuracy {m['colour_accuracy']:.1%}, "
          f"shape accuracy {m['shape_accuracy']:.1%}")
    print(f"  VAE held-out PSNR: {m['vae_psnr']:.2f} dB")
    print("  seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in d["seconds"].items()))
    if d.get("diffusers_max_pixel_diff") is not None:
        print(f"  diffusers StableDiffusionPipeline, same latents: max pixel difference {d['diffusers_max_pixel_diff']}/255")
    print(f"  text encoder: tiny CLIP, random and frozen. Grid: {args.out}/samples/grid.png; "
          f"metrics: {args.out}/metrics.json")
    return 0
