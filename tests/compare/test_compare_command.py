"""`jaxsd compare` on two real tiny runs that differ only in their learning rate.

The runs are made by `jaxsd train` (in this process: compiling dominates) on synthetic latents with
the tiny pipeline's VAE and text encoder for sample grids every 2 steps; `jaxsd compare` then runs
as the command a user types. The PNGs are read back: each curve's recorded series and their exact
colours in its pixels, each side-by-side image's halves against the runs' own grids.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from jaxsd.cli import main
from jaxsd.compare.curves import SERIES_KEY, moving_average
from jaxsd.compare.runs import read_metrics, run_names
from jaxsd.compare.samples import HEADER, PAD
from tests.helpers import jaxsd_command, jaxsd_main
from tests.train.tiny_pipeline import tiny_pipeline

LRS = {"lr_a": 1e-3, "lr_b": 3e-3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    pipe = tiny_pipeline(base / "pipe")
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{steps: 4, batch_size: 2, data_source: synthetic}}
checkpoint: {{every: 4, keep: 1, async_save: false}}
logging: {{every: 1, progress_bar: false, sample_every: 2, sample_prompts: ["a cat"], sample_steps: 1}}
synthetic: {{num_examples: 8, latent_size: 8, latent_channels: 4, text_len: 8, text_dim: 32}}
""")
    with contextlib.redirect_stdout(io.StringIO()):
        for name, lr in LRS.items():
            assert main(["train", str(yaml), f"optimizer.learning_rate={lr}", f"train.run_dir={base / name}"]) == 0
    return base


def test_compare_two_runs(runs, tmp_path):
    out = tmp_path / "cmp"
    proc = jaxsd_command("compare", runs / "lr_a", runs / "lr_b", "--out", out, "--smooth", "2")
    assert "2 sample steps, 1 config keys differ" in proc.stdout

    # the config diff names exactly the key that differs (train.run_dir always does: shown as the path)
    diff = json.loads((out / "config_diff.json").read_text())
    assert diff == {"optimizer.learning_rate": {"lr_a": 1e-3, "lr_b": 3e-3}}

    summary = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in summary["runs"]] == list(LRS)
    assert {"loss", "loss_raw", "lr", "grad_norm", "images_per_s"} <= set(summary["curves"])
    html = (out / "index.html").read_text()
    for quantity, curve in summary["curves"].items():
        assert f'src="{curve["file"]}"' in html
        png = Image.open(out / curve["file"])
        series = json.loads(png.text[SERIES_KEY])
        assert [s["run"] for s in series] == list(LRS), quantity
        assert all(s["points"] == 4 for s in series), quantity  # logging.every 1, 4 steps
        pixels = {tuple(p) for p in np.asarray(png.convert("RGB")).reshape(-1, 3)}
        for s in series:  # each run's line is drawn in its colour (no antialiasing: exact pixels)
            assert tuple(int(s["color"][i:i + 2], 16) for i in (1, 3, 5)) in pixels, (quantity, s["run"])

    # the lr curves differ by the runs' 3x learning rate (same schedule): read from metrics.jsonl
    lr = {name: read_metrics((runs / name / "metrics.jsonl").read_text())[0]["lr"] for name in LRS}
    np.testing.assert_allclose([v for _, v in lr["lr_b"]], [3 * v for _, v in lr["lr_a"]], rtol=1e-5)

    # the sample images: each run's own grid of that step, side by side in the runs' order
    assert summary["sample_steps"] == [2, 4]
    for step in (2, 4):
        name = f"samples/step_{step:06d}.png"
        assert f'src="{name}"' in html
        both = np.asarray(Image.open(out / name).convert("RGB"))
        x = PAD
        for run in LRS:
            grid = np.asarray(Image.open(runs / run / "samples" / f"step_{step:06d}.png").convert("RGB"))
            h, w = grid.shape[:2]
            np.testing.assert_array_equal(both[PAD + HEADER:PAD + HEADER + h, x:x + w], grid)
            x += w + PAD
        assert both.shape[1] == x


def test_compare_refuses_what_is_not_a_run(runs, tmp_path, capsys):
    rc, _, err = jaxsd_main(capsys, "compare", runs / "lr_a", tmp_path, "--out", tmp_path / "cmp")  # in-process
    assert rc == 2
    assert "not a `jaxsd train` run directory" in err
    rc, _, err = jaxsd_main(capsys, "compare", runs / "lr_a", "--out", tmp_path / "cmp")
    assert rc == 2 and "two or more run directories" in err


def test_metrics_reading_and_smoothing():
    text = "\n".join([json.dumps({"step": 1, "loss": 4.0, "skipped": 0.0}), json.dumps({"step": 2, "loss": 2.0}),
                      '{"step": 3, "lo',  # a run killed while writing
                      json.dumps({"step": 2, "loss": 1.0, "lr": float("nan")})])  # resumed: step 2 again
    metrics, bad = read_metrics(text)
    assert bad == 1
    assert metrics["loss"] == [(1, 4.0), (2, 1.0)] and "lr" not in metrics
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert run_names(["a/x/run", "b/y/run", "c"]) == ["x/run", "y/run", "c"]


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser(runs, tmp_path):
    """index.html opened offline by headless Chromium shows the curves and the sample images."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    out = tmp_path / "cmp"
    jaxsd_command("compare", runs / "lr_a", runs / "lr_b", "--out", out)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,6000", f"--screenshot={shot}", (out / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    summary = json.loads((out / "compare.json").read_text())
    for s in summary["curves"]["loss"]["series"]:  # the curve PNGs were loaded and drawn at full size
        color = np.array([int(s["color"][i:i + 2], 16) for i in (1, 3, 5)])
        assert (pixels == color).all(axis=1).sum() > 50, s
    grid = np.asarray(Image.open(out / "samples" / "step_000004.png").convert("RGB")).reshape(-1, 3)
    sample_colours = {tuple(p) for p in grid[::7]} - {(255, 255, 255), (0, 0, 0)}
    shown = {tuple(p) for p in pixels}
    assert len(sample_colours & shown) > 0.9 * len(sample_colours)  # the side-by-side image is on the page
