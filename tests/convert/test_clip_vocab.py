"""The project's copies of the standard CLIP tokenizers (jaxsd/convert/clip_vocab.py), built from CLIP's
BPE merges file: the vocabulary's layout and published ids, and the written folder read by transformers'
CLIPTokenizer / CLIPTokenizerFast and by jaxsd's own tokenizer, which must agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxsd.convert.clip_vocab import (
    BOS,
    EOS,
    PAD_TOKENS,
    VOCAB_SIZE,
    clip_merges,
    clip_vocab,
    write_clip_tokenizer,
)
from jaxsd.text.tokenizers import load_tokenizer

PROMPTS = ["a photo of a cat", "A Photo OF a CAT!!", "an astronaut riding a horse, 4k, trending on artstation",
           "café naïve über 🐱 — don't stop", "  spaces\tand\nnewlines  ", "", "word " * 90]


def test_vocabulary_layout_and_published_ids():
    vocab = clip_vocab()
    merges = clip_merges()
    assert len(vocab) == VOCAB_SIZE == 49408 and len(merges) == 48894
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # the byte symbols, then the same with "</w>"
    assert merges[0] == "i n" and vocab["in"] == 512  # then one token per merge, in rank order
    assert vocab[merges[-1].replace(" ", "")] == 49405
    # the transformers CLIPTokenizer docs' example: "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407]
    assert [vocab[t] for t in ("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>")] == [320, 1125, 539, 320, 2368]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_written_folders_as_diffusers_ships_them(family, tmp_path):
    for name, pad in PAD_TOKENS[family].items():
        folder = write_clip_tokenizer(tmp_path / name, pad_token=pad)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
        assert config["pad_token"] == json.loads((folder / "special_tokens_map.json").read_text())["pad_token"] == pad
        tok = load_tokenizer(folder)
        assert tok.pad_token_id == (0 if pad == "!" else 49407) and tok.max_length == 77
        assert tok("a photo of a cat").input_ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407,
                                                                   tok.pad_token_id]
    assert PAD_TOKENS[family].get("tokenizer") == ("!" if family == "sd2" else EOS)


@pytest.mark.torch
@pytest.mark.parametrize("pad", [EOS, "!"])
def test_transformers_and_jaxsd_agree_on_the_written_folder(pad, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_clip_tokenizer(tmp_path / "tokenizer", pad_token=pad)
    ours = load_tokenizer(folder)(PROMPTS)
    # transformers 5 has one CLIP tokenizer (tokenizers-backed); CLIPTokenizerFast names the same class
    for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
        ref = cls.from_pretrained(str(folder))
        assert ref.pad_token == pad and ref.model_max_length == 77 and len(ref) == VOCAB_SIZE
        theirs = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        np.testing.assert_array_equal(ours.input_ids, theirs["input_ids"])
        np.testing.assert_array_equal(ours.attention_mask, theirs["attention_mask"])
    assert ours.input_ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.input_ids[-1, -1] == 49407 and (ours.input_ids[0, 7:] == ours.input_ids[0, -1]).all()
