"""Text encoders in the train step (token-id caches, jaxsd/train/text.py).

* The step's conditioning equals `PromptEncoder.encode` (itself checked against diffusers in
  tests/text/test_prompts.py) for SD1, SD2 (padding mask), SDXL (both encoders' penultimate states and
  the pooled embedding) with text-encoder adapters, and the hybrid's T5 + projection; a dropped sample
  is the empty caption's encoding.
* A run on a token cache equals a run on the embedding cache of the same data (frozen encoders,
  conditioning dropout on), loss for loss within 1e-5: the two cache modes agree end to end.
* The text encoders are part of the frozen base: a resume with another text encoder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import Config, LoRAConfig, TrainConfig, load_config
from jaxsd.data.config import CacheConfig, DataConfig
from jaxsd.models.lora import scale_adapters
from jaxsd.text.prompts import PromptEncoder
from jaxsd.train.sharding import make_mesh
from jaxsd.train.text import load_text_params, step_text, text_conditioning, text_shardings, text_variables
from tests.data.fakes import make_images
from tests.data.test_cache_text import _save_tiny_clip
from tests.data.test_cache_tokens import FAMILIES
from tests.helpers import rel_err
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

CAPTIONS = ["a photo of a cat", "an oil painting of a castle at sunset", "dog"]
DROP = np.array([False, True, False])  # the second sample is dropped: encoded as ""


@pytest.mark.parametrize("name", list(FAMILIES))
def test_step_conditioning_equals_prompt_encoder(name, tmp_path):
    family, length, build = FAMILIES[name]
    pipe = build(tmp_path / "pipe")
    t5 = family.startswith("t5")
    cfg = Config(train=TrainConfig(data_source="cache"),
                 data=DataConfig(cache=CacheConfig(text_encoder=str(pipe), text=family, text_mode="tokens",
                                                   max_length=length if t5 else 0)),
                 lora=LoRAConfig(rank=4, alpha=2, text_encoder=not t5))  # CLIP: with adapters; T5 takes none
    text = step_text(cfg)
    frozen_shard, _ = text_shardings(text, make_mesh(cfg.sharding), cfg.sharding.rules, jnp.float32)
    frozen = load_text_params(text, jnp.float32, frozen_shard)
    # random non-zero adapters (fresh ones have up = 0 and would compute the base)
    rng = np.random.default_rng(0)
    trained = {c: jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                               plan.shapes(jnp.float32)) for c, plan in text.adapters.items()}
    assert set(trained) == ({"text_encoder", "text_encoder_2"} if family == "sdxl" else set() if t5 else
                            {"text_encoder"})

    pe = PromptEncoder.from_pipeline(pipe, family, max_length=length if t5 else None)
    tokens = pe.tokenize(CAPTIONS)
    empty = {k: v[0] for k, v in pe.tokenize([""]).items()}
    encode = text_conditioning(text, partial(text_variables, text), empty)
    batch = {**tokens, "latents": np.zeros((3, 2, 2, 4), np.float32)}
    out = jax.jit(encode)(trained, frozen, batch, jnp.asarray(DROP))
    assert set(out) == {"latents", "encoder_hidden_states"} | ({"pooled"} if family == "sdxl" else set())

    _, variables = text_variables(text, trained, frozen)
    lora = {} if variables is None else variables["lora"]
    for comp, enc_name in zip(pe.components, ("text_encoder", "text_encoder_2")):
        comp.lora = lora.get(enc_name)
    prompts = [c if not d else "" for c, d in zip(CAPTIONS, DROP)]
    ref = pe.encode(prompts)
    assert rel_err(out["encoder_hidden_states"], ref.encoder_hidden_states) <= 1e-6
    if family == "sdxl":
        assert rel_err(out["pooled"], ref.pooled) <= 1e-6
    if lora:  # the adapters matter: at scale 0 (the same compiled program) the encoding differs
        for comp in pe.components:
            comp.lora = scale_adapters(comp.lora, 0.0)
        assert rel_err(out["encoder_hidden_states"], pe.encode(prompts).encoder_hidden_states) > 1e-3


def _yaml(base, pipe, images, mode: str) -> str:
    return f"""
model: {{pretrained: {pipe}}}
optimizer: {{learning_rate: 0.01}}
loss: {{cond_dropout: 0.5}}
train: {{run_dir: {base / ('run_' + mode)}, steps: 6, batch_size: 4, data_source: cache}}
checkpoint: {{every: 6, async_save: false}}
logging: {{every: 1, progress_bar: false, tensorboard: false}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: clip, text_mode: {mode}, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
"""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same data cached as embeddings and as token ids (two roots: a root's manifest holds one text
    cache), each trained 6 steps with the same settings."""
    from jaxsd.cli import main

    base = tmp_path_factory.mktemp("text_step")
    pipe = tiny_pipeline(base / "pipe")
    images = make_images(base / "images_tokens", 4)
    configs = {mode: base / f"{mode}.yaml" for mode in ("tokens", "embeddings")}
    configs["tokens"].write_text(_yaml(base, pipe, images, "tokens"))
    assert main(["cache", str(configs["tokens"]), "--no-progress"]) == 0
    # the same latents, the text cached again as embeddings
    shutil.copytree(images, base / "images_embeddings")
    configs["embeddings"].write_text(_yaml(base, pipe, base / "images_embeddings", "embeddings"))
    assert main(["cache", str(configs["embeddings"]), "--only", "text", "--no-progress"]) == 0
    for yaml in configs.values():
        assert main(["train", str(yaml)]) == 0
    return base, pipe, configs


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_token_cache_run_equals_embedding_cache_run(two_runs):
    base = two_runs[0]
    emb, tok = _losses(base / "run_embeddings"), _losses(base / "run_tokens")
    assert len(emb) == len(tok) == 6
    np.testing.assert_allclose(tok, emb, rtol=1e-5, atol=0)
    # the dropout draws did drop samples (p = 0.5 over 24 samples), so the empty caption's tokens were used
    assert len(set(emb)) == 6


def test_a_resume_with_another_text_encoder_is_refused(two_runs, tmp_path):
    from jaxsd.train.loop import train
    from jaxsd.train.resume import ResumeMismatch

    base, pipe, configs = two_runs
    other = tmp_path / "other"  # the same tokenizer (the cache still fits), another text encoder
    shutil.copytree(pipe, other, ignore=shutil.ignore_patterns("text_encoder"))
    _save_tiny_clip(other / "text_encoder", 1, 32, False)
    cfg = load_config(configs["tokens"], ["train.steps=7", f"data.cache.text_encoder={other}"])
    with pytest.raises(ResumeMismatch, match="was trained on another base model"):
        train(cfg)
    # the base fingerprint covers the text encoder of token runs only: embedding runs keep theirs
    from jaxsd.train.base import base_fingerprint
    tok = load_config(configs["tokens"])
    assert base_fingerprint(tok).startswith(base_fingerprint(load_config(configs["embeddings"])) + "+text:")
    assert base_fingerprint(tok) != base_fingerprint(dataclasses.replace(
        tok, data=dataclasses.replace(tok.data, cache=dataclasses.replace(tok.data.cache, text_encoder=str(other)))))
