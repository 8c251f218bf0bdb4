"""The measuring machinery every suite shares.

* `run_child` runs one framework's measurement in a fresh interpreter
  (`python -m bench.child`) and reads that child's peak RSS from the kernel
  (`os.wait4` → `ru_maxrss`), so jaxsd's and torch's peaks never mix and a child
  that dies still reports what it reached.
* `stats` reduces repeats to {min, median, max, n}.
* `make_record` / `append_jsonl` write the one-record-per-line results file;
  `comparison_table` prints the compact table.

These machines are noisy: compare ratios measured in the same run, not absolute
times across runs.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "bench" / "results.jsonl"
FRAMEWORKS = ("jaxsd", "torch")


class BenchError(RuntimeError):
    """A benchmark that could not run (a failed child, no measurements); bad options are InputErrors."""


# ----------------------------------------------------------------------------- statistics

def stats(values: Iterable[float]) -> dict:
    """{min, median, max, n} of the repeats (empty input is an error, not zeros)."""
    vals = [float(v) for v in values]
    if not vals:
        raise BenchError("no measurements to summarise")
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def ratio(ours: dict | None, theirs: dict | None) -> float | None:
    """jaxsd/torch ratio of medians; None when either side was not measured."""
    if not ours or not theirs or not theirs.get("median"):
        return None
    return ours["median"] / theirs["median"]


def timed_throughput(fn, config: Mapping) -> tuple[list[float], list[float]]:
    """(seconds per call, images/s per call) of `config["repeats"]` calls of `fn` after `config["warmup"]`
    untimed ones; `config["batch"]` images per call."""
    times = []
    for i in range(config["warmup"] + config["repeats"]):
        t0 = time.perf_counter()
        fn()
        if i >= config["warmup"]:
            times.append(time.perf_counter() - t0)
    return times, [config["batch"] / t for t in times]


# ----------------------------------------------------------------------------- child processes

# A persistent XLA compilation cache would turn "compile time" into "cache load time",
# so children never inherit the user's; smoke tests opt in through this variable
# (recorded in the machine info of every record).
SMOKE_CACHE_VAR = "JAXSD_BENCH_COMPILATION_CACHE"


def child_env(extra: Mapping[str, str] | None = None) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if env.get(SMOKE_CACHE_VAR):
        env["JAX_COMPILATION_CACHE_DIR"] = env[SMOKE_CACHE_VAR]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_child(task: str, framework: str, config: Mapping, *, env: Mapping[str, str] | None = None,
              timeout: float = 3600.0) -> dict:
    """Run `bench.child` for one (task, framework) measurement in its own process.

    Returns the child's result dict plus `peak_rss_gb` (the child's ru_maxrss as
    the kernel reports it on exit). Raises BenchError with the child's stderr tail
    if it fails or times out.
    """
    with tempfile.TemporaryDirectory(prefix="jaxsd-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(dict(config)))
        cmd = [sys.executable, "-m", "bench.child", task, framework, str(cfg), str(out)]
        with open(Path(tmp) / "stdout", "w+") as so, open(Path(tmp) / "stderr", "w+") as se:
            proc = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=REPO, env=child_env(env))
            timed_out = threading.Event()

            def _kill():
                timed_out.set()
                proc.kill()

            timer = threading.Timer(timeout, _kill)
            timer.start()
            try:
                # wait4 (not proc.wait) so the kernel hands us this child's resource usage.
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            se.seek(0)
            err = se.read()
        if timed_out.is_set():
            raise BenchError(f"{task}/{framework}: child timed out after {timeout:.0f} s\n{err[-3000:]}")
        if proc.returncode != 0 or not out.exists():
            raise BenchError(f"{task}/{framework}: child exited with {proc.returncode}\n{err[-6000:]}")
        result = json.loads(out.read_text())
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # Linux reports KiB
    return result


def repeat_children(task: str, framework: str, config: Mapping, processes: int, **kw) -> dict:
    """Run `processes` children and merge their figures into min/median/max stats.

    Step times pool every timed repeat of every child; peak RSS and compile time
    have one value per child (each process compiles and peaks once).
    """
    runs = [run_child(task, framework, config, **kw) for _ in range(max(1, processes))]
    merged: dict = {}
    for key in runs[0]:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            continue
        if isinstance(vals[0], list):
            merged[key] = stats(v for r in vals for v in r)
        elif isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool):
            merged[key] = stats(vals)
        else:
            merged[key] = vals[0]
    return merged


# ----------------------------------------------------------------------------- machine + versions

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Installed versions, read from package metadata (imports neither jax nor torch)."""
    names = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers")
    out = {n: _version(n) for n in names}
    try:
        out["jaxsd_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["jaxsd_git"] = None
    return out


def machine() -> dict:
    """What the numbers were measured on, including how loaded the machine was."""
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) * 1024 / 1e9, 1)
                break
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    info["jax_platforms"] = os.environ.get("JAX_PLATFORMS") or "default"
    info["compilation_cache"] = os.environ.get(SMOKE_CACHE_VAR) or None
    return info


# ----------------------------------------------------------------------------- records

def make_record(suite: str, config: Mapping, results: Mapping, *, note: str | None = None) -> dict:
    """One JSON line: suite, config, machine, versions, per-framework figures and ratios.

    `results` maps a framework ("jaxsd"/"torch") to {figure: stats} and may carry
    suite-specific top-level keys (e.g. "published"). The `ratio` of every figure
    both frameworks have is added here (jaxsd median / torch median).
    """
    vers = versions()
    rec = {"suite": suite, "config": dict(config),
           "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "machine": machine(), "jax_version": vers["jax"], "torch_version": vers["torch"], "versions": vers}
    rec.update(results)
    ours, theirs = results.get("jaxsd"), results.get("torch")
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        rec["ratio"] = {k: ratio(ours[k], theirs[k]) for k in ours
                        if isinstance(ours[k], Mapping) and "median" in ours[k]
                        and isinstance(theirs.get(k), Mapping) and "median" in theirs[k]}
    if note:
        rec["note"] = note
    return rec


def compiled_memory_figures(out: Mapping) -> dict:
    """A memory-analysis child's result (`bench.jaxsd_unet.memory_figures` + compile and lowering
    time) as record figures: GB as numbers, times and peak RSS as stats of the one child."""
    figures = {k: out[k] for k in ("argument_gb", "output_gb", "alias_gb", "temp_gb", "per_device_gb")}
    for key in ("compile_s", "lower_s", "peak_rss_gb"):
        if out.get(key) is not None:
            figures[key] = stats([out[key]])
    return figures


def append_jsonl(path: str | os.PathLike, records: Sequence[Mapping]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.writelines(json.dumps(r, sort_keys=False) + "\n" for r in records)
    return path


# ----------------------------------------------------------------------------- tables

def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, Mapping):
        x = x.get("median")
        if x is None:
            return "—"
    if unit == "x":
        return f"{x:.3g}×"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    if abs(x) >= 1:
        return f"{x:.2f}{unit}"
    return f"{x:.3g}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table (readable in a terminal and pasteable into docs)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def comparison_table(records: Sequence[Mapping], label_keys: Sequence[str]) -> str:
    """jaxsd vs torch: median step time, peak RSS, jaxsd compile time and the ratios."""
    headers = [*label_keys, "jaxsd step s", "torch step s", "step ×", "jaxsd RSS GB", "torch RSS GB", "RSS ×",
               "jaxsd compile s"]
    rows = []
    for r in records:
        j, t, q = r.get("jaxsd") or {}, r.get("torch") or {}, r.get("ratio") or {}
        rows.append([*(str(r["config"].get(k, "")) for k in label_keys),
                     _fmt(j.get("step_s")), _fmt(t.get("step_s")), _fmt(q.get("step_s"), "x"),
                     _fmt(j.get("peak_rss_gb")), _fmt(t.get("peak_rss_gb")), _fmt(q.get("peak_rss_gb"), "x"),
                     _fmt(j.get("compile_s"))])
    return table(headers, rows)


__all__ = [
    "DEFAULT_RESULTS",
    "FRAMEWORKS",
    "REPO",
    "BenchError",
    "append_jsonl",
    "comparison_table",
    "compiled_memory_figures",
    "machine",
    "make_record",
    "ratio",
    "repeat_children",
    "run_child",
    "stats",
    "table",
    "timed_throughput",
    "versions",
]
