"""PSNR / SSIM against torchmetrics on random image pairs, and `jaxsd eval --pairs` on saved PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jaxsd.metrics.image_quality import psnr, ssim
from tests.helpers import jaxsd_command, jaxsd_main


def _pairs(seed: int, n: int = 3, h: int = 24, w: int = 31):
    rng = np.random.default_rng(seed)
    a = rng.random((n, h, w, 3), dtype=np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape).astype(np.float32), 0, 1)  # related, as a reconstruction is
    return a, b


@pytest.mark.torch
def test_psnr_and_ssim_equal_torchmetrics():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.image")
    for seed, data_range in ((0, 1.0), (1, 1.0), (2, 255.0)):
        a, b = _pairs(seed)
        a, b = a * data_range, b * data_range
        ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
        want_ssim = tm.structural_similarity_index_measure(ta, tb, data_range=data_range, reduction="none").numpy()
        want_psnr = tm.peak_signal_noise_ratio(ta, tb, data_range=data_range, reduction="none", dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(np.asarray(ssim(a, b, data_range)), want_ssim, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(psnr(a, b, data_range)), want_psnr, rtol=1e-5)
    same = _pairs(3)[0]
    np.testing.assert_allclose(np.asarray(ssim(same, same)), 1.0, rtol=1e-6)
    assert np.isinf(np.asarray(psnr(same, same))).all()


def test_eval_pairs_command(tmp_path, capsys):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    a, b = _pairs(4, n=2, h=20, w=20)
    to8 = lambda x: (x * 255).round().astype(np.uint8)
    for i in range(2):
        Image.fromarray(to8(a[i])).save(a_dir / f"{i}.png")
        Image.fromarray(to8(b[i])).save(b_dir / f"{i}.png")
    Image.fromarray(to8(a[0])).save(a_dir / "only_in_a.png")
    Image.fromarray(to8(a[1])).convert("RGBA").save(b_dir / "same.png")  # alpha: composited, then equal
    Image.fromarray(to8(a[1])).save(a_dir / "same.png")

    proc = jaxsd_command("eval", "--pairs", a_dir, b_dir, "--out", tmp_path / "eval")
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["pairs"] == 3 and result["unpaired"] == ["only_in_a.png"] and result["identical_pairs"] == 1
    assert "in only one folder" in proc.stdout
    a8, b8 = (np.stack([to8(x[i]) for i in range(2)]).astype(np.float32) / 255 for x in (a, b))
    want_psnr, want_ssim = np.asarray(psnr(a8, b8)), np.asarray(ssim(a8, b8))
    for i in range(2):
        got = result["per_image"][f"{i}.png"]
        np.testing.assert_allclose([got["psnr"], got["ssim"]], [want_psnr[i], want_ssim[i]], rtol=1e-5)
    np.testing.assert_allclose(result["psnr"], want_psnr.mean(), rtol=1e-5)  # the identical pair is left out
    np.testing.assert_allclose(result["ssim"], (want_ssim.sum() + 1.0) / 3, rtol=1e-5)

    Image.fromarray(to8(a[0])[:10]).save(b_dir / "0.png")
    rc, _, err = jaxsd_main(capsys, "eval", "--pairs", a_dir, b_dir, "--out", tmp_path / "eval2")  # in-process
    assert rc == 2 and "pairs must have the same size" in err
