"""One PNG per quantity, every run overlaid (matplotlib, headless).

Noisy quantities (losses) are drawn as a trailing moving average over `window` logged points, the raw
values faint behind it. Each PNG records what it shows in its `jaxsd:series` text chunk (run, colour,
points), so a reader — or a test — can check the plot without parsing pixels; the main lines are
drawn without antialiasing, so each run's colour appears in the image exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxsd.compare.runs import Run

# the quantities people look at first, in this order; any other logged number follows
FIRST = ("loss", "loss_raw", "val/loss", "lr", "grad_norm", "qk_grads_av", "images_per_s")
NOT_PLOTTED = ("skipped",)  # 0/1 flags: the loss curve's gaps say more
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
SERIES_KEY = "jaxsd:series"


def quantities(runs: list[Run]) -> list[str]:
    """Every quantity some run logged, FIRST's order first, then the rest sorted (val/ ones together)."""
    present = {key for run in runs for key, points in run.metrics.items() if points} - set(NOT_PLOTTED)
    return [q for q in FIRST if q in present] + sorted(present - set(FIRST))


def is_noisy(quantity: str) -> bool:
    """Per-batch losses jump from step to step; their trend is what a comparison needs."""
    return quantity.startswith("loss")


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start): values [N] → [N]."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def file_name(quantity: str) -> str:
    """A quantity's PNG name: `val/loss_t500` → `val_loss_t500.png`."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in quantity) + ".png"


def plot_quantity(runs: list[Run], quantity: str, out: Path, window: int) -> list[dict]:
    """Write `quantity` of every run that logged it to `out` (PNG); returns the series drawn."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    smooth = window > 1 and is_noisy(quantity)
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    series = []
    for i, run in enumerate(runs):
        points = run.metrics.get(quantity)
        if not points:
            continue
        color = COLORS[i % len(COLORS)]
        steps = np.array([s for s, _ in points])
        values = np.array([v for _, v in points], dtype=np.float64)
        if smooth:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(values, window) if smooth else values, color=color, linewidth=2.0,
                antialiased=False, label=run.name, marker="o" if len(points) == 1 else None)
        series.append({"run": run.name, "color": color, "points": len(points)})
    ax.set_xlabel("step")
    ax.set_ylabel(quantity)
    ax.set_title(f"{quantity} (moving average over {window} logged points)" if smooth else quantity)
    ax.grid(True, alpha=0.3)
    if quantity == "lr" or (quantity.startswith("loss") and _spans_decades(runs, quantity)):
        ax.set_yscale("log")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, format="png", metadata={SERIES_KEY: json.dumps(series)})
    plt.close(fig)
    return series


def _spans_decades(runs: list[Run], quantity: str) -> bool:
    """Whether a positive quantity varies by more than 100× (then a log axis shows both ends)."""
    values = np.array([v for run in runs for _, v in run.metrics.get(quantity, [])])
    return bool(len(values) and values.min() > 0 and values.max() / values.min() > 100)
