"""Caching text embeddings with the real prompt encoders: a tiny SDXL pipeline (two CLIPs + pooled),
saved by jaxsd; the cached embeddings equal `PromptEncoder.encode` (itself checked against diffusers)."""

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.convert.text_encoders import save_clip
from jaxsd.data.cache import EMPTY_CAPTION_KEY, build_cache
from jaxsd.data.config import CacheConfig, DataConfig, ImageConfig
from jaxsd.data.loader import training_loader
from jaxsd.data.manifest import CacheMismatch, verify_manifest
from jaxsd.data.model_encoders import expected_specs, text_encoder
from jaxsd.data.records import read_sidecar
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel, example_inputs
from jaxsd.models.params import abstract_params
from tests.data.test_cache_command import save_tiny_vae
from tests.helpers import rel_err
from tests.text.tiny import BOS, EOS, clip_vocab_and_merges, write_clip_tokenizer

CAPTIONS = ["a photo of a cat", "an oil painting of a castle at sunset", "dog", " ".join(["cat"] * 100)]


def _save_tiny_clip(folder, seed, hidden, projection, extra=()):
    """extra: other config.json keys, e.g. (("use_attention_mask", True),)."""
    vocab, _ = clip_vocab_and_merges()
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=24, bos_token_id=vocab[BOS],
                            eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], with_projection=projection,
                            extra=tuple(extra))
    shapes, _ = abstract_params(CLIPTextModel(config), *example_inputs(config))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    save_clip(folder, config, params)


def tiny_sdxl_pipeline(root, seed=0):
    write_clip_tokenizer(root / "tokenizer")
    write_clip_tokenizer(root / "tokenizer_2", pad_token="!")
    _save_tiny_clip(root / "text_encoder", seed, 16, False)
    _save_tiny_clip(root / "text_encoder_2", seed + 1, 32, True)
    return root


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    pipe = tiny_sdxl_pipeline(base / "pipe")
    root = base / "imgs"
    root.mkdir()
    for i, c in enumerate(CAPTIONS):
        Image.new("RGB", (32, 32)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(c)
    cfg = DataConfig(roots=(str(root),), image=ImageConfig(resolution=32),
                     cache=CacheConfig(text_encoder=str(pipe), text="sdxl", dtype="float32", batch_size=2))
    enc = text_encoder(cfg)
    logged = []
    result = build_cache(cfg, text=enc, only="text", progress=False, log=logged.append)
    # the over-long caption is reported once, at the end, not per batch
    assert [m for m in logged if "truncated" in m] == [
        "1 of 5 prompts were longer than 77 tokens and were truncated (at most 25 tokens cut from one prompt)"]
    return cfg, root, enc, result


def test_sdxl_text_cache_equals_prompt_encoder(cached):
    from jaxsd.text.prompts import PromptEncoder

    cfg, root, enc, result = cached
    assert enc.suffix == "sdxl_te" and result.encoded["text"] == len(CAPTIONS) + 1
    ref = PromptEncoder.from_pipeline(cfg.cache.text_encoder, "sdxl").encode(CAPTIONS + [""])
    for i, key in enumerate([str(i) for i in range(len(CAPTIONS))] + [EMPTY_CAPTION_KEY]):
        side = read_sidecar(root / f"{key}.sdxl_te")
        assert side["encoder_hidden_states"].shape == (77, 16 + 32) and side["pooled"].shape == (24,)
        assert rel_err(side["encoder_hidden_states"], ref.encoder_hidden_states[i]) <= 1e-5
        assert rel_err(side["pooled"], ref.pooled[i]) <= 1e-5


def test_text_cache_refused_for_another_text_encoder(cached, tmp_path):
    cfg, root, enc, _ = cached
    _, text = expected_specs(cfg)
    assert text == dict(enc.spec)  # what a trainer computes without loading the model
    verify_manifest(root, text=text)
    other = tiny_sdxl_pipeline(tmp_path / "other", seed=5)
    _, text_other = expected_specs(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, text_encoder=str(other))))
    with pytest.raises(CacheMismatch, match="encoder_fingerprint.*--only text"):
        verify_manifest(root, text=text_other)
    # training_loader checks both kinds: this cache has no latents, which it says with the command
    cfg_train = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, vae=str(tmp_path / "vae")))
    save_tiny_vae(tmp_path / "vae", 0)
    with pytest.raises(CacheMismatch, match=r"no cached latents; build them with `jaxsd cache run.yaml --only latents`"):
        training_loader(cfg_train, config_path="run.yaml")


def tiny_t5_text_pipeline(pipe, seed=0):
    """The text side of the SD + T5 hybrid: a 2-layer 16-wide T5, its sentencepiece tokenizer (16 tokens)
    and a `text_projection/` (16 -> 24)."""
    from jaxsd.convert.text_encoders import save_t5, save_text_projection
    from jaxsd.models.t5 import T5Config, T5EncoderModel
    from jaxsd.models.t5 import example_inputs as t5_inputs
    from jaxsd.models.text_projection import TextProjection, TextProjectionConfig
    from jaxsd.models.text_projection import example_inputs as projection_inputs
    from tests.text.tiny import write_t5_tokenizer

    write_t5_tokenizer(pipe / "tokenizer", max_length=16)
    rng = np.random.default_rng(seed)

    def random(module, inputs):
        shapes, _ = abstract_params(module, *inputs)
        return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)

    t5 = T5Config(vocab_size=160, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16)
    save_t5(pipe / "text_encoder", t5, random(T5EncoderModel(t5), t5_inputs(t5)))
    proj = TextProjectionConfig(in_features=16, out_features=24)
    save_text_projection(pipe / "text_projection", proj, random(TextProjection(proj), projection_inputs(proj)))
    return pipe


def test_t5_projected_text_cache_equals_prompt_encoder(tmp_path):
    """The hybrid's conditioning: T5 hidden states (padding masked) through the text projection."""
    from jaxsd.text.prompts import PromptEncoder

    pipe = tiny_t5_text_pipeline(tmp_path / "pipe")
    root = tmp_path / "imgs"
    root.mkdir()
    for i, c in enumerate(CAPTIONS):
        Image.new("RGB", (32, 32)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(c)
    cfg = DataConfig(roots=(str(root),), image=ImageConfig(resolution=32),
                     cache=CacheConfig(text_encoder=str(pipe), text="t5_projected", max_length=16, dtype="float32",
                                       batch_size=4))
    enc = text_encoder(cfg)
    build_cache(cfg, text=enc, only="text", progress=False, log=lambda s: None)
    assert enc.suffix == "t5_16_proj" and expected_specs(cfg)[1] == dict(enc.spec)
    ref = PromptEncoder.from_pipeline(pipe, "t5_projected", max_length=16).encode(CAPTIONS)
    for i in range(len(CAPTIONS)):
        side = read_sidecar(root / f"{i}.t5_16_proj")
        assert side.keys() == {"encoder_hidden_states"} and side["encoder_hidden_states"].shape == (16, 24)
        assert rel_err(side["encoder_hidden_states"], ref.encoder_hidden_states[i]) <= 1e-5
