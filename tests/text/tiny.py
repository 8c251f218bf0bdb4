"""Tiny tokenizer folders and text encoders for tests, built on the spot (no downloads).

CLIP: a byte-level BPE vocabulary (every byte, with and without `</w>`, plus
merges learnt greedily from a few words) laid out like the real one — special
tokens last, so the end-of-text id is the largest, as the legacy pooling rule
assumes. T5: a sentencepiece unigram model trained on a few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxsd.convert.clip_vocab import bytes_to_unicode

WORDS = ("a photo of an astronaut riding horse on the moon painting cat dog castle forest "  # noqa: SIM905
         "beautiful landscape mountains sunset portrait oil café naïve über").split()
SENTENCES = [
    "a photo of an astronaut riding a horse on the moon",
    "an oil painting of a cat sitting in a castle",
    "a beautiful landscape with mountains at sunset",
    "portrait of a dog in the forest, highly detailed",
    "a café in paris, naïve art, über cute",
    "the quick brown fox jumps over the lazy dog",
    "photograph of a red car parked next to a blue house",
    "watercolor painting of flowers in a vase on a wooden table",
]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    seen = set(tokens)
    table = bytes_to_unicode()
    for word in WORDS + ["!!", "!!!", "..."]:
        pieces = [table[b] for b in word.encode()]
        pieces[-1] += "</w>"
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, *, pad_token: str = EOS, max_length: int = 77) -> Path:
    """A `tokenizer/` folder as SD pipelines ship it: vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json (pad "!" for SD2/SDXL's second tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))
    return folder


def write_t5_tokenizer(folder: Path, *, vocab_size: int = 120, max_length: int = 32) -> Path:
    """A T5 `tokenizer_2/` folder: spiece.model (sentencepiece unigram, <pad>=0 </s>=1 <unk>=2) + config."""
    import io

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": max_length, "tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    return folder
