"""The demo stops after a training run that did not reach its last step (SIGTERM/SIGINT: the trainer saves
and exits 0) instead of exporting and judging a half-trained model."""

from __future__ import annotations

import pytest

from jaxsd.demo import run


def test_an_interrupted_training_run_stops_the_demo(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run, "run_cli", calls.append)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # what a run stopped by a signal at step 3 leaves
    with pytest.raises(SystemExit, match="stopped at step 3 of 5"):
        run.train_to_the_end(tmp_path / "demo.yaml", tmp_path, 5)
    assert calls == [["train", str(tmp_path / "demo.yaml")]]
    (tmp_path / "checkpoints" / "5").mkdir()
    run.train_to_the_end(tmp_path / "demo.yaml", tmp_path, 5)  # reached: the demo goes on
