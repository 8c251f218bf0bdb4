"""Tokenizers: ids identical to transformers' on tricky prompts, truncation reported, no torch at run time."""

import logging

import numpy as np
import pytest

from jaxsd.text.tokenizers import TokenizerError, load_tokenizer, read_sentencepiece_model
from tests.helpers import run_python
from tests.text.tiny import write_clip_tokenizer, write_t5_tokenizer

TRICKY = [
    "a photo of an astronaut riding a horse on the moon",
    "",
    "   leading and trailing spaces   ",
    "Café NAÏVE über crème brûlée",
    "cafe\u0301 (decomposed accent)",
    "東京の夜景, ひらがな, 한국어, Ελληνικά, русский",
    "emoji 🐱🚀 flags 🇯🇵 family 👨‍👩‍👧 skin 👍🏽",
    "wow!!! what?!... ---- ((masterpiece)), [best:1.2] ~~~ ***",
    "it's a dog's life, don't you think? I'll go, we'd see",
    "tabs\tand\nnew\r\nlines   and    runs of spaces",
    "numbers 1234567 and 3.14159 and 1e-5",
    "<|endoftext|> inside <|startoftext|> the text",
    " ".join(["painting of a beautiful landscape"] * 20),  # far more than 77 tokens
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    out = {
        "clip": write_clip_tokenizer(root / "tokenizer"),
        "clip_pad_bang": write_clip_tokenizer(root / "tokenizer_2", pad_token="!"),  # SD2 / SDXL encoder 2
    }
    try:  # training the test's sentencepiece model needs `sentencepiece` (the [torch] extra); reading it does not
        out["t5"] = write_t5_tokenizer(root / "t5")
    except ImportError:
        pass
    return out


def _t5(folders):
    if "t5" not in folders:
        pytest.skip("building the test's T5 tokenizer needs sentencepiece (the [torch] extra)")
    return folders["t5"]


def _reference(folder, prompts, max_length):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    out = ref(prompts, padding="max_length", max_length=max_length, truncation=True)
    return ref, np.asarray(out.input_ids), np.asarray(out.attention_mask)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["clip", "clip_pad_bang", "t5"])
def test_ids_identical_to_transformers(folders, name, tmp_path):
    ours = load_tokenizer(folders[name])
    lengths = [ours.max_length] if name != "t5" else [16, 48]  # T5's length is configurable
    for length in lengths:
        ref, ids, mask = _reference(folders[name], TRICKY, length)
        got = ours(TRICKY, max_length=length)
        np.testing.assert_array_equal(got.input_ids, ids)
        np.testing.assert_array_equal(got.attention_mask, mask)
    assert ours.max_length == (77 if name != "t5" else 32)
    assert ours.pad_token_id == ref.pad_token_id and ours.eos_token_id == ref.eos_token_id
    # A folder transformers saved (tokenizer.json) reads the same.
    ref.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    np.testing.assert_array_equal(again(TRICKY, max_length=lengths[0]).input_ids, ours(TRICKY, max_length=lengths[0]).input_ids)


def test_clip_layout_and_truncation_warning(folders, caplog):
    tok = load_tokenizer(folders["clip"])
    batch = tok(["a cat", TRICKY[-1], TRICKY[-1] + " forest"])
    assert batch.input_ids.shape == (3, 77) and batch.input_ids.dtype == np.int32
    row = batch.input_ids[0]
    assert row[0] == tok.bos_token_id and row[3] == tok.eos_token_id and (row[4:] == tok.pad_token_id).all()
    assert batch.attention_mask[0].sum() == 4
    assert (batch.input_ids[1:, -1] == tok.eos_token_id).all()  # truncated rows still end with EOS
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one warning per call, not per prompt
    msg = warnings[0].getMessage()
    assert "2 of 3 prompts" in msg and "longer than 77 tokens" in msg
    cut = batch.lengths[1:] - 77
    assert f"{cut.min()} to {cut.max()} tokens" in msg
    assert tok.truncation.truncated == 2 and tok.truncation.max_tokens_cut == int(cut.max())
    assert tok.decode(batch.input_ids[0]) == "a cat"
    caplog.clear()
    tok(["short prompt"])
    assert not caplog.records
    tok.warn_each_call = False  # a caching run: accumulate, report once
    tok([TRICKY[-1]] * 3)
    assert not caplog.records
    assert tok.truncation.summary(77).startswith("5 of 7 prompts were longer than 77 tokens")


def test_sentencepiece_reader_and_errors(folders, tmp_path):
    pieces, charsmap = read_sentencepiece_model(_t5(folders) / "spiece.model")
    assert [p for p, _ in pieces[:3]] == ["<pad>", "</s>", "<unk>"] and len(charsmap) > 0
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="cannot tell"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "spiece.model").write_bytes(b"\x0a\x05hello")
    with pytest.raises(TokenizerError, match="spiece.model"):
        load_tokenizer(tmp_path / "bad")


def test_runtime_imports_neither_torch_nor_transformers(folders):
    out = run_python(f"""
        import sys
        from jaxsd.text.tokenizers import load_tokenizer
        import jaxsd.text.prompts  # the whole prompt-encoding path: models, converters, tokenizers
        load_tokenizer({str(folders['clip'])!r})(["a cat"]); load_tokenizer({str(_t5(folders))!r})(["a cat"])
        print(sorted(m for m in ("torch", "transformers", "sentencepiece") if m in sys.modules))
    """, devices=1)
    assert out.strip().splitlines()[-1] == "[]"
