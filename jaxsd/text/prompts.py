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

Every encoder runs through one jitted function per component, compiled once
per batch shape.
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

from jaxsd.convert.text_encoders import load_clip, load_t5, load_text_projection
from jaxsd.errors import InputError, InputNotFoundError
from jaxsd.models.clip import CLIPTextModel
from jaxsd.models.layers import LayerNorm
from jaxsd.models.t5 import T5EncoderModel
from jaxsd.models.text_projection import TextProjection
from jaxsd.text.tokenizers import TextTokenizer, load_tokenizer

KINDS = ("clip", "sdxl", "t5", "t5_projected")


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
    """One tokenizer + encoder pair with its params and a jitted forward.

    lora: None, or the encoder's "lora" variables (`jaxsd.models.lora`), applied unmerged. They are
    an argument of the jitted forward, so new values (another scale, another file of the same
    shapes) reuse the compiled program.
    """

    tokenizer: TextTokenizer
    model: CLIPTextModel | T5EncoderModel
    params: dict
    lora: dict | None = None

    def __post_init__(self):
        model = self.model
        # diffusers passes CLIP a padding mask only when the config asks (`use_attention_mask`).
        use_mask = not isinstance(model, CLIPTextModel) or bool(
            dict(model.config.extra).get("use_attention_mask", False))

        def forward(params, lora, ids, mask):
            variables = {"params": params} if lora is None else {"params": params, "lora": lora}
            return model.apply(variables, ids, mask if use_mask else None)

        self._forward = jax.jit(forward)

    def __call__(self, prompts: Sequence[str], max_length: int | None = None):
        batch = self.tokenizer(prompts, max_length)
        return self._forward(self.params, self.lora, batch.input_ids, batch.attention_mask), batch.attention_mask


@partial(jax.jit, static_argnums=0)
def _final_norm(eps: float, params: dict, h: jax.Array) -> jax.Array:
    """CLIP's final layer norm on an intermediate hidden state (clip-skip)."""
    return LayerNorm(eps, dtype=h.dtype).apply({"params": params["text_model"]["final_layer_norm"]}, h)


def _as_list(prompts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a non-empty list of strings")
    return prompts


@dataclass
class PromptEncoder:
    """Encodes prompts for one model family. Build with `PromptEncoder.from_pipeline(folder, kind)`."""

    kind: str
    components: list[TextComponent]
    projection: tuple[TextProjection, dict] | None = None
    force_zeros_for_empty_prompt: bool = True
    max_length: int | None = None  # T5 only; CLIP uses its tokenizer's 77

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"prompt encoder kind {self.kind!r} unknown; choose one of {KINDS}")
        want = {"clip": 1, "sdxl": 2, "t5": 1, "t5_projected": 1}[self.kind]
        if len(self.components) != want:
            raise InputError(f"kind {self.kind!r} needs {want} text encoder(s), got {len(self.components)}")
        if (self.kind == "t5_projected") != (self.projection is not None):
            raise InputError("a text projection goes with kind 't5_projected' and only with it")
        if self.projection is not None:
            proj = self.projection[0]
            self._project = jax.jit(lambda p, h: proj.apply({"params": p}, h))

    @property
    def text_length(self) -> int:
        """Tokens every prompt is padded/truncated to (the L of encoder_hidden_states [N, L, D])."""
        return self.max_length or self.components[0].tokenizer.max_length

    # ------------------------------------------------------------------ encoding

    def encode(self, prompts: str | Sequence[str], *, prompts_2: str | Sequence[str] | None = None,
               clip_skip: int | None = None, num_images_per_prompt: int = 1) -> PromptEmbeddings:
        """Conditioning for `prompts` (SDXL: `prompts_2` for encoder 2, default the same)."""
        prompts = _as_list(prompts, "prompts")
        if prompts_2 is not None and self.kind != "sdxl":
            raise InputError(f"prompts_2 is for SDXL's second text encoder; kind {self.kind!r} has one encoder")
        if clip_skip is not None and (self.kind not in ("clip", "sdxl") or clip_skip < 0):
            raise InputError(f"clip_skip={clip_skip} applies to CLIP encoders only, as a non-negative int")
        if self.kind == "clip":
            comp = self.components[0]
            out, mask = comp(prompts)
            if clip_skip is None:
                h = out.last_hidden_state
            else:
                h = _final_norm(comp.model.config.layer_norm_eps, comp.params, out.hidden_states[-(clip_skip + 1)])
            emb = PromptEmbeddings(h, None, mask)
        elif self.kind == "sdxl":
            emb = self._encode_sdxl(prompts, _as_list(prompts_2 or prompts, "prompts_2"), -((clip_skip or 0) + 2))
        else:
            emb = self._encode_t5(prompts)
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
            if self.kind == "sdxl":
                neg2 = _as_list(negative_prompts_2 or neg, "negative_prompts_2")
                neg2 = neg2 * n if len(neg2) == 1 and n > 1 else neg2
                uncond = self._encode_sdxl(neg, neg2, -2)  # diffusers ignores clip_skip here
            else:
                uncond = self.encode(neg)  # likewise: last hidden state, no clip_skip
        return cond.repeat(num_images_per_prompt), uncond.repeat(num_images_per_prompt)

    def _encode_sdxl(self, prompts: list[str], prompts_2: list[str], layer: int) -> PromptEmbeddings:
        if len(prompts_2) != len(prompts):
            raise InputError(f"{len(prompts_2)} prompts_2 for {len(prompts)} prompts")
        (out1, mask1), (out2, _) = self.components[0](prompts), self.components[1](prompts_2)
        if out2.text_embeds is None:
            raise InputError("SDXL's second text encoder must be a CLIPTextModelWithProjection (text_embeds)")
        h1, h2 = out1.hidden_states[layer], out2.hidden_states[layer]
        h = jnp.concatenate([h1, h2.astype(h1.dtype)], axis=-1)
        return PromptEmbeddings(h, out2.text_embeds, mask1)

    def _encode_t5(self, prompts: list[str]) -> PromptEmbeddings:
        out, mask = self.components[0](prompts, self.max_length)
        h = out.last_hidden_state
        if self.projection is not None:
            h = self._project(self.projection[1], h)
        return PromptEmbeddings(h, None, mask)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pipeline(cls, folder: str | os.PathLike, kind: str | None = None, *, dtype=jnp.float32,
                      param_dtype=None, max_length: int | None = None, variant: str | None = None,
                      attention_impl: str = "auto") -> PromptEncoder:
        """Load the text side of a diffusers pipeline folder.

        kind: one of KINDS; None guesses it: tokenizer_2/ + text_encoder_2/ → "sdxl",
          text_projection/ → "t5_projected", a T5 text_encoder → "t5", else "clip".
        dtype: compute dtype; param_dtype: storage dtype of the loaded weights (default = dtype,
          so a bf16 encoder never holds an fp32 copy).
        max_length: T5 token length (e.g. 77/256/512); default the tokenizer's `model_max_length` (where a
          pipeline folder records the length its UNet was trained with, see jaxsd/pipelines/text_length.py).
        """
        root = Path(folder)
        if not (root / "text_encoder").is_dir() and not (root / "text_encoder_2").is_dir():
            raise InputNotFoundError(f"{root}: not a pipeline folder (no text_encoder/ or text_encoder_2/)")
        index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
        te_config = json.loads((root / "text_encoder" / "config.json").read_text()) \
            if (root / "text_encoder" / "config.json").is_file() else {}
        if kind is None:
            if (root / "text_encoder_2").is_dir():
                kind = "sdxl"
            elif (root / "text_projection").is_dir():
                kind = "t5_projected"
            else:
                kind = "t5" if te_config.get("model_type") == "t5" else "clip"
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
                config, params = load_t5(root / enc_name, dtype=store, variant=variant)
                model = T5EncoderModel(config, implementation=attention_impl, dtype=dtype)
            else:
                config, params = load_clip(root / enc_name, dtype=store, variant=variant)
                model = CLIPTextModel(config, implementation=attention_impl, dtype=dtype)
            comps.append(TextComponent(tok, model, params))
        projection = None
        if kind == "t5_projected":
            pconfig, pparams = load_text_projection(root / "text_projection", dtype=store)
            projection = (TextProjection(pconfig, dtype=dtype), pparams)
        return cls(kind, comps, projection, bool(index.get("force_zeros_for_empty_prompt", True)), max_length)


__all__ = ["KINDS", "PromptEmbeddings", "PromptEncoder", "TextComponent"]
