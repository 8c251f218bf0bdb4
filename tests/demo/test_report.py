"""The demo's report pieces: PSNR, the labelled grid, metrics.json."""

import json

import numpy as np
import pytest

from jaxsd.demo import report
from jaxsd.pipelines.grids import label_grid


def test_psnr_and_uint8():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    assert report.psnr(a, b) == float("inf")
    b[0, 0, 0, 0] = 255  # mse = 255^2 / 96
    assert report.psnr(a, b) == pytest.approx(10 * np.log10(96))
    with pytest.raises(ValueError, match="equal shapes"):
        report.psnr(a, b[:1])
    np.testing.assert_array_equal(report.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 2.0])), [0, 0, 128, 255, 255])


def test_label_grid_layout_and_marks():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    grid = label_grid([("a red circle", [red, red]), ("a blue square", [red])], scale=2,
                             marks=[[True, False], [True]])
    arr = np.asarray(grid)
    assert grid.width > 2 * 16 and grid.height == 2 * (16 + 4 + 4) + 4
    assert (arr == [200, 0, 0]).all(-1).sum() == 3 * 16 * 16  # three upscaled images, nothing lost
    assert (arr == [40, 170, 40]).all(-1).any() and (arr == [210, 40, 40]).all(-1).any()
    with pytest.raises(ValueError, match="at least one"):
        label_grid([])


def test_metrics_json_has_exactly_the_agreed_keys(tmp_path):
    out = report.write_metrics(tmp_path / "metrics.json", {"colour_accuracy": 1, "shape_accuracy": 0.5,
                                                          "vae_psnr": 30.0, "seconds_total": 12.5, "extra": 1},
                               extra={"seconds": {"vae": 3.0}})
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data == out and list(data) == list(report.METRIC_KEYS)
    assert all(isinstance(v, float) for v in data.values())
    assert json.loads((tmp_path / "metrics_detail.json").read_text()) == {"seconds": {"vae": 3.0}}
    with pytest.raises(ValueError, match="vae_psnr"):
        report.write_metrics(tmp_path / "m.json", {"colour_accuracy": 1, "shape_accuracy": 1, "seconds_total": 1})


def test_demo_out_folder_is_cleared_only_when_the_demo_wrote_it(tmp_path):
    from jaxsd.demo.run import MARKER, prepare_out
    from jaxsd.errors import InputError

    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("user file")
    with pytest.raises(InputError, match="not written by `jaxsd demo`"):
        prepare_out(mine)
    assert (mine / "data").is_dir()  # nothing touched
    demo = tmp_path / "demo"
    prepare_out(demo)
    (demo / "run" / "checkpoints").mkdir(parents=True)
    (demo / "metrics.json").write_text("{}")
    (demo / "keep.txt").write_text("x")
    prepare_out(demo)
    assert not (demo / "run").exists() and not (demo / "metrics.json").exists()
    assert (demo / MARKER).is_file() and (demo / "keep.txt").is_file()
