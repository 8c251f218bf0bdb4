"""`jaxsd eval --model`: a tiny pipeline folder generates numbered images (data parallel over 2 fake devices),
a tiny random CLIPModel folder scores them, a second run resumes (generates only what is missing, pixel-equal),
and (slow) FID against a folder of real PNGs equals pytorch-fid's on the same images and weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import jaxsd_command, jaxsd_main
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

pytestmark = pytest.mark.torch

PROMPTS = ["a red square", "a blue circle on grey"]
N = 3  # image 2 is prompt 0's second image; on 2 devices the last batch is padded


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.metrics.tiny_clip import build_clip_folder

    tmp = tmp_path_factory.mktemp("eval_model")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return {"pipe": tiny_pipeline(tmp / "pipe"), "clip": build_clip_folder(tmp / "clip"),
            "prompts": tmp / "prompts.txt", "tmp": tmp}


def _eval_args(inputs, out, *extra) -> list:
    return ["eval", "--model", inputs["pipe"], "--prompts", inputs["prompts"], "--num-images", N, "--steps", 2,
            "--scheduler", "ddim", "--batch-size", 1, "--out", out, *extra]


def _eval(inputs, out, *extra, **kwargs):
    return jaxsd_command(*_eval_args(inputs, out, *extra), **kwargs)


def _image(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_eval_model_generates_scores_and_resumes(inputs, capsys):
    from jaxsd.metrics.clip_score import CLIPScorer

    out = inputs["tmp"] / "eval"
    proc = _eval(inputs, out, "--clip", inputs["clip"], devices=2)
    images = out / "images"
    assert sorted(p.name for p in images.glob("*.png")) == [f"{i:05d}.png" for i in range(N)]
    assert "on 2 device(s)" in proc.stderr
    result = json.loads((out / "metrics.json").read_text())
    assert (result["num_images"], result["generated"], result["reused"], result["devices"]) == (N, N, 0, 2)
    assert (result["steps"], result["scheduler"], result["guidance"], result["seed"]) == (2, "ddim", 7.5, 0)
    assert (result["height"], result["width"], result["num_prompts"]) == (IMAGE_SIZE, IMAGE_SIZE, 2)
    assert result["fid"] is None and "--fid-weights" in result["skipped"]["fid"] and "fid skipped" in proc.stdout
    assert set(result["versions"]) >= {"jax"} and (out / "grid.png").is_file()
    # the CLIP score of the written images with their prompts (image i: prompt i mod 2)
    scores = CLIPScorer.from_folder(inputs["clip"]).clip_score([_image(images / f"{i:05d}.png") for i in range(N)],
                                                               [PROMPTS[i % 2] for i in range(N)])
    np.testing.assert_allclose(result["clip_score"], scores.mean(), rtol=1e-4)
    assert result["clip_score"] > 0

    # resume on 1 device: only the missing image is generated, and it is the image the 2-device run made
    first = {i: _image(images / f"{i:05d}.png") for i in range(N)}
    kept_mtime = (images / "00000.png").stat().st_mtime_ns
    (images / "00001.png").unlink()
    proc = _eval(inputs, out, "--clip", inputs["clip"])
    result = json.loads((out / "metrics.json").read_text())
    assert (result["generated"], result["reused"], result["devices"]) == (1, 2, 1)
    assert "2 of 3 images already in" in proc.stderr
    assert (images / "00000.png").stat().st_mtime_ns == kept_mtime
    np.testing.assert_array_equal(_image(images / "00001.png"), first[1])
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[0], first[2])  # per-index noise

    # other settings for the same folder: refused, not mixed in
    # in this process: the refusals need no start-up of their own
    rc, _, err = jaxsd_main(capsys, *_eval_args(inputs, out, "--clip", inputs["clip"], "--seed", 1))
    assert rc == 2 and "other settings" in err and "'seed': (0, 1)" in err
    rc, _, err = jaxsd_main(capsys, *_eval_args(inputs, inputs["tmp"] / "none"))
    assert rc == 2 and "nothing to compute" in err and "--clip DIR" in err


@pytest.mark.slow
def test_eval_model_fid_equals_pytorch_fid(inputs, monkeypatch):
    """FID vs a folder of real PNGs, through the command, equals pytorch-fid's calculate_frechet_distance on
    pytorch-fid's own features of the same images (random InceptionV3 weights in its .pth layout).
    scipy's sqrtm of a 2048² matrix, twice: ~2-3 min on 2 busy cores."""
    import torch

    from jaxsd.metrics.fid import activation_statistics, load_stats
    from jaxsd.metrics.fid_weights import FID_WEIGHTS_FILE
    from tests.metrics import fid_reference as ref

    tmp = inputs["tmp"]
    state = ref.random_fid_state(seed=0)
    torch.save(state, tmp / FID_WEIGHTS_FILE)
    real = tmp / "real"
    real.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(real / f"{i}.png")
    out = tmp / "eval_fid"
    _eval(inputs, out, "--fid-weights", tmp / FID_WEIGHTS_FILE, "--allow-pickle", "--reference", real)
    result = json.loads((out / "metrics.json").read_text())
    assert (result["fid_images"], result["reference_images"]) == (N, 4) and "clip_score" in result["skipped"]

    model = ref.reference_inception(state, monkeypatch)
    features = lambda files: np.concatenate([  # pytorch-fid: ToTensor images, its own resize
        ref.reference_features(model, np.asarray(Image.open(f).convert("RGB"), np.float32)[None] / 255)
        for f in files])
    gen = features(sorted((out / "images").glob("*.png")))
    want = ref.reference_fid_module().calculate_frechet_distance(
        *activation_statistics(gen), *activation_statistics(features(sorted(real.glob("*.png")))))
    np.testing.assert_allclose(result["fid"], want, atol=1e-3, rtol=0)
    mu, sigma = load_stats(out / "generated_stats.npz")
    np.testing.assert_allclose(mu, activation_statistics(gen)[0], atol=1e-4, rtol=0)
    assert sigma.shape == (2048, 2048)
