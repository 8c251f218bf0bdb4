"""The train step's conditioning from token ids (jaxsd/train/text.py) equals `PromptEncoder.encode`
(itself checked against diffusers in tests/text/test_prompts.py) for SD1, SD2 (padding mask), SDXL (both
encoders' penultimate states and the pooled embedding) — with text-encoder adapters — and the hybrid's
T5 + projection; a sample dropped by loss.cond_dropout is the empty caption's encoding.

Whole runs (a token cache against an embedding cache, text-encoder LoRA through the CLI) are in
tests/train/test_text_training.py.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import Config, LoRAConfig, TrainConfig
from jaxsd.data.config import CacheConfig, DataConfig
from jaxsd.models.lora import scale_adapters
from jaxsd.text.prompts import PromptEncoder
from jaxsd.train.sharding import make_mesh
from jaxsd.train.text import (
    load_text_params,
    step_text,
    text_conditioning,
    text_shardings,
    text_variables,
)
from tests.data.test_cache_tokens import FAMILIES
from tests.helpers import rel_err

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


def test_what_the_step_cannot_encode_is_refused_by_name(tmp_path):
    from jaxsd.config import ModelConfig, load_config
    from jaxsd.errors import ConfigError
    from jaxsd.train.plan import plan_state
    from tests.data.test_cache_text import tiny_sdxl_pipeline, tiny_t5_text_pipeline
    from tests.train.tiny_pipeline import UNET

    with pytest.raises(ConfigError, match="lora.text_encoder: .* set data.cache.text_mode: tokens"):
        load_config("tiny", ["model.pretrained=/x", "lora.rank=4", "lora.text_encoder=true"])

    def config(pipe, family, **lora):
        return Config(model=ModelConfig(unet=UNET.to_diffusers()), train=TrainConfig(data_source="cache"),
                      data=DataConfig(cache=CacheConfig(text_encoder=str(pipe), text=family, text_mode="tokens",
                                                        max_length=16 if family.startswith("t5") else 0)),
                      lora=LoRAConfig(**lora))

    t5 = tiny_t5_text_pipeline(tmp_path / "t5")
    with pytest.raises(ConfigError, match="lora.text_encoder: the t5_projected text encoder is a T5"):
        step_text(config(t5, "t5_projected", rank=4, text_encoder=True))
    sdxl = tiny_sdxl_pipeline(tmp_path / "sdxl")  # 16 + 32-wide encoders; the UNet takes 32
    with pytest.raises(ConfigError, match="gives 48-wide text embeddings, but the UNet has cross_attention_dim=32"):
        plan_state(config(sdxl, "tokens"), make_mesh(Config().sharding))
    with pytest.raises(ConfigError, match="leave none of the text encoders' 24 adapters to train"):
        step_text(dataclasses.replace(config(sdxl, "sdxl", rank=4, text_encoder=True),
                                      train=TrainConfig(data_source="cache", trainable=["up_blocks"])))


def test_lora_dropout_reaches_each_text_encoders_adapters_with_its_own_masks(tmp_path):
    # lora.dropout applies to the text encoders' adapters too: the step's per-sample keys, folded per encoder
    # (SDXL's two encoders name their layers alike), change the encoding
    from jaxsd.models.lora import dropout_keys
    from tests.data.test_cache_text import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(tmp_path / "pipe")
    text = step_text(Config(train=TrainConfig(data_source="cache"),
                            data=DataConfig(cache=CacheConfig(text_encoder=str(pipe), text="sdxl", text_mode="tokens")),
                            lora=LoRAConfig(rank=4, alpha=2, text_encoder=True, dropout=0.5)))
    frozen = load_text_params(text, jnp.float32, text_shardings(text, make_mesh(Config().sharding),
                                                                Config().sharding.rules, jnp.float32)[0])
    rng = np.random.default_rng(0)
    trained = {c: jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                               plan.shapes(jnp.float32)) for c, plan in text.adapters.items()}
    draws = {"lora_dropout": dropout_keys(jax.random.key(0), 3)}
    _, variables = text_variables(text, trained, frozen, draws)
    q = {c: variables["lora_dropout"][c]["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]
         for c in ("text_encoder", "text_encoder_2")}
    assert not np.array_equal(q["text_encoder"]["keys"], q["text_encoder_2"]["keys"])
    assert float(q["text_encoder"]["rate"]) == 0.5

    batch = {**PromptEncoder.from_pipeline(pipe, "sdxl").tokenize(CAPTIONS), "latents": np.zeros((3, 2, 2, 4))}
    drop = jnp.zeros(3, bool)
    encode = jax.jit(text_conditioning(text, partial(text_variables, text), None))
    plain = encode(trained, frozen, batch, drop)
    dropped = encode(trained, frozen, batch, drop, draws)
    for k in ("encoder_hidden_states", "pooled"):  # both encoders' adapters see their inputs dropped
        assert rel_err(dropped[k], plain[k]) > 1e-3, k
