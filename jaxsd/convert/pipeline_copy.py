"""A diffusers pipeline folder's components around another UNet: check they fit, then link them.

`jaxsd export --pipeline BASE` writes a trained UNet next to BASE's other components. Before
anything is written, `check_unet_fits` compares the UNet's config.json fields with BASE's
component configs (config.json files only, no weights are read):

  VAE          vae latent_channels         = UNet in_channels and out_channels
  text side    text embedding width        = UNet cross_attention_dim (every block)
               (text_projection out_features, else the hidden sizes of text_encoder (+ text_encoder_2))
  SDXL         text_encoder_2 projection_dim + n_time_ids × addition_time_embed_dim
                                           = UNet projection_class_embeddings_input_dim (text_time UNets)

BASE's own unet/ is never read and may be missing (a folder of components for a UNet trained
from scratch is "a pipeline minus unet"), but its model_index.json must list a unet: that file
becomes the export's. `link_components` then places every component model_index.json lists
(except the ones named in `skip`, i.e. BASE's own unet) plus model_index.json itself: each file hard-linked to the real
file behind it (symlinks — e.g. a Hugging Face cache snapshot — are resolved first), or copied
when BASE is on another filesystem. Never symlinks: the result must outlive BASE moving.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from jaxsd.errors import InputError

MODEL_INDEX = "model_index.json"
REPLACED = ("unet",)
"""the components an export writes itself: BASE need not have their folders."""


def pipeline_components(base: str | os.PathLike, *, flag: str = "--pipeline",
                        may_lack: tuple[str, ...] = ()) -> list[str]:
    """Names of the components BASE's model_index.json lists (entries [library, class], not null).

    Each must have its folder in BASE, except those in `may_lack`."""
    base = Path(base)
    if not (base / MODEL_INDEX).is_file():
        what = "no such directory" if not base.is_dir() else f"no {MODEL_INDEX}, so not a diffusers pipeline folder"
        raise InputError(f"{flag} {base}: {what}. Give the folder `DiffusionPipeline.save_pretrained` wrote "
                         f"(it holds {MODEL_INDEX}, vae/, text_encoder/, tokenizer/, scheduler/, ...)")
    index = json.loads((base / MODEL_INDEX).read_text())
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
             and len(v) == 2 and v[0] is not None and v[1] is not None]
    missing = [n for n in names if n not in may_lack and not (base / n).is_dir()]
    if missing:
        raise InputError(f"{flag} {base}: {MODEL_INDEX} lists {', '.join(missing)} but there is no "
                         f"{'/, '.join(missing)}/ folder; use a complete pipeline folder")
    return names


def _config(base: Path, name: str, flag: str) -> dict:
    path = base / name / "config.json"
    if not path.is_file():
        raise InputError(f"{flag} {base}: {name}/config.json is missing; use a complete pipeline folder")
    return json.loads(path.read_text())


def _text_width(base: Path, names: list[str], flag: str) -> tuple[int | None, str]:
    """(width of the text embeddings BASE's text side gives the UNet, where that number comes from)."""
    if "text_projection" in names:
        return _config(base, "text_projection", flag).get("out_features"), "text_projection out_features"
    encoders = [n for n in ("text_encoder", "text_encoder_2") if n in names]
    if not encoders:
        return None, "no text_encoder"
    widths = [_config(base, n, flag) for n in encoders]
    widths = [c.get("hidden_size", c.get("d_model")) for c in widths]
    if None in widths:
        return None, f"{'+'.join(encoders)} without hidden_size/d_model"
    return sum(widths), "+".join(f"{n} {w}" for n, w in zip(encoders, widths))


def check_unet_fits(base: str | os.PathLike, unet: dict, *, flag: str = "--pipeline") -> None:
    """Raise InputError naming every mismatch between BASE's VAE / text side and the UNet config `unet`.

    unet: diffusers UNet2DConditionModel config.json fields (in_channels, out_channels,
    cross_attention_dim, addition_embed_type, ...).
    """
    base = Path(base)
    names = pipeline_components(base, flag=flag, may_lack=REPLACED)
    problems = []
    if "unet" not in names:
        problems.append(f"its {MODEL_INDEX} lists no unet (the export's {MODEL_INDEX} is BASE's, so diffusers "
                        "would find no UNet in it)")
    if "vae" not in names:
        problems.append("it has no vae")
    else:
        latent = _config(base, "vae", flag).get("latent_channels", 4)
        if (unet["in_channels"], unet["out_channels"]) != (latent, latent):
            problems.append(f"vae latent_channels={latent} but the UNet has in_channels={unet['in_channels']}, "
                            f"out_channels={unet['out_channels']}")
    width, source = _text_width(base, names, flag)
    cross = unet["cross_attention_dim"]
    cross = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if width is None or cross != {width}:
        problems.append(f"its text embeddings are {width if width is not None else '?'} wide ({source}) but the "
                        f"UNet has cross_attention_dim={'/'.join(map(str, sorted(cross)))}")
    index = json.loads((base / MODEL_INDEX).read_text())
    if unet.get("addition_embed_type") == "text_time":
        if "text_encoder_2" not in names:
            problems.append("the UNet is an SDXL one (addition_embed_type text_time) but it has no text_encoder_2 "
                            "to give pooled text embeddings")
        else:
            pooled = _config(base, "text_encoder_2", flag).get("projection_dim")
            n_ids = 5 if index.get("requires_aesthetics_score") else 6
            expected = None if pooled is None else pooled + n_ids * unet["addition_time_embed_dim"]
            if unet["projection_class_embeddings_input_dim"] != expected:
                problems.append(f"text_encoder_2 projection_dim={pooled} + {n_ids} time ids × "
                                f"addition_time_embed_dim={unet['addition_time_embed_dim']} ≠ the UNet's "
                                f"projection_class_embeddings_input_dim="
                                f"{unet['projection_class_embeddings_input_dim']}")
    elif "text_encoder_2" in names:
        problems.append("it is an SDXL pipeline (text_encoder_2) but the UNet has no text_time micro-conditioning")
    if problems:
        raise InputError(f"{flag} {base}: its components do not fit the trained UNet: " + "; ".join(problems) +
                         ". Give the pipeline folder the run was trained from (the VAE and text encoders its "
                         "cache was made with)")


@dataclasses.dataclass
class LinkReport:
    """What `link_components` did: files hard-linked, files copied (BASE on another filesystem)."""

    linked: int = 0
    copied: int = 0


def _place(src: Path, dst: Path, report: LinkReport) -> None:
    real = os.path.realpath(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, dst)
        report.linked += 1
    except OSError:  # another filesystem (EXDEV) or one without hard links: a real copy
        shutil.copy2(real, dst)
        report.copied += 1


def link_components(base: str | os.PathLike, dest: str | os.PathLike, *, skip: tuple[str, ...] = REPLACED,
                    flag: str = "--pipeline") -> LinkReport:
    """Place BASE's model_index.json and every listed component except `skip` into `dest`."""
    base, dest = Path(base), Path(dest)
    report = LinkReport()
    for name in pipeline_components(base, flag=flag, may_lack=skip):
        if name in skip:
            continue
        for root, _, files in os.walk(base / name, followlinks=True):
            for f in files:
                src = Path(root) / f
                _place(src, dest / src.relative_to(base), report)
    _place(base / MODEL_INDEX, dest / MODEL_INDEX, report)
    return report
