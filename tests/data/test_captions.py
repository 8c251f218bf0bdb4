"""data.captions: each option on known captions, and through the loader over a token-id cache made by
`jaxsd cache` (the tiny pipeline's CLIP tokenizer): what each draw tokenizes, changing per draw, same on resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxsd.cli import main
from jaxsd.data.captions import draw_caption
from jaxsd.data.config import CaptionsConfig, load_data_config
from jaxsd.data.loader import training_loader
from jaxsd.errors import ConfigError
from jaxsd.text.tokenizers import load_tokenizer
from tests.data.fakes import make_images
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

TAGS = "a dog, grass, sunny, park, red collar"


def _draws(cfg: CaptionsConfig, caption: str = TAGS, n: int = 200) -> list[str]:
    return [draw_caption(caption, cfg, np.random.default_rng([0, i])) for i in range(n)]


def test_shuffle_keeps_the_first_tags_and_moves_the_others():
    draws = _draws(CaptionsConfig(shuffle=True, keep_tokens=2))
    assert all(d.startswith("a dog, grass, ") for d in draws)
    assert all(sorted(d.split(", ")) == sorted(TAGS.split(", ")) for d in draws)
    assert len(set(draws)) == 6  # the 3! orders of the three free tags all occur
    assert _draws(CaptionsConfig()) == [TAGS] * 200  # nothing on: the caption as cached


def test_tag_dropout_drops_each_free_tag_with_its_probability():
    draws = _draws(CaptionsConfig(tag_dropout=0.25, keep_tokens=1), n=2000)
    assert all(d.startswith("a dog") for d in draws)
    kept = np.mean([len(d.split(", ")) - 1 for d in draws]) / 4
    assert abs(kept - 0.75) < 0.02
    assert all(tags == sorted(tags, key=TAGS.split(", ").index) for tags in (d.split(", ") for d in draws))


def test_trigger_is_prepended_when_missing_and_stays_first():
    cfg = CaptionsConfig(trigger="sks", shuffle=True)
    assert all(d.startswith("sks, ") for d in _draws(cfg))
    assert draw_caption("a photo of sks dog", cfg, np.random.default_rng(0)) == "a photo of sks dog"
    assert draw_caption("sksx, a dog", CaptionsConfig(trigger="sks"), np.random.default_rng(0)) == "sks, sksx, a dog"


def test_caption_dropout_has_one_name_and_per_draw_options_need_token_ids():
    with pytest.raises(ConfigError, match="loss.cond_dropout"):
        load_data_config(None, ["data.captions.caption_dropout=0.1"])
    with pytest.raises(ConfigError, match="data.cache.text=tokens"):
        load_data_config(None, ["data.captions.shuffle=true"])


def test_loader_tokenizes_each_draw_and_resumes_with_the_same_captions(tmp_path):
    pipe = tiny_pipeline(tmp_path / "pipe")
    images = make_images(tmp_path / "images", 4)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"""
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: tokens, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 2, threads: 1, prefetch: 1}}
  captions: {{trigger: sks, shuffle: true, keep_tokens: 2}}
""")
    for i in range(4):  # captions with tags
        (images / f"{i:03d}.txt").write_text(f"caption {i}, red, green, blue")
    assert main(["cache", str(yaml), "--no-progress"]) == 0  # in-process: tests/train/tiny_run.py runs the command
    cfg = load_data_config(str(yaml))
    loader = training_loader(cfg)
    tok = load_tokenizer(pipe / "tokenizer")
    seen: dict[int, set] = {}
    for step in range(6):
        b = next(loader)
        for row, idx in enumerate(b["index"]):
            text = draw_caption(f"caption {idx}, red, green, blue", cfg.captions,
                                np.random.default_rng([cfg.loader.seed, step, int(idx), 7]))
            assert text.startswith(f"sks, caption {idx}, ")
            np.testing.assert_array_equal(b["input_ids"][row], tok([text]).input_ids[0])
            np.testing.assert_array_equal(b["attention_mask"][row], tok([text]).attention_mask[0])
            seen.setdefault(int(idx), set()).add(text)
    assert max(len(v) for v in seen.values()) > 1  # a sample drawn again got another caption
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(3)]
    fresh = training_loader(cfg)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    plain = training_loader(dataclasses.replace(cfg, captions=CaptionsConfig()))  # the cached ids themselves
    b = next(plain)
    np.testing.assert_array_equal(b["input_ids"][0], tok([f"caption {b['index'][0]}, red, green, blue"]).input_ids[0])
