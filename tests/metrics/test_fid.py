"""FID InceptionV3 and Fréchet distance against pytorch-fid on random weights, and `jaxsd eval --stats`."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.metrics.fid import activation_statistics, frechet_distance, load_stats
from jaxsd.metrics.fid_weights import FID_WEIGHTS_FILE, load_fid_weights
from jaxsd.metrics.inception import FIDInceptionV3
from tests.helpers import jaxsd_command, jaxsd_main

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def reference():
    """(state dict, pytorch-fid InceptionV3 over it, fid_score module), built once for the module."""
    pytest.importorskip("torch")
    from tests.metrics import fid_reference as ref

    state = ref.random_fid_state(seed=0)
    with pytest.MonkeyPatch.context() as mp:
        model = ref.reference_inception(state, mp)
    return state, model, ref.reference_fid_module()


@pytest.fixture(scope="module")
def weights_pth(reference, tmp_path_factory):
    """The random state saved as pytorch-fid publishes its weights: a pickled state dict `.pth`."""
    import torch

    path = tmp_path_factory.mktemp("fid_weights") / FID_WEIGHTS_FILE
    torch.save(reference[0], path)
    return path


@pytest.fixture(scope="module")
def features_fn(weights_pth):
    params = load_fid_weights(weights_pth, allow_pickle=True)
    return params, jax.jit(lambda p, x: FIDInceptionV3().apply({"params": p}, x))


def test_pool_features_equal_pytorch_fid(reference, features_fn):
    from tests.metrics.fid_reference import reference_features

    params, features = features_fn
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (80, 96)):
        images = rng.random((2, h, w, 3), dtype=np.float32)
        want = reference_features(reference[1], images)
        got = np.asarray(features(params, images))
        assert got.shape == (2, 2048)
        assert want.std() > 0.05  # activations in a sane range, so the tolerance means something
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_frechet_distance_equals_pytorch_fid(reference):
    fid_score = reference[2]
    rng = np.random.default_rng(1)
    d = 64
    for n in (200, 20):  # well-conditioned; fewer samples than dimensions (singular product)
        a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(n, d))
        (m1, s1), (m2, s2) = activation_statistics(a), activation_statistics(b)
        want = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
        np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2), want, atol=1e-3, rtol=0)
        np.testing.assert_allclose(m1, np.mean(a, axis=0)), np.testing.assert_allclose(s1, np.cov(a, rowvar=False))


def _save_pngs(folder, seed: int, sizes) -> np.ndarray:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _reference_stats(reference, folder):
    """pytorch-fid's calculate_activation_statistics logic: ToTensor images, one at a time (sizes differ)."""
    from tests.metrics.fid_reference import reference_features

    files = sorted(folder.glob("*.png"))
    act = np.concatenate([reference_features(reference[1], np.asarray(Image.open(f).convert("RGB"),
                                                                      np.float32)[None] / 255) for f in files])
    return np.mean(act, axis=0), np.cov(act, rowvar=False), act


@pytest.fixture(scope="module")
def stats_run(reference, weights_pth, tmp_path_factory):
    """`jaxsd eval --stats` on 4 PNGs of two sizes (one batch mixes them), and pytorch-fid's statistics."""
    tmp = tmp_path_factory.mktemp("stats")
    real = _save_pngs(tmp / "real", 2, [(40, 40), (40, 40), (40, 40), (48, 32)])
    out = tmp / "real_stats.npz"
    jaxsd_command("eval", "--stats", real, "--out", out, "--fid-weights", weights_pth, "--allow-pickle",
                  "--batch-size", "2", "--save-fid-weights", tmp / "fid.safetensors")
    other = _save_pngs(tmp / "other", 3, [(40, 40)] * 2)
    paths = {"real_npz": out, "other": other}
    return load_stats(out), _reference_stats(reference, real), _reference_stats(reference, other), \
        tmp / "fid.safetensors", paths


def test_eval_stats_command(reference, weights_pth, stats_run):
    (mu, sigma), (want_mu, want_sigma, act), (_, _, o_act), safetensors, _ = stats_run
    np.testing.assert_allclose(mu, want_mu, atol=1e-4, rtol=0)
    np.testing.assert_allclose(sigma, want_sigma, atol=1e-4, rtol=0)
    assert mu.dtype == np.float64 and sigma.shape == (2048, 2048)

    # the safetensors copy loads without torch into the same params
    jax.tree.map(np.testing.assert_array_equal, load_fid_weights(weights_pth, allow_pickle=True),
                 load_fid_weights(safetensors))

    # FID between the two image sets on their first 256 features, jaxsd's statistics vs pytorch-fid's
    # (scipy's sqrtm of a 2048² matrix takes ~50 s on 2 cores: test_fid_files_interchange_with_pytorch_fid)
    k = 256
    want = reference[2].calculate_frechet_distance(*activation_statistics(act[:, :k]),
                                                   *activation_statistics(o_act[:, :k]))
    got = frechet_distance(mu[:k], sigma[:k, :k], *activation_statistics(o_act[:, :k]))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_fid_files_interchange_with_pytorch_fid(reference, stats_run, monkeypatch):
    """pytorch-fid writes the other set's npz from its own image pipeline and computes the 2048-d FID
    between jaxsd's npz and its own; jaxsd reads both files and agrees (on singular covariances: 4 and 2 images).
    scipy's 2048² sqrtm twice: ~35-100 s."""
    from tests.metrics.fid_reference import pytorch_fid_on_files

    (mu, sigma), _, (o_mu, o_sigma, _), _, paths = stats_run
    other_npz = paths["other"].parent / "other_pytorch_fid.npz"
    want = pytorch_fid_on_files(reference[0], monkeypatch, paths["other"], other_npz, paths["real_npz"], other_npz)
    p_mu, p_sigma = load_stats(other_npz)
    np.testing.assert_allclose(p_mu, o_mu, atol=1e-4, rtol=0)
    np.testing.assert_allclose(p_sigma, o_sigma, atol=1e-4, rtol=0)
    np.testing.assert_allclose(frechet_distance(mu, sigma, p_mu, p_sigma), want, atol=1e-3, rtol=0)


def test_eval_stats_needs_fid_weights(tmp_path, capsys):
    # in-process: the refusals need no start-up of their own (stats_run runs the command)
    real = _save_pngs(tmp_path / "real", 4, [(16, 16)] * 2)
    rc, _, err = jaxsd_main(capsys, "eval", "--stats", real, "--out", tmp_path / "s.npz")
    assert rc == 2 and FID_WEIGHTS_FILE in err and "github.com/mseitzer" in err
    rc, _, err = jaxsd_main(capsys, "eval", "--stats", real, "--out", tmp_path / "s.npz", "--fid-weights", tmp_path / "nothing.pth")
    assert rc == 2 and f"{tmp_path / 'nothing.pth'}: no such file" in err
    assert FID_WEIGHTS_FILE in err
    rc, _, err = jaxsd_main(capsys, "eval", "--stats", real, "--out", tmp_path / "s.npz", "--pairs", real, real)
    assert rc == 2 and "not allowed with" in err


def test_eval_fid_pth_needs_allow_pickle(tmp_path, capsys):
    """A .pth --fid-weights is a pickle: refused without --allow-pickle in --stats and --model alike (before it is
    read, so the file's bytes do not matter), naming the flag and the safetensors way out."""
    real = _save_pngs(tmp_path / "real", 4, [(16, 16)] * 2)
    pth = tmp_path / FID_WEIGHTS_FILE
    pth.write_bytes(b"never unpickled")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    for mode in (("--stats", real, "--out", tmp_path / "s.npz"),
                 ("--model", tmp_path / "no_model", "--prompts", tmp_path / "prompts.txt", "--num-images", "2",
                  "--reference", real, "--out", tmp_path / "eval")):
        rc, _, err = jaxsd_main(capsys, "eval", *mode, "--fid-weights", pth)
        assert rc == 2 and "is a pickle" in err and "--allow-pickle" in err, err
        assert "--save-fid-weights X.safetensors" in err and "Traceback" not in err

