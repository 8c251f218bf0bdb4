"""Tokenizers for CLIP (byte-level BPE) and T5 (sentencepiece unigram), torch-free.

Reads a pipeline's `tokenizer/` / `tokenizer_2/` folder with the Hugging Face
`tokenizers` package (Rust; no torch, no transformers at run time) and builds
the same pipeline transformers 5's `CLIPTokenizer` / `T5Tokenizer` build, so
ids are identical (tests compare them on tricky prompts):

* `tokenizer.json` present → loaded as is;
* `vocab.json` + `merges.txt` → CLIP: NFC + whitespace-collapse + lowercase,
  CLIP's split regex, byte-level BPE with `</w>` word ends, `<|startoftext|>`
  … `<|endoftext|>` around the text;
* `spiece.model` → T5: the sentencepiece model's pieces/scores and
  normalisation table (read from its protobuf with a small reader here, so the
  `sentencepiece` package is not needed), whitespace split + `▁` metaspace,
  `</s>` appended.

Special tokens (bos/eos/unk/pad from tokenizer_config.json or
special_tokens_map.json) are added as special tokens, as transformers does — a
pad token of "!" (SD 2.x / SDXL's second tokenizer) therefore also splits "!" off
in prompts, exactly like the reference.

Every batch is padded/truncated to `max_length` (CLIP: the folder's
`model_max_length`, 77; T5: configurable). Truncation is never silent: a call
that cuts prompts logs ONE warning saying how many were cut and by how many
tokens, and running totals are kept in `TextTokenizer.truncation`. A caller
that tokenizes a whole dataset may set `warn_each_call = False` and log
`truncation.summary(max_length)` once instead.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE, Unigram

from jaxsd.errors import InputError

logger = logging.getLogger(__name__)

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_HUGE = 10**8  # transformers writes int(1e30) as "no limit"


class TokenizerError(InputError):
    """A tokenizer folder that cannot be read."""


@dataclass
class TruncationStats:
    """Running totals over a tokenizer's lifetime (e.g. a whole caching run)."""

    prompts: int = 0
    truncated: int = 0
    max_tokens_cut: int = 0

    def summary(self, max_length: int) -> str:
        """One line for a caller that reports truncation once at the end (see `warn_each_call`)."""
        return (f"{self.truncated} of {self.prompts} prompts were longer than {max_length} tokens and were "
                f"truncated (at most {self.max_tokens_cut} tokens cut from one prompt)")


@dataclass(frozen=True)
class TokenizedBatch:
    """input_ids [B, max_length] int32; attention_mask [B, max_length] int32 (1 = token, 0 = padding);
    lengths [B]: tokens each prompt had before truncation (specials included)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray


@dataclass
class TextTokenizer:
    """A loaded tokenizer: `tok(["a cat", ...]) -> TokenizedBatch` padded/truncated to max_length."""

    tokenizer: Tokenizer
    kind: str  # "clip" | "t5"
    max_length: int
    pad_token: str
    bos_token: str | None
    eos_token: str
    source: str = "tokenizer"
    truncation: TruncationStats = field(default_factory=TruncationStats)
    # False: a caller that tokenizes many batches (caching) only accumulates `truncation` and reports
    # `truncation.summary(...)` itself once; True: every call that cuts prompts logs one warning.
    warn_each_call: bool = True

    def __post_init__(self):
        for name in ("pad_token", "eos_token", "bos_token"):
            token = getattr(self, name)
            if token is not None and self.tokenizer.token_to_id(token) is None:
                raise TokenizerError(f"{self.source}: {name} {token!r} is not in the vocabulary")
        self._plain = Tokenizer.from_str(self.tokenizer.to_str())
        self._plain.no_truncation()
        self._plain.no_padding()

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.pad_token)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> TokenizedBatch:
        """Tokenize like transformers' `tok(prompts, padding="max_length", truncation=True, max_length=...)`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{self.source}: prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        length = max_length or self.max_length
        full = [len(e.ids) for e in self._plain.encode_batch(prompts)]
        tok = self.tokenizer
        tok.enable_truncation(length)
        tok.enable_padding(length=length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        enc = tok.encode_batch(prompts)
        ids = np.asarray([e.ids for e in enc], np.int32).reshape(len(prompts), length)
        mask = np.asarray([e.attention_mask for e in enc], np.int32).reshape(len(prompts), length)
        self._report(np.asarray(full), length)
        return TokenizedBatch(ids, mask, np.asarray(full, np.int32))

    def _report(self, lengths: np.ndarray, max_length: int) -> None:
        cut = np.maximum(lengths - max_length, 0)
        n = int((cut > 0).sum())
        self.truncation.prompts += len(lengths)
        self.truncation.truncated += n
        if n and not self.warn_each_call:
            self.truncation.max_tokens_cut = max(self.truncation.max_tokens_cut, int(cut.max()))
        elif n:
            self.truncation.max_tokens_cut = max(self.truncation.max_tokens_cut, int(cut.max()))
            lo, hi = int(cut[cut > 0].min()), int(cut.max())
            by = f"{lo}" if lo == hi else f"{lo} to {hi}"
            logger.warning("%s: %d of %d prompts are longer than %d tokens; truncated, losing %s tokens each "
                           "(longest prompt: %d tokens)", self.source, n, len(lengths), max_length, by,
                           int(lengths.max()))

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return text.replace("</w>", " ").strip() if self.kind == "clip" else text


# --------------------------------------------------------------------------- loading


def _token(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise TokenizerError(f"unreadable special token entry {value!r}")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_tokenizer(folder: str | os.PathLike, *, max_length: int | None = None, kind: str | None = None) -> TextTokenizer:
    """Read a transformers tokenizer folder (CLIP or T5).

    max_length: pad/truncate length; default the folder's `model_max_length`
      (77 for CLIP; for T5 folders that say "unlimited", 512 — pass it explicitly).
    kind: "clip" or "t5"; default from the files present / `tokenizer_class`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: tokenizer folder does not exist")
    config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    cls = str(config.get("tokenizer_class", "")).lower()
    if kind is None:
        if "clip" in cls or (folder / "vocab.json").is_file():
            kind = "clip"
        elif "t5" in cls or (folder / "spiece.model").is_file():
            kind = "t5"
        else:
            raise TokenizerError(f"{folder}: cannot tell the tokenizer kind (tokenizer_class {cls or 'absent'}); "
                                 "pass kind='clip' or kind='t5'")
    if kind not in ("clip", "t5"):
        raise InputError(f"tokenizer kind {kind!r} unknown; choose 'clip' or 't5'")
    defaults = ({"bos": "<|startoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|endoftext|>"}
                if kind == "clip" else {"bos": None, "eos": "</s>", "unk": "<unk>", "pad": "<pad>"})
    special = {k: _token(config.get(f"{k}_token", v)) for k, v in defaults.items()}

    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
    elif kind == "clip":
        tok = _clip_from_vocab(folder, special)
    else:
        tok = _t5_from_spm(folder, special, int(config.get("extra_ids", 100)))

    limit = max_length or int(min(float(config.get("model_max_length", 77 if kind == "clip" else _HUGE)), _HUGE))
    if limit >= _HUGE:
        limit = 512
        logger.warning("%s records no model_max_length; prompts are padded to %d tokens. A pipeline jaxsd "
                       "exports records the length its UNet was trained with", folder, limit)
    return TextTokenizer(tok, kind, limit, special["pad"], special["bos"], special["eos"], str(folder))


def _add_specials(tok: Tokenizer, tokens) -> None:
    seen: list[str] = []
    for t in tokens:
        if t is not None and t not in seen:
            seen.append(t)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in seen])


def _clip_from_vocab(folder: Path, special: dict) -> Tokenizer:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        raise TokenizerError(f"{folder}: a CLIP tokenizer needs vocab.json and merges.txt (or tokenizer.json)")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise TokenizerError(f"{merges_path}: malformed merge lines, e.g. {' '.join(bad[0])!r}")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=special["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    _add_specials(tok, [special["bos"], special["eos"], special["unk"], special["pad"]])
    bos, eos = special["bos"], special["eos"]
    tok.post_processor = processors.RobertaProcessing((eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def _t5_from_spm(folder: Path, special: dict, extra_ids: int) -> Tokenizer:
    path = folder / "spiece.model"
    if not path.is_file():
        raise TokenizerError(f"{folder}: a T5 tokenizer needs spiece.model (or tokenizer.json)")
    pieces, charsmap = read_sentencepiece_model(path)
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    _add_specials(tok, [special["eos"], special["unk"], special["pad"]]
                  + [f"<extra_id_{i}>" for i in range(extra_ids)])
    eos = special["eos"]
    tok.post_processor = processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B", eos],
                                                       special_tokens=[(eos, tok.token_to_id(eos))])
    return tok


# ------------------------------------------------------------- sentencepiece model reader


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a protobuf message (value: int, or bytes for length-delimited)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_sentencepiece_model(path: str | os.PathLike) -> tuple[list[tuple[str, float]], bytes]:
    """(pieces as (piece, score) in id order, precompiled normalisation charsmap) of a `.model` file.

    sentencepiece's ModelProto: field 1 = repeated SentencePiece {1: piece, 2: score (float)},
    field 3 = NormalizerSpec {2: precompiled_charsmap}.
    """
    buf = Path(path).read_bytes()
    pieces: list[tuple[str, float]] = []
    charsmap = b""
    try:
        for number, wire, value in _fields(buf):
            if number == 1 and wire == 2:
                piece, score = "", 0.0
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        (score,) = struct.unpack("<f", v)
                pieces.append((piece, score))
            elif number == 3 and wire == 2:
                for n, w, v in _fields(value):
                    if n == 2 and w == 2:
                        charsmap = bytes(v)
    except (IndexError, UnicodeDecodeError, TokenizerError) as e:
        raise TokenizerError(f"{path}: not a readable sentencepiece model ({e})") from e
    if not pieces:
        raise TokenizerError(f"{path}: no pieces found — not a sentencepiece model")
    return pieces, charsmap


__all__ = ["TextTokenizer", "TokenizedBatch", "TokenizerError", "TruncationStats", "load_tokenizer",
           "read_sentencepiece_model"]
