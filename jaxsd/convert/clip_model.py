"""Load a transformers `CLIPModel` folder (both towers, as the CLIP score uses them) as two Flax models.

One checkpoint holds `text_model.*` + `text_projection.weight` (the text side, loaded as
`CLIPTextModelWithProjection` through `text_encoders.CLIP_SPEC`'s rules) and `vision_model.*` +
`visual_projection.weight` (`jaxsd.models.clip_vision`). Each load ignores the other tower's keys and
`logit_scale` (the contrastive temperature, which the score does not use); the file is memory-mapped,
so reading it twice costs no copy.
"""

from __future__ import annotations

import dataclasses
import os

from jaxsd.convert.folder import TRANSFORMERS_WEIGHTS, read_config
from jaxsd.convert.load import load_params
from jaxsd.convert.rules import ConversionSpec
from jaxsd.convert.text_encoders import CLIP_SPEC
from jaxsd.errors import InputError
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel
from jaxsd.models.clip import example_inputs as text_inputs
from jaxsd.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from jaxsd.models.clip_vision import example_inputs as vision_inputs

TEXT_SPEC = dataclasses.replace(CLIP_SPEC, ignore=(*CLIP_SPEC.ignore, r"vision_model\..*", r"visual_projection\.weight",
                                                   r"logit_scale"))
VISION_SPEC = ConversionSpec(ignore=(r"vision_model\.embeddings\.position_ids", r"text_model\..*",
                                     r"text_projection\.weight", r"logit_scale"))


@dataclasses.dataclass(frozen=True)
class CLIPModelParams:
    """Both towers of a CLIPModel folder: configs and Flax params (text: CLIPTextModelWithProjection)."""

    text_config: CLIPTextConfig
    text_params: dict
    vision_config: CLIPVisionConfig
    vision_params: dict


def load_clip_model(folder: str | os.PathLike, *, dtype=None) -> CLIPModelParams:
    """A transformers CLIPModel folder (config.json with model_type 'clip', model.safetensors) -> both towers."""
    raw = read_config(folder)
    if raw.get("model_type") != "clip" or "text_config" not in raw or "vision_config" not in raw:
        raise InputError(f"{folder}: config.json is not a transformers CLIPModel config (model_type "
                         f"{raw.get('model_type')!r}); --clip wants a CLIPModel folder such as "
                         "openai/clip-vit-large-patch14 saved with save_pretrained")
    # The projections' width is the CLIPConfig's top-level projection_dim, not the sub-configs'.
    text_config = dataclasses.replace(CLIPTextConfig.from_transformers(raw), with_projection=True,
                                      projection_dim=int(raw.get("projection_dim", CLIPTextConfig.projection_dim)))
    vision_config = CLIPVisionConfig.from_transformers(raw)
    text_params = load_params(folder, CLIPTextModel(text_config), text_inputs(text_config),
                              weights_name=TRANSFORMERS_WEIGHTS, spec=TEXT_SPEC, dtype=dtype)
    vision_params = load_params(folder, CLIPVisionModelWithProjection(vision_config), vision_inputs(vision_config),
                                weights_name=TRANSFORMERS_WEIGHTS, spec=VISION_SPEC, dtype=dtype)
    return CLIPModelParams(text_config, text_params, vision_config, vision_params)


__all__ = ["CLIPModelParams", "load_clip_model"]
