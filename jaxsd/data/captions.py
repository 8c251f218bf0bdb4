"""Caption handling per draw (`data.captions`): trigger word, kept leading tags, tag dropout, shuffling.

    text = draw_caption("sks, a dog, grass, sunny", cfg.captions, rng)

A caption's tags are its comma-separated parts. The loader calls this for each sample of each
batch with a generator seeded by (data.loader.seed, batch number, sample index), then tokenizes
the result, so the text changes every time a sample is drawn and a resumed run draws the same.
"""

from __future__ import annotations

import re

import numpy as np

from jaxsd.data.config import CaptionsConfig


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def draw_caption(caption: str, cfg: CaptionsConfig, rng: np.random.Generator) -> str:
    """The caption as this draw sees it (tags joined by ", ")."""
    tags = split_tags(caption)
    keep = cfg.keep_tokens
    if cfg.trigger:
        if not re.search(rf"(?<!\w){re.escape(cfg.trigger)}(?!\w)", caption):
            tags.insert(0, cfg.trigger)  # the identifier is a tag of its own, first
        keep = max(keep, 1)
    fixed, rest = tags[:keep], tags[keep:]
    if cfg.tag_dropout > 0:
        rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= cfg.tag_dropout]
    if cfg.shuffle and len(rest) > 1:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(fixed + rest)
