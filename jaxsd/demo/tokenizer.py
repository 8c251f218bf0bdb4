"""The demo's text side: a real CLIP BPE tokenizer learnt over the captions' words,
and the config of a tiny random (frozen) CLIP text model.

The tokenizer is byte-level BPE exactly in CLIP's format: the base vocabulary
is the 256 byte symbols and their end-of-word (`</w>`) forms, then one token per
learnt merge, then `<|startoftext|>` and `<|endoftext|>`. Merges are learnt
greedily (most frequent adjacent pair, ties broken alphabetically) until every
caption word is a single token, so "a red circle" is 3 tokens + BOS/EOS, while
any other text still tokenizes through the byte symbols. It is saved in the
tokenizer folder format (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json) that diffusers' pipelines load with `CLIPTokenizer`.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from pathlib import Path

from jaxsd.convert.clip_vocab import bytes_to_unicode

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# Captions are "a <colour> <shape>": 3 words + BOS + EOS fit with room to spare.
MAX_LENGTH = 16


def learn_bpe(words: collections.Counter) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-style BPE over word frequencies until every word is one token.

    Returns (vocab token → id, merges in rank order).
    """
    byte_chars = bytes_to_unicode()
    base = [byte_chars[b] for b in sorted(byte_chars)]
    vocab_list = base + [c + END_OF_WORD for c in base]

    def symbols(word: str) -> tuple[str, ...]:
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        return tuple(chars[:-1] + [chars[-1] + END_OF_WORD])

    splits = {w: symbols(w) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for w, syms in splits.items():
            for pair in itertools.pairwise(syms):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        for w, syms in splits.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = tuple(out)
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer(folder: str | os.PathLike, captions: list[str], *, max_length: int = MAX_LENGTH) -> dict[str, int]:
    """Learn BPE over `captions`' words and write the tokenizer folder. Returns the vocab."""
    words = collections.Counter(w for c in captions for w in c.lower().split())
    if not words:
        raise ValueError("cannot build a tokenizer from no captions")
    vocab, merges = learn_bpe(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return vocab


def tiny_text_encoder_config(vocab: dict[str, int], *, max_length: int = MAX_LENGTH) -> dict:
    """transformers `CLIPTextModel` config.json of the demo's tiny random text encoder.

    Small on purpose: it is never trained (frozen at its random init); the UNet
    learns to read its outputs, which differ per token, through cross-attention.
    """
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": max_length,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
        "torch_dtype": "float32",
    }
