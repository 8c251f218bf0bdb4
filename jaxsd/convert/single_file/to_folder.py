"""A single file as a diffusers pipeline folder: written out (`jaxsd convert`), or as a view.

`write_folder` lays out model_index.json, each component's config.json, the scheduler config and the
tokenizers (those two from `--config`, never from the file, which has none; without --config the
scheduler is jaxsd's copy of the family default and the tokenizers the project's copies of the standard
CLIP ones, jaxsd/convert/clip_vocab.py), and the weights:

  materialize  each component's safetensors written tensor by tensor (in `dtype`, or the file's own),
               plus `single_file_extras.safetensors`: the file's tensors no component uses (EMA,
               schedule buffers, SD2's dropped layer ...) and its metadata, so `jaxsd convert DIR
               --single-file` gives the original file back, tensor for tensor;
  view         a `single_file.json` pointer per component instead of weights: `folder.open_weights`
               then reads that component from the file itself, lazily (`model.pretrained`, `jaxsd sample
               --model`, `data.cache.vae` given a file). Nothing but JSON and tokenizer files is written.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jaxsd.convert.clip_vocab import PAD_TOKENS, VOCAB_SIZE, write_clip_tokenizer
from jaxsd.convert.safetensors_io import is_float, save_file_streamed
from jaxsd.convert.single_file import infer, layout
from jaxsd.convert.single_file.read import WEIGHTS, SingleFile, SingleFileError, open_single_file

POINTER = "single_file.json"
EXTRAS = "single_file_extras.safetensors"
MARKER = "jaxsd_convert.json"
_LIBRARY = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def _model_index(sf: SingleFile, tokenizers: list[str], scheduler_class: str) -> dict:
    family = sf.family or "sd1"  # a VAE-only file: any SD pipeline class holds it
    index: dict[str, object] = {"_class_name": layout.PIPELINE_CLASS[family], "_diffusers_version": "0.36.0"}
    for name in sf.components:
        index[name] = list(_LIBRARY[name])
    for tok in tokenizers:
        index[tok] = ["transformers", "CLIPTokenizer"]
    index["scheduler"] = ["diffusers", scheduler_class]
    if family == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def _scheduler(sf: SingleFile) -> dict:
    if sf.config_dir is not None and (sf.config_dir / "scheduler" / "scheduler_config.json").is_file():
        sf.notes.append(f"scheduler: {sf.config_dir / 'scheduler'}")
        return json.loads((sf.config_dir / "scheduler" / "scheduler_config.json").read_text())
    if "jaxsd.scheduler" in sf.metadata:
        sf.notes.append("scheduler: the file's metadata (jaxsd.scheduler)")
        return json.loads(sf.metadata["jaxsd.scheduler"])
    config = infer.scheduler_config(sf.family or "sd1")
    sf.notes.append(f"scheduler: jaxsd's copy of the {sf.family or 'sd1'} default ({config['_class_name']}, "
                    f"{config['prediction_type']}); give --config to use another")
    return config


def _write_tokenizer(sf: SingleFile, tok: str, encoder_config: dict, dest: Path) -> bool:
    """tokenizer/ (or tokenizer_2/) from --config when it has one, else the project's copy of the standard
    CLIP tokenizer with the family's pad token (a single file holds no tokenizer), unless the text encoder's
    vocabulary is not that one. The note says which. Returns whether a tokenizer was written."""
    if sf.config_dir is not None and (sf.config_dir / tok).is_dir():
        shutil.copytree(sf.config_dir / tok, dest / tok, dirs_exist_ok=True)
        sf.notes.append(f"{tok}: {sf.config_dir / tok}")
        return True
    if encoder_config.get("vocab_size") != VOCAB_SIZE:  # ids past its embedding table would be garbage
        sf.notes.append(f"{tok}: none: the text encoder has {encoder_config.get('vocab_size')} token embeddings, not "
                        f"the standard CLIP vocabulary's {VOCAB_SIZE} (a single file holds no tokenizer): give "
                        f"--config PIPELINE_DIR with its {tok}/")
        return False
    pad = PAD_TOKENS[sf.family][tok]
    write_clip_tokenizer(dest / tok, pad_token=pad)
    sf.notes.append(f"{tok}: jaxsd's copy of the standard CLIP vocabulary (OpenAI CLIP BPE, {VOCAB_SIZE} tokens, "
                    f"pad {pad!r}; a single file holds no tokenizer); give --config to use another")
    return True


def _write_weights(sf: SingleFile, name: str, dest: Path, dtype) -> None:
    state = sf.state(name)
    out = {k: (tuple(state[k].shape), np.dtype(dtype) if dtype is not None and is_float(state[k].dtype)
               else state[k].dtype) for k in state}
    save_file_streamed(out, lambda k: state[k].astype(out[k][1], copy=False), dest / f"{WEIGHTS[name]}.safetensors",
                       {"format": "pt"})


def write_folder(sf: SingleFile, dest: str | os.PathLike, *, view: bool = False, dtype=None) -> Path:
    """Lay `sf` out as a diffusers pipeline folder at `dest` (see the module doc). Returns `dest`."""
    if sf.family is None and set(sf.components) != {"vae"}:
        raise SingleFileError(f"{sf.path}: cannot tell the model family from its tensors; give --family or --config")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizers = []
    for name, comp in sf.components.items():
        folder = dest / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(comp.config, indent=2, sort_keys=True) + "\n")
        if view:
            pointer = {"file": str(sf.path.resolve()), "component": name, "family": sf.family, "ema": sf.ema,
                       "config_dir": str(sf.config_dir.resolve()) if sf.config_dir else None}
            (folder / POINTER).write_text(json.dumps(pointer, indent=2) + "\n")
        else:
            _write_weights(sf, name, folder, dtype)
        tok = TOKENIZERS.get(name)
        if tok and _write_tokenizer(sf, tok, comp.config, dest):
            tokenizers.append(tok)
    scheduler = _scheduler(sf)
    (dest / "scheduler").mkdir(exist_ok=True)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2, sort_keys=True) + "\n")
    if sf.config_dir is not None and (sf.config_dir / "model_index.json").is_file():
        index = json.loads((sf.config_dir / "model_index.json").read_text())
    else:
        index = _model_index(sf, tokenizers, scheduler.get("_class_name", "PNDMScheduler"))
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if not view:
        extras = {k: sf.file[k] for k in sf.extras}
        save_file_streamed({k: (a.shape, a.dtype) for k, a in extras.items()}, extras.__getitem__, dest / EXTRAS,
                           sf.metadata)
    return dest


_VIEWS: dict[tuple, Path] = {}


@atexit.register
def _remove_views() -> None:
    for path in _VIEWS.values():
        shutil.rmtree(path.parent, ignore_errors=True)


def folder_view(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                family: str | None = None, ema: bool = False) -> Path:
    """A diffusers pipeline folder reading its weights from single file `path` (one per process and
    arguments; removed at exit). See the module doc."""
    key = (str(Path(path).resolve()), str(config_dir) if config_dir else None, family, ema)
    if key not in _VIEWS:
        sf = open_single_file(path, family=family, config_dir=config_dir, ema=ema)
        root = Path(tempfile.mkdtemp(prefix="jaxsd-single-file-"))
        _VIEWS[key] = write_folder(sf, root / Path(path).stem, view=True)
    return _VIEWS[key]


def view_file(folder: Path) -> SingleFile | None:
    """The single file a view's component folder reads (None for an ordinary folder)."""
    if not (folder / POINTER).is_file():
        return None
    pointer = json.loads((folder / POINTER).read_text())
    return open_single_file(pointer["file"], family=pointer["family"], config_dir=pointer["config_dir"],
                            ema=pointer["ema"])


def open_pointer(folder: Path, variant: str | None):
    """The state dict a view's component folder points to (called by `folder.open_weights`)."""
    sf = view_file(folder)
    if variant:
        raise SingleFileError(f"{sf.path}: a single file has no weight variants (variant={variant!r})")
    return sf.state(json.loads((folder / POINTER).read_text())["component"])




def model_folder(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                 family: str | None = None) -> Path:
    """The one seam where a single file is accepted in place of a diffusers folder: `path` itself when it
    is a folder (or does not exist: the caller's error names it), its `folder_view` when it is a
    `.safetensors` file. Used by `model.pretrained`, `jaxsd sample --model`, `data.cache.vae` and `text_encoder`."""
    path = Path(path)
    if path.is_file():
        return folder_view(path, config_dir=config_dir, family=family)
    if config_dir is not None:
        raise SingleFileError(f"{path}: --config is for a single-file checkpoint; a folder has its own configs")
    return path


def view_source(folder: str | os.PathLike) -> Path | None:
    """The path of the single file a view's component folder reads, or None for an ordinary folder."""
    pointer = Path(folder) / POINTER
    return Path(json.loads(pointer.read_text())["file"]) if pointer.is_file() else None


__all__ = ["EXTRAS", "MARKER", "POINTER", "folder_view", "model_folder", "open_pointer", "view_file", "view_source", "write_folder"]
