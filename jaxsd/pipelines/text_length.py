"""The one text length of a model: where a pipeline folder records it, read and written.

The T5 hybrid's UNet cross-attends to every position of the encoder output, padding included
(diffusers' UNet takes no text mask), so the length prompts are padded to is part of the
conditioning: a UNet trained on 256-token embeddings sees other inputs at 512. jaxsd keeps one
length per model:

  jaxsd cache      `data.cache.max_length` (T5 default 256) → the manifest's "text" "max_length"
  jaxsd train      sample grids encode their prompts at the cache's length
  pipeline folder  `tokenizer/tokenizer_config.json` "model_max_length": what transformers' tokenizer
                   pads to with `padding="max_length"` and what `jaxsd sample` / `load_pipeline` read

`set_text_max_length(folder, n)` records it in a folder (the exporter calls it when it writes a
pipeline). CLIP pipelines (SD1.x/2.x/SDXL) have a fixed 77 tokens (their position embeddings): for
them it only checks that n is that length.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxsd.errors import InputError
from jaxsd.pipelines.loading import PipelineFolderError, detect_family, read_model_index
from jaxsd.text.tokenizers import load_tokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"


def read_text_max_length(folder: str | os.PathLike) -> int:
    """Tokens per prompt a pipeline folder's tokenizer pads to: what `jaxsd sample` encodes prompts at."""
    folder = Path(folder)
    read_model_index(folder)  # a clear error for what is not a pipeline folder
    if not (folder / "tokenizer").is_dir():
        raise PipelineFolderError(f"{folder}: component 'tokenizer' is missing (no tokenizer/ folder)")
    return load_tokenizer(folder / "tokenizer").max_length


def set_text_max_length(folder: str | os.PathLike, max_length: int) -> None:
    """Record `max_length` as the length a pipeline folder's prompts are padded to.

    T5 pipelines (the hybrid): writes `model_max_length` into tokenizer/tokenizer_config.json (created
    if absent; every other key kept). The file is replaced, never written through: a hard link to a
    base pipeline's file (what `jaxsd export` places) leaves the base unchanged. CLIP pipelines: raises InputError unless max_length is the
    tokenizer's fixed length (77), and writes nothing.
    """
    folder = Path(folder)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InputError(f"text max length must be a positive int, got {max_length!r}")
    family = detect_family(folder, read_model_index(folder))
    if family != "hybrid":
        fixed = read_text_max_length(folder)
        if max_length != fixed:
            raise InputError(f"{folder}: a {family} pipeline's CLIP tokenizer pads prompts to a fixed {fixed} "
                             f"tokens (its position embeddings); it cannot record {max_length}")
        return
    path = folder / "tokenizer" / TOKENIZER_CONFIG
    if not path.parent.is_dir():
        raise PipelineFolderError(f"{folder}: component 'tokenizer' is missing (no tokenizer/ folder)")
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["model_max_length"] = max_length
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a killed export never leaves half a tokenizer config


__all__ = ["read_text_max_length", "set_text_max_length"]
