"""Token ids -> UNet conditioning: the one prompt-encoding function of caching, training and sampling.

`tokenize` turns captions into a dict of token arrays; `encode_token_ids` is a
pure, jittable function of (text-encoder params, that dict). `PromptEncoder`
(sampling), `jaxsd cache` (embeddings) and a train step that runs the text
encoders (token-id caches) all call these two, so they cannot drift apart.

Token dict (all int32, batch-leading; what a token-id cache stores and the loader yields):

    "input_ids" [B, L], "attention_mask" [B, L]          tokenizer/   (every family)
    "input_ids_2" [B, L], "attention_mask_2" [B, L]      tokenizer_2/ (SDXL only)

Params dict, keyed by the pipeline's component folder names:

    {"text_encoder": ..., "text_encoder_2": ... (SDXL), "text_projection": ... (t5_projected)}

Conditioning per kind (see jaxsd/text/prompts.py for the diffusers behaviour each mirrors):
clip: last hidden state (clip_skip=k: hidden_states[-(k+1)] through the final norm);
sdxl: both encoders' hidden_states[-(k+2)] (k = clip_skip or 0) concatenated, and
encoder 2's projected `text_embeds` as "pooled"; t5: last hidden state (padding masked);
t5_projected: that, through the text projection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.errors import InputError
from jaxsd.models.clip import CLIPTextModel
from jaxsd.models.layers import LayerNorm
from jaxsd.models.t5 import T5EncoderModel
from jaxsd.models.text_projection import TextProjection
from jaxsd.text.tokenizers import TextTokenizer

KINDS = ("clip", "sdxl", "t5", "t5_projected")
ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # params keys, in tokenizer order
PROJECTION_NAME = "text_projection"
ENCODER_COUNT = {"clip": 1, "sdxl": 2, "t5": 1, "t5_projected": 1}


def token_keys(index: int) -> tuple[str, str]:
    """(ids key, mask key) of tokenizer number `index` (0: tokenizer/, 1: tokenizer_2/)."""
    tail = "" if index == 0 else f"_{index + 1}"
    return f"input_ids{tail}", f"attention_mask{tail}"


def tokenize(tokenizers: Sequence[TextTokenizer], prompts: Sequence[str], prompts_2: Sequence[str] | None = None,
             max_length: int | None = None) -> dict[str, np.ndarray]:
    """The token dict of `prompts` (SDXL: `prompts_2` for the second tokenizer, default the same).

    max_length: pad/truncate length (T5); None = each tokenizer's own (77 for CLIP)."""
    out = {}
    for i, tok in enumerate(tokenizers):
        batch = tok(list(prompts if i == 0 or prompts_2 is None else prompts_2), max_length)
        ids_key, mask_key = token_keys(i)
        out[ids_key], out[mask_key] = batch.input_ids, batch.attention_mask
    return out


def check_family(kind: str, encoders: int, projection: bool) -> None:
    """Raise InputError unless `kind` is known and has this many encoders and a projection iff t5_projected."""
    if kind not in KINDS:
        raise InputError(f"prompt encoder kind {kind!r} unknown; choose one of {KINDS}")
    if encoders != ENCODER_COUNT[kind]:
        raise InputError(f"kind {kind!r} needs {ENCODER_COUNT[kind]} text encoder(s), got {encoders}")
    if (kind == "t5_projected") != projection:
        raise InputError("a text projection goes with kind 't5_projected' and only with it")


@dataclass(frozen=True)
class TextEncoders:
    """The modules that encode one family's token ids (no weights; hashable, so it can be a static jit arg).

    encoders: one CLIP/T5 module per tokenizer (SDXL: 2); projection: the hybrid's TextProjection.
    """

    kind: str
    encoders: tuple[CLIPTextModel | T5EncoderModel, ...]
    projection: TextProjection | None = None

    def __post_init__(self):
        check_family(self.kind, len(self.encoders), self.projection is not None)

    def uses_mask(self, index: int) -> bool:
        """Whether encoder `index` sees the padding mask: T5 always; CLIP only when its config asks
        (`use_attention_mask`), as diffusers passes it."""
        model = self.encoders[index]
        return not isinstance(model, CLIPTextModel) or bool(dict(model.config.extra).get("use_attention_mask"))


def _variables(name: str, params: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]] | None) -> dict:
    return {"params": params[name], **{c: tree[name] for c, tree in (extra or {}).items() if name in tree}}


def clip_skip_limit(encoders: TextEncoders) -> int:
    """The largest clip skip these CLIP encoders have layers for (diffusers indexes hidden_states, which
    hold the embeddings and each layer: SD reaches the embeddings at N, SDXL at N - 1, N the fewest layers)."""
    layers = min(e.config.num_hidden_layers for e in encoders.encoders)
    return layers if encoders.kind == "clip" else layers - 1


def hidden_state_from_end(states: Sequence[jax.Array], back) -> jax.Array:
    """states[-back] for a Python int or a traced int32 `back` (1 = the last state)."""
    if isinstance(back, int):
        return states[-back]
    return jnp.stack(states)[len(states) - back]


def encode_token_ids(encoders: TextEncoders, params: Mapping[str, Any], tokens: Mapping[str, jax.Array], *,
                     clip_skip: int | None = None, variables: Mapping[str, Mapping[str, Any]] | None = None,
                     rngs: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Conditioning of a batch of token ids; pure and jittable (`encoders` static, e.g. closed over).

    params: {"text_encoder": ..., "text_encoder_2"?: ..., "text_projection"?: ...} (see module doc).
    tokens: {"input_ids": [B, L] int, "attention_mask": [B, L] int, "_2" keys for SDXL} (`tokenize`).
    clip_skip: CLIP kinds only; None = the layer diffusers uses by default (SD: last, SDXL: penultimate).
      A Python int or a traced int32 scalar (the layer is then picked from the stacked hidden states, so
      another clip skip reuses the compiled function); its range is the caller's to check (`clip_skip_limit`).
    variables: other variable collections, per component, passed to each module's `apply` beside its
      params, e.g. {"lora": {"text_encoder": {...}, "text_encoder_2": {...}}}; a component missing from
      a collection gets none of it.
    rngs: passed to each encoder's `apply` (e.g. {"dropout": key}), folded with the encoder's index so
      the two SDXL encoders draw independent streams.
    Returns {"encoder_hidden_states": [B, L, D], "pooled": [B, P] (SDXL only)}.
    """
    kind = encoders.kind
    if clip_skip is not None and kind not in ("clip", "sdxl"):
        raise InputError(f"clip_skip={clip_skip} applies to CLIP encoders only (kind {kind!r})")
    if isinstance(clip_skip, int) and not 0 <= clip_skip <= clip_skip_limit(encoders):
        raise InputError(f"clip_skip={clip_skip} is out of range for these text encoders: 0 to "
                         f"{clip_skip_limit(encoders)}")

    def run(i: int):
        ids_key, mask_key = token_keys(i)
        if ids_key not in tokens or (encoders.uses_mask(i) and mask_key not in tokens):
            raise InputError(f"kind {kind!r} needs token arrays {ids_key!r} and {mask_key!r}; got {sorted(tokens)}")
        mask = tokens[mask_key] if encoders.uses_mask(i) else None
        keys = None if rngs is None else {k: jax.random.fold_in(r, i) for k, r in rngs.items()}
        return encoders.encoders[i].apply(_variables(ENCODER_NAMES[i], params, variables), tokens[ids_key], mask,
                                          rngs=keys)

    if kind == "clip":
        out = run(0)
        if clip_skip is None:
            return {"encoder_hidden_states": out.last_hidden_state}
        h = hidden_state_from_end(out.hidden_states, clip_skip + 1)
        norm = LayerNorm(encoders.encoders[0].config.layer_norm_eps, dtype=h.dtype)
        return {"encoder_hidden_states": norm.apply(
            {"params": params[ENCODER_NAMES[0]]["text_model"]["final_layer_norm"]}, h)}
    if kind == "sdxl":
        first, second = run(0), run(1)
        if second.text_embeds is None:
            raise InputError("SDXL's second text encoder must be a CLIPTextModelWithProjection (text_embeds)")
        back = (0 if clip_skip is None else clip_skip) + 2
        h1, h2 = hidden_state_from_end(first.hidden_states, back), hidden_state_from_end(second.hidden_states, back)
        return {"encoder_hidden_states": jnp.concatenate([h1, h2.astype(h1.dtype)], axis=-1),
                "pooled": second.text_embeds}
    h = run(0).last_hidden_state
    if kind == "t5_projected":
        h = encoders.projection.apply(_variables(PROJECTION_NAME, params, variables), h)
    return {"encoder_hidden_states": h}


__all__ = ["ENCODER_NAMES", "KINDS", "PROJECTION_NAME", "TextEncoders", "check_family", "clip_skip_limit",
           "encode_token_ids", "hidden_state_from_end", "token_keys", "tokenize"]
