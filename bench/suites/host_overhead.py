"""host-overhead: per-step host overhead of the real `jaxsd train` loop, steps kept in flight or not.

    jaxsd bench host-overhead          # configs/tiny.yaml, 200 steps, train.steps_in_flight 0 and 1

Each round (`--warmup` untimed ones, then `--repeats`) runs, each in a process of its own:

* `jaxsd train CONFIG train.steps=S train.steps_in_flight=N checkpoint.every=S ...` for every
  `--in-flight` N: the command a user types, with the config's own logging (metrics.jsonl,
  TensorBoard every `logging.every` steps, the progress bar); its one checkpoint comes after the
  last step is read. Its **loop step time** is the mean `step_time_s` in metrics.jsonl (the wall
  time between two metrics reads) over steps `--skip-steps`+1 .. S: the first steps load the compiled
  step and warm up. The mean, not the median: host work done every few steps is part of the cost.
* a child that builds the same step from the same config with the function the loop compiles it
  with (`jaxsd.train.plan.compiled_train_steps`), runs it once over the batches it prefetched to the
  device, then dispatches it S − skip times back to back and waits: the **device step time**, with
  no host work between steps but the dispatch itself.

**Host overhead** = loop step time − device step time of the same round: what the loop adds to
each step. Every process uses one persistent XLA compilation cache, so the device child runs the
executables the `jaxsd train` runs compiled; `info.device_new_programs` counts the programs it had
to compile itself (0: the same executables). `info.same_losses`: every `--in-flight` run of a round
logged the same losses, bit for bit (when the host reads changes nothing that is computed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import (
    REPO,
    SMOKE_CACHE_VAR,
    BenchError,
    child_env,
    make_record,
    run_child,
    stats,
    table,
)
from jaxsd.errors import InputError

# what the `jaxsd` console script runs (jaxsd.cli:main), with this interpreter
_JAXSD = "import sys; from jaxsd.cli import main; sys.exit(main())"
# set by the bench for every run; refused in --set
BENCH_KEYS = ("train.steps", "train.steps_in_flight", "checkpoint.every", "train.run_dir")
PREFETCHED = 16  # distinct batches the device child cycles through (tiny's synthetic data repeats every 4)


def _in_flight(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated step counts >= 0, e.g. 0,1")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="jaxsd train config: a YAML file or preset name (default tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted config override for every run, as after `jaxsd train CONFIG` (repeatable)")
    p.add_argument("--steps", type=int, default=200, help="train.steps of each run (default 200)")
    p.add_argument("--skip-steps", type=int, default=20,
                   help="leading steps of each run left out of the timing: loading the step, warming up (default 20)")
    p.add_argument("--in-flight", type=_in_flight, default=[0, 1], metavar="N,N",
                   help="train.steps_in_flight values, one run each per round (default 0,1: the loop before and "
                        "after issue #18)")


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every run of this benchmark shares (the device child's too: same step program)."""
    return [*args.set, f"train.steps={args.steps}", f"checkpoint.every={args.steps}"]


def _check(args: argparse.Namespace) -> int:
    """Refuse what would not measure what it says; returns the config's batch size."""
    from jaxsd.config import load_config  # jax-free

    if not 0 <= args.skip_steps < args.steps:
        raise InputError(f"--skip-steps {args.skip_steps} must be >= 0 and below --steps {args.steps}")
    taken = [o for o in args.set if o.split("=", 1)[0].strip() in BENCH_KEYS]
    if taken:
        raise InputError(f"--set {' '.join(taken)}: the benchmark sets {', '.join(BENCH_KEYS)} itself "
                         "(use --steps and --in-flight)")
    return load_config(args.config, _run_overrides(args)).train.batch_size  # a bad config fails here


def _programs(cache: str) -> set[str]:
    """The compiled programs in a persistent XLA compilation cache directory."""
    return {p.name for p in Path(cache).glob("*-cache")} if os.path.isdir(cache) else set()


def _loop_run(args: argparse.Namespace, in_flight: int, run_dir: Path, env: dict) -> tuple[float, list[float]]:
    """One `jaxsd train` run: (its mean step_time_s over the timed steps, every step's loss)."""
    argv = [sys.executable, "-c", _JAXSD, "train", args.config, *_run_overrides(args),
            f"train.steps_in_flight={in_flight}", f"train.run_dir={run_dir}"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=child_env(env),
                              timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"jaxsd train (train.steps_in_flight={in_flight}) timed out after {args.timeout:.0f} s") from e
    if proc.returncode != 0:
        raise BenchError(f"jaxsd train (train.steps_in_flight={in_flight}) exited with {proc.returncode}\n"
                         f"{proc.stderr[-6000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if [r["step"] for r in records] != list(range(1, args.steps + 1)):
        raise BenchError(f"{run_dir / 'metrics.jsonl'}: expected one record for each step 1..{args.steps}")
    return statistics.fmean(r["step_time_s"] for r in records[args.skip_steps:]), [r["loss"] for r in records]


def run(args: argparse.Namespace) -> list[dict]:
    batch_size = _check(args)
    load_at_start = os.getloadavg()
    loops: dict[int, list[float]] = {n: [] for n in args.in_flight}
    devices: list[float] = []
    same_losses, new_programs = True, 0
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-host-") as tmp:
        cache = os.environ.get(SMOKE_CACHE_VAR) or os.path.join(tmp, "xla_cache")
        # every program cached, however fast it compiled: the device child must find the runs' step
        env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        for r in range(args.warmup + args.repeats):
            times, losses = {}, []
            for n in args.in_flight:
                times[n], loss = _loop_run(args, n, Path(tmp) / f"round{r}_in_flight{n}", env)
                losses.append(loss)
            before = _programs(cache)
            device = run_child("host_overhead", "device", {"config": args.config, "overrides": _run_overrides(args),
                                                           "steps": args.steps, "skip_steps": args.skip_steps},
                               env=env, timeout=args.timeout)
            new_programs += len(_programs(cache) - before)
            same_losses = same_losses and all(loss == losses[0] for loss in losses)
            if r >= args.warmup:
                devices.append(device["device_step_s"])
                for n, t in times.items():
                    loops[n].append(t)
    records = []
    for n in args.in_flight:
        figures = {"loop_step_s": stats(loops[n]), "device_step_s": stats(devices),
                   "host_overhead_s": stats(t - d for t, d in zip(loops[n], devices)),
                   "info": {"batch_size": batch_size, "load_avg_at_start": list(load_at_start),
                            "device_new_programs": new_programs, "same_losses": same_losses, **device["info"]}}
        config = {"config": args.config, "overrides": list(args.set), "steps": args.steps,
                  "skip_steps": args.skip_steps, "steps_in_flight": n, "warmup": args.warmup, "repeats": args.repeats}
        records.append(make_record("host-overhead", config, {"jaxsd": figures}, note=args.note))
    return records


def normalize_config(config: dict) -> dict:
    """Warm-up and repeat counts are measurement effort, not configuration."""
    return {k: v for k, v in config.items() if k not in ("warmup", "repeats")}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def format_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        c, j = r["config"], r["jaxsd"]
        over, device = j["host_overhead_s"], j["device_step_s"]["median"]
        rows.append([c["config"], " ".join(c["overrides"]) or "—", str(c["steps"]), str(c["steps_in_flight"]),
                     _ms(j["loop_step_s"]["median"]), _ms(device),
                     f"{_ms(over['median'])} ({_ms(over['min'])} … {_ms(over['max'])})",
                     f"{over['median'] / device:.1%}"])
    return table(["config", "overrides", "steps", "in flight", "loop step ms", "device step ms",
                  "host overhead ms (min … max)", "overhead / device step"], rows)


# ----------------------------------------------------------------------------- child

def child_device(config: dict) -> dict:
    """The loop's step, compiled as the loop compiles it, dispatched back to back: seconds per step."""
    import jax

    from jaxsd.config import load_config
    from jaxsd.train.loop import make_source, on_mesh
    from jaxsd.train.model import initial_params
    from jaxsd.train.plan import compiled_train_steps, fresh_state, plan_state
    from jaxsd.train.sharding import make_mesh

    cfg = load_config(config["config"], config["overrides"])
    mesh = make_mesh(cfg.sharding)
    plan = plan_state(cfg, mesh)
    params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings, dtype=plan.base_dtype)
    state = fresh_state(cfg, plan, params)
    source = make_source(cfg, mesh)
    steps = compiled_train_steps(cfg, plan, mesh, source.empty_prompt() if cfg.loss.cond_dropout > 0 else None)
    batches = [on_mesh(next(source), mesh) for _ in range(min(config["steps"], PREFETCHED))]
    for batch in batches:  # untimed: loads the executable of every batch shape, warms up
        state, metrics, _ = steps(state, batch)
    jax.block_until_ready((state, metrics))
    timed = config["steps"] - config["skip_steps"]
    t0 = time.perf_counter()
    for i in range(timed):
        state, metrics, _ = steps(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    return {"device_step_s": (time.perf_counter() - t0) / timed,
            "info": {"backend": jax.default_backend(), "devices": mesh.size}}
