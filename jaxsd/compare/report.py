"""`jaxsd compare`'s output folder: curves/, samples/, config_diff.json and the index.html over them.

    OUT/index.html          runs, config diff, curves, samples; relative links only (opens offline)
    OUT/curves/<q>.png      one per quantity (curves.py), e.g. loss.png, val_loss.png
    OUT/samples/step_N.png  the runs' sample grids of step N side by side (samples.py)
    OUT/config_diff.json    {key: {run: value}} for the keys that differ
    OUT/compare.json        what was compared: runs, quantities and the series of each plot, sample steps
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxsd.compare.config_diff import config_diff
from jaxsd.compare.curves import file_name, plot_quantity, quantities
from jaxsd.compare.runs import Run
from jaxsd.compare.samples import common_sample_steps, side_by_side


def write_report(runs: list[Run], out: Path, window: int) -> dict[str, Any]:
    """Write every file above into `out` (created; files of a previous report are replaced).

    Returns compare.json's content."""
    (out / "curves").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    curves = {}
    for q in tqdm(quantities(runs), desc="curves", unit="plot", leave=False):
        name = f"curves/{file_name(q)}"
        curves[q] = {"file": name, "series": plot_quantity(runs, q, out / name, window)}
    steps = common_sample_steps(runs)
    samples = {}
    for step in tqdm(steps, desc="sample grids", unit="step", leave=False):
        name = f"samples/step_{step:06d}.png"
        side_by_side(runs, step).save(out / name)
        samples[step] = name
    diff = config_diff(runs)
    (out / "config_diff.json").write_text(json.dumps(diff, indent=1, default=str) + "\n")
    summary = {
        "runs": [{"name": r.name, "path": str(r.path), "last_step": r.last_step, "sample_steps": sorted(r.samples),
                  "unreadable_metric_lines": r.skipped_lines} for r in runs],
        "smoothing_window": window,
        "curves": curves,
        "sample_steps": steps,
        "config_diff": sorted(diff),
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "index.html").write_text(_html(runs, curves, samples, diff))
    return summary


def _html(runs: list[Run], curves: dict, samples: dict[int, str], diff: dict) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(r.name)}</td><td><code>{e(str(r.path))}</code></td><td>{r.last_step}</td>"
                   f"<td>{_last(r, 'loss')}</td><td>{len(r.samples)}</td></tr>" for r in runs)
    if diff:
        head = "".join(f"<th>{e(r.name)}</th>" for r in runs)
        body = "".join(f"<tr><td><code>{e(k)}</code></td>" + "".join(f"<td>{e(str(v))}</td>" for v in per.values())
                       + "</tr>" for k, per in diff.items())
        diff_html = f"<table><tr><th>key</th>{head}</tr>{body}</table>"
    else:
        diff_html = "<p>The runs' configs are the same (apart from train.run_dir).</p>"
    curve_html = "".join(f'<figure><img src="{e(c["file"])}" alt="{e(q)}"></figure>' for q, c in curves.items()) \
        or "<p>No run logged any metrics yet.</p>"
    sample_html = "".join(f'<h3>step {s}</h3><img src="{e(f)}" alt="samples at step {s}">'
                          for s, f in samples.items()) \
        or "<p>No step has a sample grid in every run (logging.sample_every).</p>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jaxsd compare: {e(", ".join(r.name for r in runs))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:100%}}</style></head>
<body>
<h1>jaxsd compare</h1>
<h2>Runs</h2>
<table><tr><th>run</th><th>path</th><th>last step</th><th>last loss</th><th>sample grids</th></tr>{rows}</table>
<h2>Config keys that differ</h2>
{diff_html}
<h2>Curves</h2>
{curve_html}
<h2>Samples</h2>
{sample_html}
</body></html>
"""


def _last(run: Run, quantity: str) -> str:
    points = run.metrics.get(quantity)
    return f"{points[-1][1]:.4g}" if points else "—"
