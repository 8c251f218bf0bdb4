"""Sample grids of one step, one per run, side by side under their run's name."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from jaxsd.compare.runs import Run

PAD = 8  # pixels between and around the grids
HEADER = 20  # pixels above each grid for its run's name


def common_sample_steps(runs: list[Run]) -> list[int]:
    """Steps at which every run wrote a sample grid, ascending."""
    steps = set(runs[0].samples)
    for run in runs[1:]:
        steps &= set(run.samples)
    return sorted(steps)


def side_by_side(runs: list[Run], step: int) -> Image.Image:
    """The runs' sample grids of `step` in one image: grids left to right in the runs' order, each under
    its run's name, top-aligned on a white background. Grid k's top-left corner is at
    x = PAD + Σ_{j<k} (width_j + PAD), y = PAD + HEADER."""
    grids = []
    for run in runs:
        with run.samples[step].open("rb") as f:
            grids.append(Image.open(f).convert("RGB"))
    width = PAD + sum(g.width + PAD for g in grids)
    height = HEADER + max(g.height for g in grids) + 2 * PAD
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    x = PAD
    for run, grid in zip(runs, grids):
        draw.text((x, PAD), f"{run.name}, step {step}", fill="black", font=font)
        out.paste(grid, (x, PAD + HEADER))
        x += grid.width + PAD
    return out

