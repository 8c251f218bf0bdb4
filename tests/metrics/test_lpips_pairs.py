"""`jaxsd eval --pairs --lpips-weights`: LPIPS per pair and its mean equal the `lpips` package's on the same
uint8 images (a random VGG16 saved in torchvision's layout, the package's shipped v0.1 heads)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import jaxsd_command, jaxsd_main
from tests.reference_packages import reference_packages

pytestmark = pytest.mark.torch

SIZES = [(32, 32), (32, 32), (24, 40)]  # two sizes: one compile each


def _save_pairs(tmp_path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    a_imgs, b_imgs = [], []
    for i, (h, w) in enumerate(SIZES):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(a_dir / f"{i}.png"), Image.fromarray(b).save(b_dir / f"{i}.png")
        a_imgs.append(a), b_imgs.append(b)
    return a_imgs, b_imgs


def _package_lpips(torch_vgg16, a_imgs, b_imgs) -> tuple[list[float], str]:
    """lpips.LPIPS(net="vgg") with the random backbone: each pair's distance, and the heads file it ships."""
    import torch

    with reference_packages():
        lpips = importlib.import_module("lpips")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
        heads = str(importlib.import_module("jaxsd.losses.weights").installed_heads())
    for k in range(1, 6):
        for name, module in getattr(ref.net, f"slice{k}").named_children():
            module.load_state_dict(torch_vgg16.features[int(name)].state_dict())
    to_t = lambda x: torch.from_numpy(x.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        return [float(ref(to_t(a), to_t(b)).reshape(())) for a, b in zip(a_imgs, b_imgs)], heads


def test_eval_pairs_lpips_equals_the_lpips_package(tmp_path, torch_vgg16, vgg16_pth, capsys):
    a_imgs, b_imgs = _save_pairs(tmp_path)
    want, heads = _package_lpips(torch_vgg16, a_imgs, b_imgs)
    pairs = ("eval", "--pairs", tmp_path / "a", tmp_path / "b")

    proc = jaxsd_command(*pairs, "--out", tmp_path / "eval", "--lpips-weights", vgg16_pth, "--lpips-heads", heads,
                         "--allow-pickle")
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    got = [result["per_image"][f"{i}.png"]["lpips"] for i in range(len(SIZES))]
    assert min(want) > 0.01  # the pairs differ: the distances are not trivially zero
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result["lpips"], np.mean(want), rtol=1e-4)
    assert result["skipped"] == {} and "LPIPS" in proc.stdout

    # without weights: left out, and the output says how to add it
    proc = jaxsd_command(*pairs, "--out", tmp_path / "plain")
    result = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert result["lpips"] is None and "--lpips-weights" in result["skipped"]["lpips"]
    assert "lpips" not in result["per_image"]["0.png"] and "LPIPS left out: LPIPS needs" in proc.stdout

    # a .pth without --allow-pickle: refused, naming this command's flag
    rc, _, err = jaxsd_main(capsys, *pairs, "--out", tmp_path / "x", "--lpips-weights", vgg16_pth)  # in-process
    assert rc == 2 and "--lpips-weights" in err and "--allow-pickle" in err
    rc, _, err = jaxsd_main(capsys, *pairs, "--out", tmp_path / "x", "--fid-weights", vgg16_pth)
    assert rc == 2 and "--fid-weights belongs to --stats / --model, not --pairs" in err
