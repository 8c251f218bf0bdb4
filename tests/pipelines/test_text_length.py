"""One text length for the T5 hybrid: `jaxsd cache` → sample grids → the pipeline folder → `jaxsd sample`.

The tiny hybrid (tests/train/tiny_pipeline.py) records 16 tokens in its tokenizer; the cache pads to its
default 256. Its UNet is drawn so the padding length moves the images by several levels: a wrong length
fails the image checks by far (each test asserts that too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.config import load_config
from jaxsd.data.manifest import CacheMismatch, read_manifest
from jaxsd.data.records import read_sidecar
from jaxsd.errors import InputError
from jaxsd.pipelines.loading import PipelineFolderError, load_pipeline
from jaxsd.pipelines.pipeline import StableDiffusion
from jaxsd.pipelines.text_length import read_text_max_length, set_text_max_length
from jaxsd.text.prompts import PromptEncoder
from tests.data.fakes import make_images
from tests.helpers import jaxsd_command, rel_err
from tests.pipelines.conftest import assert_images_close, assert_images_differ
from tests.train.tiny_pipeline import (
    HYBRID_COMPONENTS,
    IMAGE_SIZE,
    UNET,
    tiny_hybrid_pipeline,
    tiny_pipeline,
)

CACHE_LENGTH = 256  # data.cache.max_length's T5 default
PROMPTS = ["caption 0", "caption 1"]  # = the first two images' captions, so the cache holds their embeddings
PROMPTS_OVERRIDE = "logging.sample_prompts=[caption 0, caption 1]"
GENERATE = {"steps": 2, "guidance": 3.0, "sampler": "dpmpp_2m", "seed": 0}  # test_sampling's grid settings


def _yaml(base, pipe, images) -> str:
    """The shared tiny run's config (tests/train/tiny_run.py: 4 steps, sample grids every 2) on a T5 text cache."""
    from tests.train.tiny_run import _yaml as run_yaml
    assert (pipe, images) == (base / "pipe", base / "images")  # where that config reads them
    yaml = run_yaml(base, None)
    assert "text: clip," in yaml
    return yaml.replace("text: clip,", "text: t5_projected,")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """The tiny hybrid (tokenizer: 16 tokens) cached by `jaxsd cache` at the default length."""
    base = tmp_path_factory.mktemp("textlen")
    pipe = tiny_hybrid_pipeline(base / "pipe", tokenizer_length=16)
    images = make_images(base / "images", 4)
    yaml = base / "run.yaml"
    yaml.write_text(_yaml(base, pipe, images))
    jaxsd_command("cache", yaml, "--no-progress")
    return base, pipe, images, yaml


def test_sample_grids_encode_prompts_as_the_cache_did(cached, tmp_path):
    from jaxsd.data.loader import training_loader
    from jaxsd.train.sampling import TrainingSampler

    _, pipe, images, yaml = cached
    text = read_manifest(images)["text"]
    assert text["max_length"] == CACHE_LENGTH and read_text_max_length(pipe) == 16
    cfg = load_config(yaml, [PROMPTS_OVERRIDE])
    assert list(cfg.logging.sample_prompts) == PROMPTS
    sampler = TrainingSampler.from_config(cfg, UNET, tmp_path, jax.make_mesh((1,), ("data",)))
    cond = sampler.embeddings[0].encoder_hidden_states
    assert cond.shape == (2, CACHE_LENGTH, UNET.cross_attention_dim)
    for i in range(2):  # the grid's prompts are conditioned exactly as training saw those captions
        cached_states = read_sidecar(images / f"{i:03d}.{text['suffix']}")["encoder_hidden_states"]
        assert rel_err(cond[i], cached_states) <= 1e-5
    # the folder's own length would have given other conditioning
    assert PromptEncoder.from_pipeline(pipe).encode(PROMPTS).encoder_hidden_states.shape[1] == 16
    # a run configured with another length is refused by the loader, naming the field
    other = dataclasses.replace(cfg.data, cache=dataclasses.replace(cfg.data.cache, max_length=64))
    with pytest.raises(CacheMismatch, match=f"max_length: cache has {CACHE_LENGTH}, this run expects 64"):
        training_loader(other)


def test_cli_sample_pads_prompts_to_the_length_the_folder_records(cached, tmp_path):
    _, pipe, _, _ = cached
    folder = tmp_path / "pipe512"
    shutil.copytree(pipe, folder)
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.unlink()
    os.link(pipe / "tokenizer" / "tokenizer_config.json", config)  # as `jaxsd export` links a base's files
    set_text_max_length(folder, 512)
    assert read_text_max_length(pipe) == 16  # the base's file was replaced in `folder`, not written through
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    out = tmp_path / "out.png"
    proc = jaxsd_command("sample", "--model", folder, "--prompt", PROMPTS[0], "--negative-prompt", "a dog",
                         "--steps", GENERATE["steps"], "--guidance", GENERATE["guidance"], "--scheduler",
                         GENERATE["sampler"], "--latents", tmp_path / "latents.npy", "--out", out)
    assert "(hybrid, float32, prompts padded to 512 tokens)" in proc.stderr
    ours = np.asarray(Image.open(out))[None]
    kw = {**GENERATE, "negative_prompt": "a dog", "latents": latents}
    at = {n: StableDiffusion.from_folder(pipe, text_max_length=n).generate(PROMPTS[0], **kw) for n in (512, 256)}
    assert_images_close(ours, at[512])
    assert_images_differ(ours, at[256])  # the length matters: a folder recording another one is caught


@pytest.mark.torch
def test_the_recorded_length_is_what_transformers_pads_to(cached, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, pipe, _, _ = cached
    folder = tmp_path / "pipe"
    shutil.copytree(pipe, folder)
    before = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    set_text_max_length(folder, 40)
    after = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    assert after == {**before, "model_max_length": 40}
    assert read_text_max_length(folder) == 40
    tok = transformers.T5Tokenizer.from_pretrained(folder / "tokenizer")
    ref = tok(PROMPTS, padding="max_length", truncation=True).input_ids
    ours = PromptEncoder.from_pipeline(folder).components[0].tokenizer(PROMPTS)
    assert tok.model_max_length == 40 and np.array_equal(ours.input_ids, np.asarray(ref))


def test_lengths_that_cannot_be_recorded_are_refused(cached, tmp_path, caplog):
    _, pipe, _, _ = cached
    for bad in (0, -3, "256", True):
        with pytest.raises(InputError, match="positive int"):
            set_text_max_length(pipe, bad)
    clip = tiny_pipeline(tmp_path / "clip")
    config = (clip / "tokenizer" / "tokenizer_config.json").read_text()
    set_text_max_length(clip, 77)  # CLIP's fixed length: accepted, nothing written
    assert (clip / "tokenizer" / "tokenizer_config.json").read_text() == config
    with pytest.raises(InputError, match="pads prompts to a fixed 77 tokens.*cannot record 256"):
        set_text_max_length(clip, 256)
    with pytest.raises(PipelineFolderError, match="fixed 77 tokens; they cannot be encoded at 256"):
        load_pipeline(clip, text_max_length=256)
    with pytest.raises(PipelineFolderError, match="no model_index.json"):
        set_text_max_length(tmp_path, 256)
    # a T5 tokenizer recording no length: 512, said once
    folder = tmp_path / "unrecorded"
    for name in HYBRID_COMPONENTS:
        (shutil.copytree if (pipe / name).is_dir() else shutil.copy)(pipe / name, folder / name)
    path = folder / "tokenizer" / "tokenizer_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "model_max_length"}))
    assert read_text_max_length(folder) == 512
    assert "records no model_max_length; prompts are padded to 512 tokens" in caplog.text


@pytest.mark.slow  # a train run and an export; the default run covers cache and sample lengths through the CLI
def test_train_grid_equals_the_exported_folder_sampled_at_the_recorded_length(cached, tmp_path):
    """`jaxsd train`'s sample grid (EMA params, cache length) is what `jaxsd export` writes: the trained
    UNet beside the hybrid's components, its tokenizer recording the cache's length."""
    from jaxsd.pipelines.grids import label_grid
    from jaxsd.train.sampling import GRID_CELL_PIXELS

    _, pipe, _, yaml = cached
    run_dir = tmp_path / "run"
    jaxsd_command("train", yaml, f"train.run_dir={run_dir}", PROMPTS_OVERRIDE)
    folder = tmp_path / "exported"
    jaxsd_command("export", run_dir, "--out", folder, "--ema")  # the base: the run's model.pretrained
    assert read_text_max_length(folder) == CACHE_LENGTH != read_text_max_length(pipe)
    images = StableDiffusion.from_folder(folder).generate(PROMPTS, **GENERATE)
    grid = np.asarray(label_grid([(p, [im]) for p, im in zip(PROMPTS, images)], scale=GRID_CELL_PIXELS // IMAGE_SIZE))
    np.testing.assert_array_equal(np.asarray(Image.open(run_dir / "samples" / "step_000004.png")), grid)
