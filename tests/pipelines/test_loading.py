"""Family detection from model_index.json and component configs (no weights needed)."""

from __future__ import annotations

import json

import pytest

from jaxsd.pipelines.loading import PipelineFolderError, detect_family, load_pipeline, load_scheduler_config


def _folder(tmp_path, cls, components: dict[str, dict]):
    index = {"_class_name": cls, "_diffusers_version": "0.42.1", "safety_checker": [None, None]}
    for name, config in components.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        index[name] = ["diffusers", "Whatever"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path


@pytest.mark.parametrize("cls,components,family", [
    ("StableDiffusionPipeline", {"text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 768},
                                 "unet": {"cross_attention_dim": 768}}, "sd1"),
    ("StableDiffusionPipeline", {"text_encoder": {"hidden_act": "gelu", "hidden_size": 1024},
                                 "unet": {"cross_attention_dim": 1024}}, "sd2"),
    ("StableDiffusionXLPipeline", {"text_encoder": {}, "text_encoder_2": {}, "unet": {}}, "sdxl"),
    ("StableDiffusionPipeline", {"text_encoder": {"model_type": "t5", "d_model": 4096},
                                 "text_projection": {"_class_name": "TextProjection"}, "unet": {}}, "hybrid"),
    ("StableDiffusionPipeline", {"text_encoder": {"model_type": "t5", "d_model": 768}, "unet": {}}, "hybrid"),
])
def test_detect_family(tmp_path, cls, components, family):
    assert detect_family(_folder(tmp_path, cls, components)) == family


def test_missing_text_encoder_and_scheduler_are_named(tmp_path):
    folder = _folder(tmp_path, "StableDiffusionPipeline", {"unet": {}})
    with pytest.raises(PipelineFolderError, match="component 'text_encoder' is missing"):
        detect_family(folder)
    with pytest.raises(PipelineFolderError, match="component 'scheduler' is missing"):
        load_scheduler_config(folder)


def test_not_a_directory(tmp_path):
    with pytest.raises(PipelineFolderError, match="no such directory"):
        detect_family(tmp_path / "nope")


def test_listed_but_missing_text_projection(tmp_path):
    folder = _folder(tmp_path, "StableDiffusionPipeline", {"text_encoder": {"model_type": "t5"}, "unet": {},
                                                           "vae": {}, "scheduler": {}, "tokenizer": {}})
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_projection": ["jaxsd", "TextProjection"]}))
    with pytest.raises(PipelineFolderError, match="component 'text_projection' is missing"):
        load_pipeline(folder)


def test_sdxl_refiner_is_refused(tmp_path):
    folder = _folder(tmp_path, "StableDiffusionXLImg2ImgPipeline", {
        n: {} for n in ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    with pytest.raises(PipelineFolderError, match="SDXL refiner"):
        load_pipeline(folder)
