"""CLIP score: how well each image matches its prompt, as torchmetrics' `CLIPScore` defines it.

  score_i = 100 · max(cos(image_embeds_i, text_embeds_i), 0)

with the embeddings of a transformers `CLIPModel` folder (`get_image_features` / `get_text_features`).
The folder also holds the CLIP tokenizer and `preprocessor_config.json`; images are prepared as
transformers' PIL `CLIPImageProcessor` does (see `preprocess`). torchmetrics' `CLIPScore.compute` clamps
the *mean* of the unclamped scores; `clip_score` returns each image's clamped score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxsd.convert.clip_model import CLIPModelParams, load_clip_model
from jaxsd.errors import InputError
from jaxsd.models.clip import CLIPTextModel
from jaxsd.models.clip_vision import CLIPVisionModelWithProjection
from jaxsd.text.tokenizers import TextTokenizer, load_tokenizer

# transformers' PILImageResampling values (= PIL's): the processor config stores the number.
_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
             3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


@dataclass(frozen=True)
class CLIPPreprocess:
    """The `CLIPImageProcessor` settings of a preprocessor_config.json (the defaults are its class defaults)."""

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = 3  # bicubic
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPPreprocess:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise InputError(f"{path} does not exist; a CLIP folder for the CLIP score needs the image processor "
                             "config (save the CLIPProcessor/CLIPImageProcessor into the same folder)")
        raw = json.loads(path.read_text())
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if raw.get(flag) is False:
                raise InputError(f"{path}: {flag} is false; only the standard CLIP preprocessing is supported")
        size, crop = raw.get("size", {"shortest_edge": 224}), raw.get("crop_size", {"height": 224, "width": 224})
        # Older configs (openai/clip-vit-*) store bare ints: size is then the shortest edge, crop a square.
        size = {"shortest_edge": size} if isinstance(size, int) else size
        if not isinstance(size, dict) or set(size) != {"shortest_edge"}:
            raise InputError(f"{path}: size {size!r} is not supported; expected {{'shortest_edge': N}}")
        crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        if max(crop) > size["shortest_edge"]:
            raise InputError(f"{path}: crop_size {crop} is larger than size.shortest_edge {size['shortest_edge']}")
        if int(raw.get("resample", 3)) not in _RESAMPLE:
            raise InputError(f"{path}: resample {raw.get('resample')!r} unknown; expected one of {sorted(_RESAMPLE)}")
        return cls(int(size["shortest_edge"]), (int(crop[0]), int(crop[1])), int(raw.get("resample", 3)),
                   float(raw.get("rescale_factor", cls.rescale_factor)),
                   tuple(raw.get("image_mean", cls.image_mean)), tuple(raw.get("image_std", cls.image_std)))


def preprocess(image: np.ndarray, settings: CLIPPreprocess) -> np.ndarray:
    """One uint8 RGB image [H, W, 3] -> float32 [crop_h, crop_w, 3], as the PIL CLIPImageProcessor:
    resize the shortest side to `shortest_edge` (the long side int(s · long / short)), center crop
    (top = (h - crop_h) // 2), rescale (in float64, as transformers), normalise."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"CLIP score images must be uint8 RGB [H, W, 3]; got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    s = settings.shortest_edge
    new_h, new_w = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=_RESAMPLE[settings.resample]))
    ch, cw = settings.crop_size
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    crop = resized[top:top + ch, left:left + cw]
    x = (crop.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    return (x - np.asarray(settings.image_mean, np.float32)) / np.asarray(settings.image_std, np.float32)


@dataclass
class CLIPScorer:
    """A loaded CLIPModel folder: `scorer.clip_score(images, prompts) -> [N]`."""

    model: CLIPModelParams
    tokenizer: TextTokenizer
    settings: CLIPPreprocess
    _image: Callable = field(init=False, repr=False)
    _text: Callable = field(init=False, repr=False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPScorer:
        """A transformers CLIPModel folder with its tokenizer and preprocessor_config.json (as
        `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained` write it)."""
        model = load_clip_model(folder)
        tokenizer = load_tokenizer(folder, max_length=model.text_config.max_position_embeddings, kind="clip")
        return cls(model, tokenizer, CLIPPreprocess.from_folder(folder))

    def __post_init__(self):
        # One compile per batch size: preprocessing brings every image to the crop size first.
        vision, text = CLIPVisionModelWithProjection(self.model.vision_config), CLIPTextModel(self.model.text_config)
        self._image = jax.jit(lambda p, x: vision.apply({"params": p}, x))
        self._text = jax.jit(lambda p, ids, mask: text.apply({"params": p}, ids, mask).text_embeds)

    def image_embeds(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images [H, W, 3] (sizes may differ) -> [N, projection_dim] (unnormalised)."""
        pixels = np.stack([preprocess(im, self.settings) for im in images])
        return np.asarray(self._image(self.model.vision_params, pixels))

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> [N, projection_dim] (unnormalised). Longer prompts are cut to the model's length as
        torchmetrics does: the tokens are sliced, so a cut prompt has no end-of-text token."""
        limit = self.model.text_config.max_position_embeddings
        batch = self.tokenizer(list(prompts), max_length=limit)
        if batch.lengths.max() > limit:
            batch = self.tokenizer(list(prompts), max_length=int(batch.lengths.max()))
        ids, mask = batch.input_ids[:, :limit], batch.attention_mask[:, :limit]
        return np.asarray(self._text(self.model.text_params, ids, mask))

    def clip_score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """images: N uint8 RGB [H, W, 3]; prompts: N strings -> [N] float32, 100 · max(cos, 0) each."""
        if len(images) != len(prompts):
            raise InputError(f"CLIP score needs one prompt per image; got {len(images)} images and "
                             f"{len(prompts)} prompts")
        if not len(images):
            raise InputError("CLIP score of no images: pass at least one image and prompt")
        return clip_score_of_embeds(self.image_embeds(images), self.text_embeds(prompts))


def clip_score_of_embeds(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """[N, P], [N, P] -> [N]: 100 · max(cos, 0) of each row pair."""
    a = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    b = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return np.asarray(jnp.maximum(100 * jnp.sum(a * b, axis=-1), 0.0), np.float32)


__all__ = ["CLIPPreprocess", "CLIPScorer", "clip_score_of_embeds", "preprocess"]
