"""CLIP score: the vision tower and both projections vs transformers' `CLIPModel` on a tiny random
folder, and the score vs torchmetrics' `CLIPScore` with the same folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxsd.errors import InputError
from jaxsd.metrics.clip_score import CLIPPreprocess, CLIPScorer, clip_score_of_embeds, preprocess

MAX_TOKENS = 16
PROMPTS = ["a photo of an astronaut riding a horse on the moon",
           "an oil painting of a cat",
           # longer than MAX_TOKENS: cut as torchmetrics cuts it (no end-of-text token left)
           "a beautiful landscape with mountains at sunset, portrait of a dog in the forest, highly detailed",
           "cat dog castle"]
SIZES = [(32, 32), (40, 48), (50, 36), (64, 64)]  # (H, W): square, portrait, landscape, downscaled


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random transformers CLIPModel (image 32, patch 8) + CLIP tokenizer + CLIPImageProcessor config."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.metrics.tiny_clip import build_clip_folder

    return build_clip_folder(tmp_path_factory.mktemp("clip"), MAX_TOKENS)


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return CLIPScorer.from_folder(clip_folder)


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _reference(folder):
    import transformers
    return (transformers.CLIPModel.from_pretrained(folder).eval(),
            transformers.CLIPProcessor.from_pretrained(folder))


def _features(out):
    """transformers 5's get_*_features return an output object (the projected embeds in `pooler_output`);
    transformers 4 and torchmetrics expect the tensor itself."""
    return getattr(out, "pooler_output", out)


def _torchmetrics_reference(folder):
    """(model, processor) for torchmetrics' CLIPScore: a local folder is not among its model names (a
    callable is its way in), and its feature calls need tensors (see `_features`)."""
    import torch

    class TensorFeatures(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return _features(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _features(self.model.get_text_features(*args, **kwargs))

    model, processor = _reference(folder)
    return TensorFeatures(model), processor


@pytest.mark.torch
def test_embeddings_equal_transformers(clip_folder, scorer):
    import torch
    model, processor = _reference(clip_folder)
    images = _images()
    assert "torchvision" not in type(processor.image_processor).__module__
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ours_pixels = np.stack([np.moveaxis(preprocess(x, scorer.settings), -1, 0) for x in images])
    np.testing.assert_allclose(ours_pixels, pixels.numpy(), atol=1e-5)
    text = processor(text=PROMPTS[:2] + PROMPTS[3:], return_tensors="pt", padding=True)
    with torch.no_grad():
        want_image = model.get_image_features(pixel_values=pixels)
        want_text = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    np.testing.assert_allclose(scorer.image_embeds(images), _features(want_image).numpy(), atol=1e-4)
    np.testing.assert_allclose(scorer.text_embeds(PROMPTS[:2] + PROMPTS[3:]), _features(want_text).numpy(), atol=1e-4)


@pytest.mark.torch
def test_clip_score_equals_torchmetrics(clip_folder, scorer):
    import torch
    from torchmetrics.multimodal import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: _torchmetrics_reference(clip_folder))
    images, want = _images(1), []
    ours = scorer.clip_score(images, PROMPTS)
    for image, prompt in zip(images, PROMPTS, strict=True):  # one pair per update: each score clamped alone
        metric.reset()
        metric.update(torch.from_numpy(np.moveaxis(image, -1, 0).copy()), prompt)
        want.append(float(metric.compute()))
    assert np.ptp(ours) > 5, f"scores {ours} too alike to tell pairs apart"
    np.testing.assert_allclose(ours, np.asarray(want), atol=1e-3)
    # The clamp (random tiny models give positive cosines only): opposite embeddings score 0, equal ones 100.
    e = scorer.image_embeds(_images()[:2])
    np.testing.assert_allclose(clip_score_of_embeds(e, np.stack([-e[0], 2 * e[1]])), [0.0, 100.0], atol=1e-4)


def test_preprocessor_config_forms(tmp_path):
    """The old int form of size/crop_size (openai/clip-vit-* configs) reads as the dict form."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224, "crop_size": 224}))
    assert CLIPPreprocess.from_folder(tmp_path) == CLIPPreprocess()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    with pytest.raises(InputError, match="size .* is not supported"):
        CLIPPreprocess.from_folder(tmp_path)


def test_clip_score_rejects_bad_input(clip_folder, scorer, tmp_path):
    with pytest.raises(InputError, match="one prompt per image"):
        scorer.clip_score(_images()[:2], PROMPTS[:1])
    with pytest.raises(InputError, match="uint8 RGB"):
        scorer.clip_score([np.zeros((32, 32, 3), np.float32)], ["a cat"])
    with pytest.raises(InputError, match="preprocessor_config.json does not exist"):
        CLIPPreprocess.from_folder(tmp_path)
    with pytest.raises(InputError, match="not a transformers CLIPModel config"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
        CLIPScorer.from_folder(tmp_path)
