"""The project's copies of the standard CLIP tokenizers, built from CLIP's BPE merges file (no download).

Every Stable Diffusion text encoder family tokenizes with the same 49408-token byte-level BPE vocabulary
(OpenAI CLIP ViT-L/14 for SD1.x and SDXL's first encoder; OpenCLIP ViT-H/14 for SD2.x and ViT-bigG/14 for
SDXL's second reuse it). Only the pad token differs: "<|endoftext|>" (CLIP) or "!" (OpenCLIP, id 0).

The vocabulary is a function of `data/bpe_simple_vocab_16e6.txt.gz` (see data/NOTICE), built as CLIP's
tokenizer builds it:

  ids 0..255        the 256 byte symbols (GPT-2's reversible bytes -> printable unicode table)
  ids 256..511      the same with the end-of-word mark "</w>"
  ids 512..49405    the concatenation of each of the file's first 48894 merges, in rank order
  ids 49406, 49407  "<|startoftext|>", "<|endoftext|>"

`write_clip_tokenizer` lays it out as a transformers `CLIPTokenizer` folder (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json), the files diffusers' SD pipeline folders ship.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: CLIP keeps the first 49152 - 256 - 2 merge lines
MAX_LENGTH = 77
# The pad token of each family's tokenizer folders (what diffusers' hub folders record): OpenAI CLIP pads
# with end-of-text, OpenCLIP with "!".
PAD_TOKENS = {"sd1": {"tokenizer": EOS}, "sd2": {"tokenizer": "!"},
              "sdxl": {"tokenizer": EOS, "tokenizer_2": "!"}}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map (256 entries): printable Latin-1
    bytes map to themselves, the others to chr(256 + n) in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.cache
def clip_merges() -> tuple[str, ...]:
    """CLIP's merges in rank order ("a b" lines), N_MERGES of them. Line 0 of the file is its header."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(lines[1:1 + N_MERGES])
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise RuntimeError(f"{BPE_FILE}: not CLIP's BPE merges file (the jaxsd install is damaged)")
    return merges


@functools.cache
def clip_vocab() -> dict[str, int]:
    """token -> id of the standard CLIP vocabulary (VOCAB_SIZE entries; see the module doc)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in clip_merges()] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"{BPE_FILE}: the merges give {len(vocab)} distinct tokens, not {VOCAB_SIZE}")
    return vocab


def _added(token: str) -> dict:
    return {"content": token, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(folder: str | os.PathLike, *, pad_token: str = EOS) -> Path:
    """Write the standard CLIP tokenizer folder at `folder` (created) with `pad_token` ("<|endoftext|>":
    SD1.x, SDXL tokenizer/; "!": SD2.x, SDXL tokenizer_2/). Returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(clip_merges()) + "\n", encoding="utf-8")
    special = {"bos_token": _added(BOS), "eos_token": _added(EOS), "pad_token": pad_token, "unk_token": _added(EOS)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": MAX_LENGTH,
              "tokenizer_class": "CLIPTokenizer", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


__all__ = ["BOS", "BPE_FILE", "EOS", "PAD_TOKENS", "VOCAB_SIZE", "bytes_to_unicode", "clip_merges", "clip_vocab",
           "write_clip_tokenizer"]
