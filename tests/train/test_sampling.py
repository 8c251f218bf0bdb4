"""Sample grids during training, and training from a `jaxsd cache` output — on the shared tiny run.

The run of tests/train/tiny_run.py: a torch-free tiny pipeline folder is `model.pretrained`; `jaxsd cache`
encodes a small folder dataset with its VAE and text encoder; `jaxsd train` then runs 4 steps with
train.data_source=cache, EMA on and logging.sample_every=2. Both features share the run because the
train step's compilation dominates its time.
"""

import contextlib
import dataclasses
import io
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxsd.cli import main
from jaxsd.config import ConfigError, load_config, sample_components_folder
from jaxsd.data.manifest import read_manifest
from jaxsd.train.logging import read_images
from tests.train.tiny_pipeline import COMPONENTS, IMAGE_SIZE, UNET
from tests.train.tiny_run import SAMPLE_PROMPTS as PROMPTS

SCALE = 256 // IMAGE_SIZE  # sampling.py upscales small images towards 256-px cells


@pytest.fixture(scope="module")
def setup(tiny_run):
    """(the shared folder, the pipeline, the cached images, the run's config): read only."""
    return tiny_run.base, tiny_run.pipe, tiny_run.images, tiny_run.yaml


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run.run_dir, tiny_run.stdout


def test_training_from_a_cache_output(setup, run):
    _, pipe, images, _ = setup
    run_dir, stdout = run
    manifest = read_manifest(images)
    assert manifest["latents"] is not None and manifest["text"] is not None
    assert len(manifest["entries"]) == 6
    assert f"jaxsd train: done at step 4 (pretrained diffusers folder {pipe / 'unet'})" in stdout
    records = [r for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)


def test_sample_grids_every_n_steps_in_png_and_tensorboard(run):
    run_dir, stdout = run
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    tb = read_images(run_dir / "tensorboard")
    assert list(tb) == ["samples/ema"] and [s for s, _ in tb["samples/ema"]] == [2, 4]
    for step, logged in tb["samples/ema"]:
        grid = np.asarray(Image.open(run_dir / "samples" / f"step_{step:06d}.png"))
        # two rows of one 16x16 image upscaled 16x, 4-px padding; the label column takes the rest
        assert grid.shape[0] == 2 * (IMAGE_SIZE * SCALE + 4) + 4 and grid.shape[1] > IMAGE_SIZE * SCALE + 8
        np.testing.assert_array_equal(logged[..., :3], grid)
    # the generation program is compiled at the first sampling step and reused at the second
    line = next(s for s in stdout.splitlines() if s.startswith("step 4: sample grid of the EMA params"))
    assert "of which compile 0.0 s" in line, line


def test_grid_shows_the_ema_params_with_a_fixed_seed(setup, run, tmp_path):
    """The step-4 grid is what `jaxsd export --ema` + StableDiffusion give for the same settings."""
    from jaxsd.convert.unet import load_unet
    from jaxsd.pipelines.grids import label_grid
    from jaxsd.pipelines.pipeline import StableDiffusion
    from jaxsd.train.export import export_unet

    _, pipe, _, _ = setup
    run_dir, _ = run
    folder = tmp_path / "exported"
    for name in COMPONENTS:
        (shutil.copytree if (pipe / name).is_dir() else shutil.copy)(pipe / name, folder / name)
    export_unet(run_dir, folder / "unet", ema=True)
    export_unet(run_dir, tmp_path / "current", ema=False)
    sd = StableDiffusion.from_folder(folder)
    grids, generated = [], []
    for unet in (folder / "unet", tmp_path / "current"):
        sd.pipe.unet_params = load_unet(unet)[1]
        images = sd.generate(PROMPTS, steps=2, guidance=3.0, sampler="dpmpp_2m", seed=0)
        grids.append(np.asarray(label_grid([(p, [im]) for p, im in zip(PROMPTS, images)], scale=SCALE)))
        generated.append(images)
    written = np.asarray(Image.open(run_dir / "samples" / "step_000004.png"))
    np.testing.assert_array_equal(written, grids[0])
    assert not np.array_equal(written, grids[1])  # the current (non-EMA) params give other images
    clip = load_config(setup[3]).logging.sample_clip
    if clip is not None:  # logging.sample_clip: the grid's CLIP score, logged at each grid
        from jaxsd.metrics.clip_score import CLIPScorer

        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        scores = {r["step"]: r["samples/clip_score"] for r in logged if "samples/clip_score" in r}
        assert sorted(scores) == [2, 4]
        want = CLIPScorer.from_folder(clip).clip_score(list(generated[0]), PROMPTS).mean()
        np.testing.assert_allclose(scores[4], want, rtol=1e-5)


@pytest.mark.slow
def test_sampling_leaves_training_untouched(setup, run, tmp_path):
    """Same run without sample grids: every step's loss identical bit for bit (RNG stream and data order)."""
    _, _, _, yaml = setup
    run_dir, _ = run
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(yaml), "logging.sample_every=0", f"train.run_dir={tmp_path / 'plain'}"]) == 0
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (run_dir, tmp_path / "plain")]
    assert losses[0] == losses[1]
    assert not (tmp_path / "plain" / "samples").exists()


def test_sample_settings_are_checked_when_the_config_loads(setup):
    _, pipe, images, yaml = setup
    assert sample_components_folder(load_config(yaml)) == str(pipe)  # a pipeline model.pretrained serves
    cases = {
        "model.pretrained=null": "(model.pretrained is not set). Set logging.sample_components=PATH",
        f"model.pretrained={pipe / 'unet'}": "is not a pipeline folder (no model_index.json)",
        f"logging.sample_components={images}": "no model_index.json there",
        "logging.sample_prompts=[]": "logging.sample_prompts is empty",
        "logging.sample_sampler=dpm_2m": "did you mean 'dpmpp_2m'?",
        "logging.sample_steps=0": "logging.sample_steps = 0 must be >= 1",
        f"logging.sample_clip={images}": "no config.json there",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(yaml, [override])
        assert message in str(e.value), (override, str(e.value))
    assert load_config(yaml, ["model.pretrained=null", "logging.sample_every=0"]).logging.sample_every == 0


def test_components_that_do_not_fit_the_unet_fail_before_training(setup, tmp_path):
    from jaxsd.train.loop import train

    _, pipe, _, yaml = setup
    cfg = load_config(yaml, [f"train.run_dir={tmp_path / 'run'}"])
    wide = {**UNET.to_diffusers(), "cross_attention_dim": 64}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None, unet=wide),
                              logging=dataclasses.replace(cfg.logging, sample_components=str(pipe)))
    with pytest.raises(ValueError, match="give 32-wide embeddings but the trained UNet has cross_attention_dim=64"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_sampler_encodes_its_prompts_once_and_unloads_the_text_encoders(setup, tmp_path):
    import gc
    import weakref

    import jax

    from jaxsd.pipelines.pipeline import StableDiffusion
    from jaxsd.train.sampling import TrainingSampler, load_components

    _, pipe, _, yaml = setup
    cfg = load_config(yaml)
    components = load_components(pipe, UNET, cfg.diffusion)
    encoders = weakref.ref(components.text)
    expected = components.text.encode_with_negative(PROMPTS)
    sampler = TrainingSampler(cfg.logging, StableDiffusion(components), tmp_path, ema=True,
                              mesh=jax.make_mesh((1,), ("data",)))
    del components
    gc.collect()
    assert encoders() is None and sampler.pipe.text is None
    for got, want in zip(sampler.embeddings, expected):
        np.testing.assert_array_equal(got.encoder_hidden_states, want.encoder_hidden_states)
