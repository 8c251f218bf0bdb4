"""Smoke runs of `jaxsd bench` suites on the `micro` UNet: the code paths work end to end and
each JSON record carries the fields issue #8 names. No timing is asserted (the numbers
of a loaded CI machine mean nothing); correctness checks are on things that cannot
vary: same weights → same first loss in both frameworks, byte counts from shapes.

The children share a persistent XLA compilation cache (JAXSD_BENCH_COMPILATION_CACHE),
so the micro train step compiles once for the whole module.
"""

from __future__ import annotations

import json

import pytest

from bench import harness, report
from jaxsd import cli

STAT_KEYS = {"min", "median", "max", "n"}


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(harness.SMOKE_CACHE_VAR, str(tmp_path_factory.mktemp("xla_cache")))
    mp.setenv("JAX_PLATFORMS", "cpu")
    yield tmp_path_factory.mktemp("bench")
    mp.undo()


def _run(out_dir, *argv) -> list[dict]:
    path = out_dir / f"{argv[0]}-{len(list(out_dir.iterdir()))}.jsonl"  # one results file per run
    assert cli.main(["bench", *argv, "--json", str(path)]) == 0
    return [json.loads(line) for line in path.read_text().splitlines()]


def _is_stats(x) -> bool:
    return isinstance(x, dict) and STAT_KEYS <= set(x) and x["min"] <= x["median"] <= x["max"]


def test_stats_and_ratio():
    s = harness.stats([3.0, 1.0, 2.0])
    assert s == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    assert harness.ratio({"median": 1.0}, {"median": 4.0}) == 0.25
    assert harness.ratio({"median": 1.0}, None) is None
    with pytest.raises(harness.BenchError, match="no measurements"):
        harness.stats([])


def test_failing_child_is_reported(bench_env):
    with pytest.raises(harness.BenchError, match="no child_nonexistent"):
        harness.run_child("optimizer_state", "nonexistent", {}, timeout=120)


def test_unknown_option_values_are_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "train-step", "--frameworks", "jax,torch"])
    assert "subset of jaxsd,torch" in capsys.readouterr().err


@pytest.mark.slow  # ~60 s: two child processes each compile a train step; the flops test covers the jaxsd step
@pytest.mark.torch
def test_train_step_micro(bench_env):
    (rec,) = _run(bench_env, "train-step", "--preset", "micro", "--step", "simple", "--repeats", "1",
                  "--warmup", "0")
    assert rec["suite"] == "train-step"
    assert rec["config"]["preset"] == "micro" and rec["config"]["batch"] == 1
    assert {"host", "cpu_count"} <= set(rec["machine"]) and rec["jax_version"] and rec["torch_version"]
    for fw, figures in (("jaxsd", ("step_s", "peak_rss_gb", "compile_s")), ("torch", ("step_s", "peak_rss_gb"))):
        for fig in figures:
            assert _is_stats(rec[fw][fig]), (fw, fig, rec[fw].get(fig))
    assert set(rec["ratio"]) >= {"step_s", "peak_rss_gb"}
    assert rec["ratio"]["step_s"] > 0 and rec["ratio"]["peak_rss_gb"] > 0
    # each child's own peak, read from the kernel: at least an interpreter's worth
    assert rec["jaxsd"]["peak_rss_gb"]["min"] > 0.05 and rec["torch"]["peak_rss_gb"]["min"] > 0.05
    # same weights and batch in both frameworks: the first loss agrees
    j, t = rec["jaxsd"]["info"]["first_loss"], rec["torch"]["info"]["first_loss"]
    assert abs(j - t) <= 1e-4 * abs(t), (j, t)
    assert rec["jaxsd"]["info"]["num_params"] == rec["torch"]["info"]["num_params"]


def test_optimizer_state_micro(bench_env):
    recs = _run(bench_env, "optimizer-state", "--preset", "micro")
    by_name = {r["config"]["optimizer"]: r for r in recs}
    assert set(by_name) == {"adamw", "adamw8bit", "adafactor"}
    adamw = by_name["adamw"]["jaxsd"]
    # AdamW holds two fp32 moments per param (+ a step counter)
    assert abs(adamw["state_bytes"] - 2 * adamw["param_bytes"]) <= 64
    assert by_name["adafactor"]["jaxsd"]["state_bytes"] < adamw["state_bytes"]
    assert by_name["adamw8bit"]["ratio"]["state_vs_adamw"] < 1.0
    # and the docs' report renders them
    text = report.render(recs)
    assert text.startswith("### optimizer-state") and "adamw8bit" in text


def test_flops_micro(bench_env):
    # --step simple: the same executable test_train_step_micro compiled (a compilation-cache hit);
    # the real training step is compiled by the slow scaling test
    (rec,) = _run(bench_env, "flops", "--models", "micro", "--step", "simple")
    j = rec["jaxsd"]
    assert j["flops"] > 0 and j["flops_per_image"] == j["flops"]
    assert _is_stats(j["compile_s"])
    assert rec["published_flops_per_image"] is None  # no published count for micro
    floors = rec["floor_s_per_image"]
    assert set(floors) == {"H100", "TPU v5p", "TPU v6e"}
    assert floors["TPU v5p"] > floors["TPU v6e"] > floors["H100"] > 0


@pytest.mark.slow
@pytest.mark.torch
def test_cache_tiny(bench_env):
    (rec,) = _run(bench_env, "cache", "--repeats", "1", "--warmup", "0", "--batch", "2")
    for fw in ("jaxsd", "torch"):
        assert _is_stats(rec[fw]["step_s"]) and _is_stats(rec[fw]["images_per_s"]) and _is_stats(rec[fw]["peak_rss_gb"])
    assert _is_stats(rec["jaxsd"]["compile_s"])
    assert rec["ratio"]["images_per_s"] > 0
    # same weights and inputs: the encoders agree
    for key in ("latent_mean_avg", "hidden_avg"):
        j, t = rec["jaxsd"]["info"][key], rec["torch"]["info"][key]
        assert abs(j - t) <= 1e-4 * max(abs(t), 1e-3), (key, j, t)


@pytest.mark.slow
@pytest.mark.torch
def test_scaling_micro(bench_env):
    # default --step train: jaxsd's real training step vs diffusers' recipe in torch
    recs = _run(bench_env, "scaling", "--preset", "micro", "--sweep", "batch,devices", "--batches", "2",
                "--devices", "1,2", "--latent", "8", "--repeats", "1", "--warmup", "0")
    steps = [r for r in recs if r["config"]["sweep"] == "batch"]
    devs = {r["config"]["devices"]: r["jaxsd"] for r in recs if r["config"]["sweep"] == "devices"}
    assert len(steps) == 1 and steps[0]["config"]["batch"] == 2 and _is_stats(steps[0]["torch"]["step_s"])
    assert all(r["config"]["step"] == "train" for r in recs)
    for fw in ("jaxsd", "torch"):
        loss = steps[0][fw]["info"]["first_loss"]
        assert 0.1 < loss < 10, (fw, loss)  # an epsilon-prediction MSE of a random UNet is O(1)
    assert set(devs) == {1, 2}
    # FSDP halves the per-device params + optimizer state
    assert devs[2]["argument_gb"] < 0.6 * devs[1]["argument_gb"]


@pytest.mark.slow
@pytest.mark.torch
def test_sample_tiny(bench_env):
    (rec,) = _run(bench_env, "sample", "--steps", "4", "--repeats", "1", "--warmup", "0")
    assert rec["config"]["sampler"] == "dpmpp_2m" and rec["config"]["steps"] == 4
    for fw in ("jaxsd", "torch"):
        assert _is_stats(rec[fw]["step_s"]) and _is_stats(rec[fw]["peak_rss_gb"])
    assert _is_stats(rec["jaxsd"]["compile_s"]) and rec["ratio"]["step_s"] > 0
    # same folder, prompt and initial latents: the same picture (mean pixel within rounding)
    j, t = rec["jaxsd"]["info"]["image_mean"], rec["torch"]["info"]["image_mean"]
    assert abs(j - t) < 0.5, (j, t)


@pytest.mark.slow
@pytest.mark.torch
def test_train_step_grad_micro(bench_env):
    """--step grad (forward + backward only, bench/unet_step.py's measurement) in the harness."""
    (rec,) = _run(bench_env, "train-step", "--preset", "micro", "--step", "grad", "--repeats", "1",
                  "--warmup", "1")
    assert _is_stats(rec["jaxsd"]["step_s"]) and _is_stats(rec["torch"]["step_s"])
    j, t = rec["jaxsd"]["info"]["first_loss"], rec["torch"]["info"]["first_loss"]
    assert abs(j - t) <= 1e-4 * abs(t), (j, t)
