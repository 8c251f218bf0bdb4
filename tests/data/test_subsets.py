"""data.subsets with the fake encoders: fixed captions and prefixes reach the cache, repeats fill an epoch,
loss weights and the prior half ride in the batch, and the position resumes exactly across epochs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxsd.data.cache import build_cache
from jaxsd.data.config import (
    BucketConfig,
    DreamBoothConfig,
    ImageConfig,
    SubsetConfig,
    load_data_config,
)
from jaxsd.data.loader import Loader
from jaxsd.data.subsets import with_class_subset
from jaxsd.errors import ConfigError
from tests.data.fakes import (
    fake_text,
    fake_vae,
    make_images,
    save_fake_text,
    save_fake_vae,
    small_config,
    tokenize,
)


@pytest.fixture(scope="module")
def subsets(tmp_path_factory):
    """Folder a (4 images, captions from files, prefix "sks, ", repeats 3, weight 2) and folder b (2 images,
    fixed caption, weight 0.5), one 64x64 bucket; cached with the fake encoders."""
    base = tmp_path_factory.mktemp("subsets")
    a, b = make_images(base / "a", 12), make_images(base / "b", 6)
    for folder in (a, b):  # keep the square images only: one bucket
        for p in folder.glob("*.png"):
            if int(p.stem) % 3:
                p.unlink()
                p.with_suffix(".txt").unlink()
    cfg = dataclasses.replace(
        small_config(), image=ImageConfig(resolution=64, random_flip=True, buckets=BucketConfig(False)),
        subsets=[SubsetConfig(roots=(str(a),), repeats=3, caption_prefix="sks, ", loss_weight=2.0),
                 SubsetConfig(roots=(str(b),), caption="a photo of a dog", loss_weight=0.5)])
    vae = fake_vae(save_fake_vae(base / "vae", 0), cfg)
    te = fake_text(save_fake_text(base / "te", 0), cfg)
    build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    return base, cfg, vae, te


def test_fixed_captions_and_prefixes_reach_the_text_cache(subsets):
    _, cfg, vae, te = subsets
    loader = Loader(cfg, latents=vae.spec, text=te.spec)
    store = loader.store
    for i, (loc, key, _, _) in enumerate(store.entries):
        caption = f"sks, caption {int(key)}" if loc == 0 else "a photo of a dog"
        want = te.apply(te.params, tokenize([caption]))["encoder_hidden_states"][0]
        np.testing.assert_allclose(store.read(i)["encoder_hidden_states"], want, rtol=1e-6)


def test_repeats_fill_each_epoch_and_weights_ride_in_the_batch(subsets):
    _, cfg, vae, te = subsets
    loader = Loader(cfg, latents=vae.spec, text=te.spec)
    store = loader.store
    assert len(store) == 6 and loader.steps_per_epoch == (4 * 3 + 2) // 4  # 14 slots, batch 4
    counts = np.zeros(len(store), int)
    for _ in range(loader.steps_per_epoch):
        b = next(loader)
        np.add.at(counts, b["index"], 1)
        locs = store.locations()[b["index"]]
        np.testing.assert_array_equal(b["loss_weight"], np.where(locs == 0, 2.0, 0.5).astype(np.float32))
        assert "prior" not in b
    # 12 of the 14 slots fit in 3 batches: folder a's images 3 times each, minus what the remainder dropped
    assert counts.sum() == 12 and counts[store.locations() == 0].max() == 3


def test_position_resumes_exactly_across_an_epoch_boundary(subsets):
    _, cfg, vae, te = subsets
    loader = Loader(cfg, latents=vae.spec, text=te.spec)
    for _ in range(2):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(4)]  # 3 steps per epoch: into epoch 2
    fresh = Loader(cfg, latents=vae.spec, text=te.spec)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    fewer = dataclasses.replace(cfg, subsets=[dataclasses.replace(cfg.subsets[0], repeats=2), cfg.subsets[1]])
    with pytest.raises(ValueError, match="samples saved 14 now 10"):
        Loader(fewer, latents=vae.spec, text=te.spec).set_state(state)


def test_a_prior_subset_fills_half_of_every_batch(subsets):
    _, cfg, vae, te = subsets
    prior = dataclasses.replace(cfg, subsets=[cfg.subsets[0], dataclasses.replace(cfg.subsets[1], kind="prior")])
    loader = Loader(prior, latents=vae.spec, text=te.spec)
    locs = loader.store.locations()
    assert loader.steps_per_epoch == 6  # 12 instance slots in halves of 2
    for _ in range(8):  # the class pool (2 slots, 1 batch) cycles on its own epochs
        b = next(loader)
        np.testing.assert_array_equal(locs[b["index"]], [0, 0, 1, 1])
        np.testing.assert_array_equal(b["prior"], [0, 0, 1, 1])
    with pytest.raises(ConfigError, match="must be even"):
        Loader(prior, latents=vae.spec, text=te.spec, batch_size=3)


def test_subset_config_errors_and_the_class_alias(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("data:\n  subsets:\n    - {roots: [x], class: prior, repeats: 2}\n"
                    "dreambooth: {class_prompt: a dog, class_dir: classes}\n")
    cfg = load_data_config(str(yaml))
    assert [(s.roots, s.kind, s.caption) for s in cfg.subsets] == [(("x",), "prior", None),
                                                                    (("classes",), "prior", "a dog")]
    bad = {"data.subsets=[{roots: [x], repeats: 0}]": "repeats=0 must be >= 1",
           "data.subsets=[{roots: [x], kind: other}]": "is not one of instance, prior",
           "data.subsets=[{roots: [x]}, {roots: [x]}]": "already in data.subsets",
           "data.subsets=[{roots: [x], rots: [y]}]": "rots"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_data_config(None, [override])
    with pytest.raises(ConfigError, match="either data.roots"):
        load_data_config(None, ["data.roots=[y]", "data.subsets=[{roots: [x]}]"])
    with pytest.raises(ConfigError, match="class_dir is not"):
        with_class_subset(small_config("x"), DreamBoothConfig(class_prompt="a dog"))
