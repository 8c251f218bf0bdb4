"""Print the latest results of every suite as markdown tables (what docs/benchmarks.md shows).

    python -m bench.report [RESULTS_JSONL] [--suite NAME]

For each suite, the newest record of every distinct configuration is kept and
rendered with that suite's own `format_table`, followed by the records' notes
(so smoke numbers from a loaded machine stay labelled as such).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from bench.harness import DEFAULT_RESULTS

SUITE_MODULES = {"train-step": "train_step", "scaling": "scaling", "sample": "sample", "cache": "cache",
                 "optimizer-state": "optimizer_state", "flops": "flops", "host-overhead": "host_overhead",
                 "memory": "memory", "conv-grads": "conv_grads", "conv-ab": "conv_ab",
                 "vae-step": "vae_step"}


def latest(records: list[dict]) -> dict[str, list[dict]]:
    """suite -> newest record per configuration, in first-seen order.

    A suite module may define `normalize_config(config) -> config` (defaults of options added
    later), so records from before an option existed count as the same configuration.
    """
    by_suite: dict[str, dict[str, dict]] = {}
    for r in records:
        config = r.get("config", {})
        if r["suite"] in SUITE_MODULES:
            module = importlib.import_module(f"bench.suites.{SUITE_MODULES[r['suite']]}")
            config = getattr(module, "normalize_config", lambda c: c)(config)
        key = json.dumps(config, sort_keys=True)
        by_suite.setdefault(r["suite"], {})[key] = r
    return {s: list(v.values()) for s, v in by_suite.items()}


def render(records: list[dict], suites: list[str] | None = None) -> str:
    parts = []
    for suite, recs in latest(records).items():
        if suites and suite not in suites or suite not in SUITE_MODULES:
            continue
        module = importlib.import_module(f"bench.suites.{SUITE_MODULES[suite]}")
        notes = sorted({r.get("note") for r in recs if r.get("note")})
        when = max(r["time"] for r in recs)
        machine = recs[-1]["machine"]
        head = f"### {suite}\n\nlatest {when}; {machine.get('cpu', '?')} × {machine.get('cpu_count')} cores, " \
               f"jax {recs[-1].get('jax_version')}, torch {recs[-1].get('torch_version')}"
        parts.append("\n".join([head, "", module.format_table(recs), *(f"\n> {n}" for n in notes)]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default=str(DEFAULT_RESULTS))
    p.add_argument("--suite", action="append", choices=sorted(SUITE_MODULES), help="only this suite (repeatable)")
    args = p.parse_args(argv)
    path = Path(args.path)
    if not path.is_file():
        print(f"{path}: no results yet — run `jaxsd bench SUITE` first", file=sys.stderr)
        return 1
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(render(records, args.suite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
