"""Fixtures shared by the files of tests/train/."""

from __future__ import annotations

import pytest

from tests.train.tiny_run import TinyRun, tiny_run


@pytest.fixture(scope="session", name="tiny_run")
def tiny_run_fixture(tmp_path_factory) -> TinyRun:
    """The shared tiny fine-tuning run of tests/train/tiny_run.py (read only)."""
    return tiny_run(tmp_path_factory)
