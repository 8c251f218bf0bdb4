"""The config keys whose values differ between runs (their config.yaml files)."""

from __future__ import annotations

from typing import Any

from jaxsd.compare.runs import Run

# where each run lives: always different, and shown as the run's path instead
WHERE_KEYS = ("train.run_dir",)
MISSING = "—"  # a key one run's config does not have (an older jaxsd, or a section left out)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict → {dotted key: leaf value}; lists stay values (`data.roots: [a, b]`)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_diff(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """{dotted key: {run name: value, or MISSING}} for every key not equal in all runs, sorted by key."""
    flat = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat) - set(WHERE_KEYS))
    diff = {}
    for key in keys:
        values = [f.get(key, MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diff[key] = {run.name: v for run, v in zip(runs, values)}
    return diff
