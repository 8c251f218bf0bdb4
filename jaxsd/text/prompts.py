"""Prompt encoding per model family — what caching and sampling condition the UNet on.

Kinds (the names `jaxsd.data` uses for `data.cache.text`):

* ``"clip"``  SD 1.x / 2.x: one CLIP encoder's last hidden state [B, 77, D]
  (768 for SD1, 1024 for SD2 — SD2's "penultimate layer" is built into its
  checkpoint, which keeps 23 of OpenCLIP's 24 layers). ``clip_skip=k`` takes
  hidden_states[-(k+1)] through the final layer norm, as diffusers does.
* ``"sdxl"``  both encoders' penultimate hidden states concatenated
  [B, 77, 768 + 1280] and encoder 2's projected `text_embeds` as `pooled`
  [B, 1280]; ``clip_skip=k`` → hidden_states[-(k+2)], no final norm.
  An absent negative prompt with `force_zeros_for_empty_prompt` (the
  pipeline's model_index.json; diffusers' default True) gives zeros.
* ``"t5"`` / ``"t5_projected"`` the hybrid: T5's last hidden state (padding
  masked, length configurable) — through the `text_projection` component to
  the UNet's cross-attention width for ``"t5_projected"``. `attention_mask`
  says which positions are tokens.

Negative prompts follow diffusers exactly, including its quirks (they matter
for matching diffusers' images): a negative prompt is padded to the prompt's
length and encoded WITHOUT clip-skip (SD: last hidden state; SDXL: penultimate).

The computation itself is `jaxsd.text.encode.encode_token_ids` — the one
function caching, sampling and a train step that runs the text encoders share —
jitted once per batch shape and clip_skip.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsd.convert.folder import read_config
from jaxsd.convert.text_encoders import clip_config, load_clip, load_t5, load_text_projection
from jaxsd.errors import InputError, InputNotFoundError
from jaxsd.models.clip import CLIPTextModel
from jaxsd.models.t5 import T5Config, T5EncoderModel
from jaxsd.models.text_projection import TextProjection, TextProjectionConfig
from jaxsd.text.encode import (
    ENCODER_NAMES,
    KINDS,
    PROJECTION_NAME,
    TextEncoders,
    check_family,
    clip_skip_limit,
    encode_token_ids,
    tokenize,
)
from jaxsd.text.tokenizers import TextTokenizer, load_tokenizer


@dataclass(frozen=True)
class PromptEmbeddings:
    """encoder_hidden_states [N, L, D]; pooled [N, P] (SDXL) or None; attention_mask [N, L] (1 = token) —
    N = number of prompts × num_images_per_prompt, each prompt's copies adjacent (as diffusers)."""

    encoder_hidden_states: jax.Array
    pooled: jax.Array | None
    attention_mask: jax.Array

    def repeat(self, n: int) -> PromptEmbeddings:
        if n < 1:
            raise InputError(f"num_images_per_prompt must be >= 1, got {n}")
        if n == 1:
            return self
        rep = lambda x: None if x is None else jnp.repeat(x, n, axis=0)
        return PromptEmbeddings(rep(self.encoder_hidden_states), rep(self.pooled), rep(self.attention_mask))


@dataclass
class TextComponent:
    """One tokenizer + encoder pair with its params.

    lora: None, or the encoder's "lora" variables (`jaxsd.models.lora`), applied unmerged. They are
    an argument of the jitted encoding, so new values (another scale, another file of the same
    shapes) reuse the compiled program.
    """

    tokenizer: TextTokenizer
    model: CLIPTextModel | T5EncoderModel
    params: dict
    lora: dict | None = None


def guess_kind(folder: str | os.PathLike) -> str:
    """A pipeline folder's conditioning kind: text_encoder_2/ → "sdxl", text_projection/ →
    "t5_projected", a T5 text_encoder/ → "t5", else "clip"."""
    root = Path(folder)
    if not (root / "text_encoder").is_dir() and not (root / "text_encoder_2").is_dir():
        raise InputNotFoundError(f"{root}: not a pipeline folder (no text_encoder/ or text_encoder_2/)")
    if (root / "text_encoder_2").is_dir():
        return "sdxl"
    if (root / "text_projection").is_dir():
        return "t5_projected"
    config = root / "text_encoder" / "config.json"
    return "t5" if config.is_file() and json.loads(config.read_text()).get("model_type") == "t5" else "clip"


def _as_list(prompts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a non-empty list of strings")
    return prompts


@dataclass
class PromptEncoder:
    """Encodes prompts for one model family. Build with `PromptEncoder.from_pipeline(folder, kind)`.

    `encoders` / `params` are what `jaxsd.text.encode.encode_token_ids` takes: a train step that
    runs the text encoders uses them directly on cached token ids."""

    kind: str
    components: list[TextComponent]
    projection: tuple[TextProjection, dict] | None = None
    force_zeros_for_empty_prompt: bool = True
    max_length: int | None = None  # T5 only; CLIP uses its tokenizer's 77

    def __post_init__(self):
        check_family(self.kind, len(self.components), self.projection is not None)
        self.encoders = TextEncoders(self.kind, tuple(c.model for c in self.components),
                                     self.projection[0] if self.projection is not None else None)
        self.params = {ENCODER_NAMES[i]: c.params for i, c in enumerate(self.components)}
        if self.projection is not None:
            self.params[PROJECTION_NAME] = self.projection[1]
        # one compiled function per batch shape: clip_skip is a traced int32 (see `encode`)
        self._encode = jax.jit(partial(encode_token_ids, self.encoders))

    @property
    def tokenizers(self) -> list[TextTokenizer]:
        return [c.tokenizer for c in self.components]

    @property
    def text_length(self) -> int:
        """Tokens every prompt is padded/truncated to (the L of encoder_hidden_states [N, L, D])."""
        return self.max_length or self.components[0].tokenizer.max_length

    # ------------------------------------------------------------------ encoding

    def tokenize(self, prompts: str | Sequence[str], prompts_2: str | Sequence[str] | None = None) -> dict:
        """The token dict `encode_token_ids` takes (jaxsd/text/encode.py), as `encode` builds it."""
        prompts = _as_list(prompts, "prompts")
        if prompts_2 is not None and self.kind != "sdxl":
            raise InputError(f"prompts_2 is for SDXL's second text encoder; kind {self.kind!r} has one encoder")
        if prompts_2 is not None:
            prompts_2 = _as_list(prompts_2, "prompts_2")
            if len(prompts_2) != len(prompts):
                raise InputError(f"{len(prompts_2)} prompts_2 for {len(prompts)} prompts")
        return tokenize(self.tokenizers, prompts, prompts_2, self.max_length if self.kind.startswith("t5") else None)

    def encode(self, prompts: str | Sequence[str], *, prompts_2: str | Sequence[str] | None = None,
               clip_skip: int | None = None, num_images_per_prompt: int = 1) -> PromptEmbeddings:
        """Conditioning for `prompts` (SDXL: `prompts_2` for encoder 2, default the same).

        clip_skip: None or 0 = diffusers' default layer; k skips k more layers (module doc). It reaches the
        compiled encoder as a traced int32, so changing it never recompiles."""
        skip = None
        if self.kind in ("clip", "sdxl"):
            limit = None if clip_skip is None else clip_skip_limit(self.encoders)
            if limit is not None and not (isinstance(clip_skip, int) and 0 <= clip_skip <= limit):
                raise InputError(f"clip_skip={clip_skip!r}: these text encoders have layers for a clip skip of 0 "
                                 f"to {limit}")
            skip = jnp.int32(clip_skip or 0)  # 0 is exactly diffusers' None (SD: last state, SDXL: penultimate)
        elif clip_skip is not None:
            raise InputError(f"clip_skip={clip_skip} applies to CLIP text encoders only; this pipeline's is "
                             f"{self.kind!r}")
        tokens = self.tokenize(prompts, prompts_2)
        lora = {ENCODER_NAMES[i]: c.lora for i, c in enumerate(self.components) if c.lora is not None}
        out = self._encode(self.params, tokens, clip_skip=skip, variables={"lora": lora} if lora else None)
        emb = PromptEmbeddings(out["encoder_hidden_states"], out.get("pooled"), jnp.asarray(tokens["attention_mask"]))
        return emb.repeat(num_images_per_prompt)

    def encode_with_negative(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        *,
        prompts_2: str | Sequence[str] | None = None,
        negative_prompts_2: str | Sequence[str] | None = None,
        clip_skip: int | None = None,
        num_images_per_prompt: int = 1,
    ) -> tuple[PromptEmbeddings, PromptEmbeddings]:
        """(conditional, unconditional) embeddings for classifier-free guidance, as diffusers'
        `encode_prompt(..., do_classifier_free_guidance=True)`."""
        prompts = _as_list(prompts, "prompts")
        cond = self.encode(prompts, prompts_2=prompts_2, clip_skip=clip_skip)
        n = len(prompts)
        if self.kind == "sdxl" and negative_prompts is None and self.force_zeros_for_empty_prompt:
            uncond = PromptEmbeddings(jnp.zeros_like(cond.encoder_hidden_states), jnp.zeros_like(cond.pooled),
                                      jnp.zeros_like(cond.attention_mask))
        else:
            neg = _as_list(negative_prompts or "", "negative_prompts")
            neg = neg * n if len(neg) == 1 and n > 1 else neg
            if len(neg) != n:
                raise InputError(f"{len(neg)} negative prompts for {n} prompts; give one, or one per prompt")
            neg2 = None
            if self.kind == "sdxl":
                neg2 = _as_list(negative_prompts_2 or neg, "negative_prompts_2")
                neg2 = neg2 * n if len(neg2) == 1 and n > 1 else neg2
            # diffusers ignores clip_skip for the negative: SD last hidden state, SDXL penultimate
            uncond = self.encode(neg, prompts_2=neg2)
        return cond.repeat(num_images_per_prompt), uncond.repeat(num_images_per_prompt)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pipeline(cls, folder: str | os.PathLike, kind: str | None = None, *, dtype=jnp.float32,
                      param_dtype=None, max_length: int | None = None, variant: str | None = None,
                      attention_impl: str = "auto", weights: bool = True) -> PromptEncoder:
        """Load the text side of a diffusers pipeline folder.

        kind: one of KINDS; None guesses it from the folder (`guess_kind`).
        dtype: compute dtype; param_dtype: storage dtype of the loaded weights (default = dtype,
          so a bf16 encoder never holds an fp32 copy).
        max_length: T5 token length (e.g. 77/256/512); default the tokenizer's `model_max_length` (where a
          pipeline folder records the length its UNet was trained with, see jaxsd/pipelines/text_length.py).
        weights: False reads configs and tokenizers only (every params None): the modules and shapes, for a
          caller that places the weights itself (the train step's text encoders, jaxsd/train/text.py).
        """
        root = Path(folder)
        kind = kind or guess_kind(root)
        index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
        if kind not in KINDS:
            raise InputError(f"prompt encoder kind {kind!r} unknown; choose one of {KINDS}")
        store = param_dtype or dtype
        names = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if kind == "sdxl" else [])
        comps = []
        for tok_name, enc_name in names:
            for n in (tok_name, enc_name):
                if not (root / n).is_dir():
                    raise InputNotFoundError(f"{root}: kind {kind!r} needs a {n}/ folder")
            tok = load_tokenizer(root / tok_name, max_length=max_length if kind.startswith("t5") else None)
            if kind.startswith("t5"):
                config, params = (load_t5(root / enc_name, dtype=store, variant=variant) if weights else
                                  (T5Config.from_transformers(read_config(root / enc_name)), None))
                model = T5EncoderModel(config, implementation=attention_impl, dtype=dtype)
            else:
                config, params = (load_clip(root / enc_name, dtype=store, variant=variant) if weights else
                                  (clip_config(root / enc_name, variant=variant), None))
                model = CLIPTextModel(config, implementation=attention_impl, dtype=dtype)
            comps.append(TextComponent(tok, model, params))
        projection = None
        if kind == "t5_projected":
            pconfig, pparams = (load_text_projection(root / "text_projection", dtype=store) if weights else
                                (TextProjectionConfig.from_dict(read_config(root / "text_projection")), None))
            projection = (TextProjection(pconfig, dtype=dtype), pparams)
        return cls(kind, comps, projection, bool(index.get("force_zeros_for_empty_prompt", True)), max_length)


__all__ = ["KINDS", "PromptEmbeddings", "PromptEncoder", "TextComponent", "guess_kind"]
