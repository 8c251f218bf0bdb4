"""Compare training runs side by side: curves, sample grids, config differences.

    jaxsd compare RUN_A RUN_B [RUN ...] --out DIR [--smooth N]

Reads each run directory (local or gs://) that `jaxsd train` wrote — metrics.jsonl, config.yaml,
samples/step_*.png — and writes into DIR:

  index.html             everything below on one page; relative links, opens offline in a browser
  curves/<quantity>.png  one plot per logged quantity with every run overlaid: loss, loss_raw,
                         val/loss (and the other val/ ones), lr, grad_norm, qk_grads_av, images_per_s,
                         ... Losses are drawn as a moving average over --smooth logged points, the raw
                         values faint behind
  samples/step_N.png     for each step where every run has a sample grid (logging.sample_every):
                         the runs' grids side by side, each labelled with its run
  config_diff.json       the config keys whose values differ between the runs (train.run_dir aside)
  compare.json           what was compared

Runs are labelled by their folder names (parent folders added when two are the same). Nothing
needs jax: a comparison can run anywhere the run directories can be read.

Example:
  jaxsd compare runs/lr1e-4 runs/lr3e-4 --out compare/lr
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsd.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="`jaxsd train` run directories (local or gs://), two or more")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; a previous report is replaced)")
    parser.add_argument("--smooth", type=int, default=10, metavar="N",
                        help="moving-average window over logged points for the loss curves (default 10; 1 = raw)")


def run(args: argparse.Namespace) -> int:
    from jaxsd.compare.report import write_report
    from jaxsd.compare.runs import load_run, run_names

    if len(args.runs) < 2:
        raise InputError("jaxsd compare needs two or more run directories (RUN_A RUN_B ...)")
    if args.smooth < 1:
        raise InputError(f"--smooth {args.smooth}: give a window of 1 (no smoothing) or more logged points")
    runs = [load_run(path, name) for path, name in zip(args.runs, run_names(args.runs))]
    out = Path(args.out)
    summary = write_report(runs, out, args.smooth)
    for r in runs:
        if r.skipped_lines:
            print(f"{r.name}: {r.skipped_lines} line(s) of metrics.jsonl were not JSON and were left out "
                  "(a run killed while writing)")
    print(f"compared {len(runs)} runs: {len(summary['curves'])} curves, {len(summary['sample_steps'])} sample "
          f"steps, {len(summary['config_diff'])} config keys differ → {out / 'index.html'}")
    return 0
