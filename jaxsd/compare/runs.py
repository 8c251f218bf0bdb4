"""What `jaxsd compare` reads from a run directory (local or gs://): metrics, config, sample grids."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import yaml
from etils import epath

from jaxsd.errors import InputError, InputNotFoundError
from jaxsd.train.run_dir import run_path

SAMPLE_GRID = re.compile(r"step_(\d+)\.png")  # jaxsd/train/sampling.py's file names


@dataclass
class Run:
    """One run as `jaxsd compare` sees it.

    metrics: quantity -> [(step, value)] sorted by step, one value per step (a resumed run's later
    lines replace the earlier ones of the same step, as TensorBoard shows it); config: the run's
    config.yaml as a nested dict ({} when absent); samples: step -> sample grid PNG path."""

    name: str
    path: epath.Path
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    samples: dict[int, epath.Path] = field(default_factory=dict)
    skipped_lines: int = 0  # metrics.jsonl lines that are not JSON (a run killed mid-write)

    @property
    def last_step(self) -> int | None:
        steps = [points[-1][0] for points in self.metrics.values() if points]
        return max(steps) if steps else None


def read_metrics(text: str) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """metrics.jsonl text → (quantity -> [(step, value)] by step, number of unreadable lines).

    Only finite numbers are kept per quantity; `step` itself is the x axis, not a quantity."""
    by_step: dict[str, dict[int, float]] = {}
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                by_step.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_step.items()}, bad


def load_run(path: str | os.PathLike, name: str) -> Run:
    """The run at `path`; InputError when it holds neither metrics.jsonl nor config.yaml."""
    root = run_path(path, "RUN")
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: no such run directory")
    metrics_file, config_file = root / "metrics.jsonl", root / "config.yaml"
    if not metrics_file.exists() and not config_file.exists():
        raise InputError(f"{root}: no metrics.jsonl or config.yaml — not a `jaxsd train` run directory "
                         "(give the folder that train.run_dir named)")
    run = Run(name=name, path=root)
    if metrics_file.exists():
        run.metrics, run.skipped_lines = read_metrics(metrics_file.read_text())
    if config_file.exists():
        try:
            run.config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{config_file}: not readable YAML ({e})") from None
    samples = root / "samples"
    if samples.is_dir():
        for png in samples.iterdir():
            m = SAMPLE_GRID.fullmatch(png.name)
            if m:
                run.samples[int(m.group(1))] = png
    return run


def run_names(paths: list[str]) -> list[str]:
    """Short distinct labels for runs: each folder's name, with parent folders added until distinct."""
    parts = [os.fspath(p).rstrip("/").split("/") for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} ({i})" for i, n in enumerate(names)]  # the same path given twice
