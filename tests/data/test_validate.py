"""The validation pass over a generated dataset with every bad case: the report lists exactly the bad files."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import jaxsd.data.sources as sources_mod
from jaxsd.data.config import CacheConfig, DataConfig, ImageConfig, ValidationConfig
from jaxsd.data.images import read_bytes, to_rgb
from jaxsd.data.sources import open_sources
from jaxsd.data.validate import Report, report_path, validate
from tests.data.dataset import make_dataset


def simulate_root_permissions(monkeypatch):
    """Root reads chmod-000 files anyway; make such files fail as they do for ordinary users."""
    if os.geteuid() != 0:
        return

    def guarded(path):
        if os.stat(path).st_mode & 0o444 == 0:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(sources_mod, "read_bytes", guarded)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return root, make_dataset(root)


def _run(root, **overrides):
    cfg = DataConfig(roots=(str(root),), image=ImageConfig(resolution=64),
                     cache=CacheConfig(caption_blocklist=("forbidden",)), **overrides)
    srcs = open_sources(cfg)
    items, problems = srcs[0].scan()
    return cfg, srcs, *validate(srcs, items, cfg, scan_problems=problems)


def rel(root, paths):
    return {os.path.relpath(p, root) for p in paths}


def test_report_lists_exactly_the_bad_files(dataset, monkeypatch, tmp_path):
    root, expect = dataset
    simulate_root_permissions(monkeypatch)
    cfg, srcs, valid, report = _run(root)
    assert rel(root, report.files("skipped")) == expect["skipped"]
    assert rel(root, report.files("dropped")) == expect["dropped"]
    assert rel(root, report.files("altered")) == expect["altered"]
    kept = rel(root, [v.item.path for v in valid])
    assert kept == expect["kept_good"] | expect["altered"]
    assert report.counts == {"total": len(kept) + 8, "kept": len(kept), "altered": 8, "skipped": 7, "dropped": 1}
    reasons = {os.path.relpath(f.path, root): " ".join(f.reasons) for f in report.findings}
    assert "permission denied" in reasons["noperm.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "dup.jpg" in reasons["dup.png"]
    assert "EXIF orientation 6" in reasons["exif_rotated.jpg"]
    assert "CMYK" in reasons["cmyk.jpg"] and "16-bit" in reasons["gray16.png"]
    assert "composited" in reasons["la.png"] and "composited" in reasons["rgba.png"]
    # the EXIF rotation swapped the stored 96x64 landscape into a 64x96 portrait
    assert {v.size for v in valid if v.item.path.endswith("exif_rotated.jpg")} == {(96, 64)}
    # a caption file ending .caption is found in a subfolder; its key keeps the folder
    assert any(v.item.key == "sub/nested" and v.caption == "a nested picture" for v in valid)
    # summary on the console, and the JSON file round-trips
    assert "7 skipped" in report.summary() and "1 dropped" in report.summary()
    path = report_path(cfg, srcs)
    report.write(path)
    assert Report.from_json(json.loads(path.read_text())).counts == report.counts


def test_policies_upscale_and_empty_caption(dataset, monkeypatch):
    root, expect = dataset
    simulate_root_permissions(monkeypatch)
    _, _, valid, report = _run(root, validation=ValidationConfig(too_small="upscale", missing_caption="empty"))
    kept = rel(root, [v.item.path for v in valid])
    assert {"small.png", "nocaption.png", "emptycaption.png"} <= kept
    assert rel(root, report.files("skipped")) == expect["skipped"] - {"small.png", "nocaption.png", "emptycaption.png"}
    assert [v.caption for v in valid if v.item.path.endswith("nocaption.png")] == [""]


def test_composite_background_and_image_check(tmp_path):
    la = Image.fromarray(np.zeros((4, 4, 2), np.uint8), "LA")  # black, fully transparent
    rgb, notes = to_rgb(la, (10, 20, 30))
    assert np.all(np.asarray(rgb) == [10, 20, 30]) and notes
    root = tmp_path / "r"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 100, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(["dark", "blue", "red"][i])
    cfg = DataConfig(roots=(str(root),), image=ImageConfig(resolution=64),
                     cache=CacheConfig(image_check="tests.data.test_validate:reject_black", caption_regex="^bl"))
    srcs = open_sources(cfg)
    items, _ = srcs[0].scan()
    valid, report = validate(srcs, items, cfg)
    assert [v.caption for v in valid] == ["red"]
    why = {os.path.basename(f.path): f.reasons[0] for f in report.findings}
    assert why == {"0.png": "image check: all black", "1.png": "caption filter: matches '^bl'"}


def reject_black(image, caption):
    """A per-image check plugged in by name in the test above."""
    return "all black" if np.asarray(image).max() == 0 else None


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.roots"):
        open_sources(DataConfig(roots=(str(tmp_path / "nope"),)))
    with pytest.raises(ValueError, match="no data source"):
        open_sources(DataConfig())


def test_validate_only_command(dataset, monkeypatch, tmp_path, capsys):
    from jaxsd.cli import main

    root, expect = dataset
    simulate_root_permissions(monkeypatch)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"data:\n  roots: [{root}]\n  image: {{resolution: 64}}\n"
                    f"  validation: {{report: {tmp_path / 'report.json'}}}\n")
    assert main(["cache", str(yaml), "--validate-only"]) == 0  # no VAE/text encoder configured: not needed
    assert "validation: 42 images" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    skipped = {os.path.relpath(f["path"], root) for f in report["files"] if f["action"] == "skipped"}
    assert skipped == expect["skipped"]
