"""Token-id caches (data.cache.text_mode=tokens): `jaxsd cache` stores each caption's token ids per
tokenizer, the loader yields them, and `encode_token_ids` on them equals `PromptEncoder.encode` on the
captions (itself checked against diffusers in tests/text/test_prompts.py) and the embeddings cache, for
SD1, an SD2-style CLIP (pad "!", padding mask), SDXL and the hybrid's T5 + projection."""

import dataclasses
import shutil
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.data.cache import EMPTY_CAPTION_KEY, build_cache
from jaxsd.data.config import (
    CacheConfig,
    DataConfig,
    ImageConfig,
    LoaderConfig,
    ValidationConfig,
    check_data_config,
)
from jaxsd.data.loader import Loader
from jaxsd.data.manifest import CacheMismatch, fingerprint_folder, read_manifest, verify_manifest
from jaxsd.data.model_encoders import expected_specs, text_encoder, text_family
from jaxsd.data.records import read_sidecar
from jaxsd.errors import ConfigError
from jaxsd.text.encode import encode_token_ids
from jaxsd.text.prompts import PromptEncoder
from tests.data.test_cache_text import _save_tiny_clip, tiny_sdxl_pipeline, tiny_t5_text_pipeline
from tests.helpers import rel_err
from tests.text.tiny import write_clip_tokenizer

# an empty caption among them (trained as "", data.validation.missing_caption=empty) and an over-long one
CAPTIONS = ["a photo of a cat", "an oil painting of a castle at sunset", "", "dog", " ".join(["cat"] * 100)]


def _clip_pipeline(root, *, sd2=False, seed=0):
    """SD1: tokenizer padding with <|endoftext|>; SD2-style: pad "!" and an encoder that takes the padding mask."""
    write_clip_tokenizer(root / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    _save_tiny_clip(root / "text_encoder", seed, 16, False, (("use_attention_mask", True),) if sd2 else ())
    return root


# name -> (family, token length, pipeline builder)
FAMILIES = {"sd1": ("clip", 77, _clip_pipeline), "sd2": ("clip", 77, partial(_clip_pipeline, sd2=True)),
            "sdxl": ("sdxl", 77, tiny_sdxl_pipeline), "hybrid": ("t5_projected", 16, tiny_t5_text_pipeline)}


def _images(root):
    root.mkdir()
    for i, c in enumerate(CAPTIONS):
        Image.new("RGB", (32, 32)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(c)
    return root


def _config(root, pipe, family, length, mode, **cache):
    return DataConfig(roots=(str(root),), image=ImageConfig(resolution=32),
                      validation=ValidationConfig(missing_caption="empty"),
                      cache=CacheConfig(text_encoder=str(pipe), text=family, text_mode=mode, dtype="float32",
                                        max_length=length if family.startswith("t5") else 0, batch_size=2, **cache),
                      loader=LoaderConfig(batch_size=len(CAPTIONS), shuffle=False, threads=1, prefetch=1))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_cache(request, tmp_path_factory):
    """One tiny pipeline per family; its captions cached as token ids and, in another root, as embeddings."""
    family, length, build = FAMILIES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    pipe = build(base / "pipe")
    cfg = _config(_images(base / "tokens"), pipe, family, length, "tokens")
    emb_cfg = _config(_images(base / "embeddings"), pipe, family, length, "embeddings")
    for c in (cfg, emb_cfg):
        build_cache(c, text=text_encoder(c), only="text", progress=False, log=lambda s: None)
    pe = PromptEncoder.from_pipeline(pipe, family, max_length=length if family.startswith("t5") else None)
    return request.param, cfg, emb_cfg, pe


def test_cached_token_ids_encode_like_prompt_encoder(family_cache):
    name, cfg, emb_cfg, pe = family_cache
    family, length, _ = FAMILIES[name]
    loader = Loader(cfg, text=expected_specs(cfg)[1])
    assert loader.text_mode == "tokens"
    batch = next(loader)
    keys = {"input_ids", "attention_mask"} | ({"input_ids_2", "attention_mask_2"} if family == "sdxl" else set())
    assert set(batch) == keys | {"index"}
    for k in keys:
        assert batch[k].dtype == np.int32 and batch[k].shape == (len(CAPTIONS), length), k
    captions = [CAPTIONS[int(loader.store.entries[i][1])] for i in batch["index"]]
    assert "" in captions
    ref_tokens = pe.tokenize(captions)
    for k in keys:  # the cached ids are exactly what prompt encoding tokenizes
        np.testing.assert_array_equal(batch[k], ref_tokens[k])
    empty = loader.empty_prompt()
    assert set(empty) == keys and all(v.shape == (length,) and v.dtype == np.int32 for v in empty.values())
    for k in keys:
        np.testing.assert_array_equal(empty[k], pe.tokenize([""])[k][0])

    # the step's encoding: jitted, batch of 6 = the 5 cached captions + the cached empty caption
    tokens = {k: np.concatenate([batch[k], empty[k][None]]) for k in keys}
    out = jax.jit(partial(encode_token_ids, pe.encoders))(pe.params, tokens)
    ref = pe.encode(captions + [""])
    assert set(out) == ({"encoder_hidden_states", "pooled"} if family == "sdxl" else {"encoder_hidden_states"})
    assert rel_err(out["encoder_hidden_states"], ref.encoder_hidden_states) <= 1e-6
    if family == "sdxl":
        assert rel_err(out["pooled"], ref.pooled) <= 1e-6
    # ... and what the embeddings cache holds for the same captions, the empty one included (dropout)
    emb_root = emb_cfg.roots[0]
    suffix = expected_specs(emb_cfg)[1]["suffix"]
    for row, key in enumerate([loader.store.entries[i][1] for i in batch["index"]] + [EMPTY_CAPTION_KEY]):
        side = read_sidecar(Path(emb_root) / f"{key}.{suffix}")
        assert set(side) == set(out)
        for k, v in side.items():
            assert rel_err(out[k][row], v) <= 1e-6, (key, k)


@pytest.fixture(scope="module")
def sdxl_cache(tmp_path_factory):
    base = tmp_path_factory.mktemp("sdxl_tokens")
    pipe = tiny_sdxl_pipeline(base / "pipe")
    cfg = _config(_images(base / "imgs"), pipe, "tokens", 77, "embeddings")  # the spelling: text: tokens
    build_cache(cfg, text=text_encoder(cfg), only="text", progress=False, log=lambda s: None)
    return base, pipe, cfg


def test_manifest_records_tokenizers_and_refuses_others(sdxl_cache):
    base, pipe, cfg = sdxl_cache
    root = cfg.roots[0]
    manifest = read_manifest(root)
    spec = manifest["text"]
    assert spec == {"suffix": "sdxl_ids", "producer": "sdxl_ids", "mode": "tokens", "max_length": 77, "dtype": "int32",
                    "tokenizers": {n: {"fingerprint": fingerprint_folder(pipe / n), "max_length": 77}
                                   for n in ("tokenizer", "tokenizer_2")}}
    # `text: tokens` reads the family from the folder: the same cache as naming it
    named = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, text="sdxl", text_mode="tokens"))
    assert expected_specs(cfg)[1] == expected_specs(named)[1] == spec
    side = read_sidecar(base / "imgs" / "0.sdxl_ids")
    assert {k: (v.dtype, v.shape) for k, v in side.items()} == {
        k: (np.int32, (77,)) for k in ("input_ids", "attention_mask", "input_ids_2", "attention_mask_2")}
    assert (base / "imgs" / f"{EMPTY_CAPTION_KEY}.sdxl_ids").is_file()

    def expected_with(folder, **cache):
        return expected_specs(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, text_encoder=str(folder),
                                                                                 **cache)))[1]

    # other encoder weights, the same tokenizers: the token ids still fit (what text-encoder training needs)
    verify_manifest(root, text=expected_with(tiny_sdxl_pipeline(base / "retrained", seed=5)))
    # a second tokenizer that pads with <|endoftext|> instead of "!": refused, naming the field and the fix
    other = tiny_sdxl_pipeline(base / "other")
    write_clip_tokenizer(other / "tokenizer_2")
    with pytest.raises(CacheMismatch, match=r"tokenizers: cache has .*`jaxsd cache CONFIG --only text`"):
        verify_manifest(root, text=expected_with(other))
    with pytest.raises(CacheMismatch, match=r"tokenizers: cache has"):
        Loader(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, text_encoder=str(other))),
               text=expected_with(other))
    # an embeddings run on a token-id cache: one sentence saying so, not a list of unshared fields
    with pytest.raises(CacheMismatch, match=r"holds text token ids but this run expects embeddings "
                                            r"\(data.cache.text_mode=embeddings\).*set data.cache.text_mode=tokens"):
        verify_manifest(root, text=expected_with(pipe, text="sdxl"))


def test_packed_token_cache_reads_like_the_sidecars(sdxl_cache, tmp_path):
    from jaxsd.data.pack import pack_cache

    _, _, cfg = sdxl_cache
    packed = pack_cache(cfg, tmp_path / "packed")
    text = expected_specs(cfg)[1]
    a, b = Loader(cfg, text=text), Loader(dataclasses.replace(cfg, packed=(str(packed),)), text=text)
    x, y = next(a), next(b)
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)
    ea, eb = a.empty_prompt(), b.empty_prompt()
    assert ea.keys() == eb.keys() and all(np.array_equal(ea[k], eb[k]) for k in ea)


def test_token_mode_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.cache.text_mode='ids' is not one of embeddings, tokens"):
        check_data_config(DataConfig(cache=CacheConfig(text_mode="ids")))
    with pytest.raises(ConfigError, match="data.cache.text=tokens reads the model family from data.cache.text_encoder"):
        text_family(DataConfig(cache=CacheConfig(text="tokens")))
    folder = _clip_pipeline(tmp_path / "enc_only")  # no tokenizer folder to make token ids with
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer: a token-id cache"):
        expected_specs(DataConfig(cache=CacheConfig(text_encoder=str(folder), text="clip", text_mode="tokens")))
