"""Smoke runs of `jaxsd bench` suites on the `micro` UNet (host-overhead: `jaxsd train tiny` with a
one-level UNet): the code paths work end to end and each JSON record carries the fields issue #8
names. No timing is asserted (the numbers
of a loaded CI machine mean nothing); correctness checks are on things that cannot
vary: same weights → same first loss in both frameworks, byte counts from shapes.

The children share a persistent XLA compilation cache (JAXSD_BENCH_COMPILATION_CACHE),
so the micro train step compiles once for the whole module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import harness, report
from bench.suites import vae_step
from jaxsd import cli
from tests.helpers import jaxsd_command

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


def _command(out_dir, *argv) -> list[dict]:
    """As `_run`, through the `jaxsd` console script a user types."""
    path = out_dir / f"{argv[0]}-{len(list(out_dir.iterdir()))}.jsonl"
    jaxsd_command("bench", *argv, "--json", path)
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


@pytest.mark.slow
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


@pytest.mark.slow  # ~2 min: four generation children (jaxsd and diffusers, each with and without merging)
@pytest.mark.torch
def test_sample_tome_tiny(bench_env):
    """`jaxsd bench sample --tome`: jaxsd and diffusers with and without token merging in one record."""
    (rec,) = _command(bench_env, "sample", "--tome", "0.5", "--latent", "8", "--steps", "2", "--repeats", "1",
                      "--warmup", "0")
    assert rec["config"]["tome"] == 0.5 and rec["config"]["resolution"] == 32  # latent 8 × the tiny VAE's 4
    for fw in ("jaxsd", "jaxsd_tome", "torch", "torch_tome"):
        assert _is_stats(rec[fw]["step_s"]) and _is_stats(rec[fw]["peak_rss_gb"]), fw
    assert all(v is not None and v > 0 for v in rec["tome"].values()), rec["tome"]
    # the same merges on both sides (use_rand off): the same picture, and another one than without merging
    means = {fw: rec[fw]["info"]["image_mean"] for fw in ("jaxsd", "jaxsd_tome", "torch", "torch_tome")}
    assert abs(means["jaxsd_tome"] - means["torch_tome"]) < 0.01, means
    assert abs(means["jaxsd_tome"] - means["jaxsd"]) > 0.03, means


@pytest.mark.slow
@pytest.mark.torch
def test_train_step_grad_micro(bench_env):
    """--step grad (forward + backward only, bench/unet_step.py's measurement) in the harness."""
    (rec,) = _run(bench_env, "train-step", "--preset", "micro", "--step", "grad", "--repeats", "1",
                  "--warmup", "1")
    assert _is_stats(rec["jaxsd"]["step_s"]) and _is_stats(rec["torch"]["step_s"])
    j, t = rec["jaxsd"]["info"]["first_loss"], rec["torch"]["info"]["first_loss"]
    assert abs(j - t) <= 1e-4 * abs(t), (j, t)


# micro's attention: 4 transformer blocks (down, mid, 2 up) × attn1/attn2 × to_q/to_k/to_v/to_out.0,
# every one 32 -> 32 (cross_attention_dim 32): a rank-r adapter pair holds r·(32 + 32) values each
MICRO_LORA_VALUES_PER_RANK = 4 * 2 * 4 * (32 + 32)


@pytest.mark.slow
def test_train_step_lora_micro(bench_env):
    """`--lora` on jaxsd's side with a bf16 base: the measured step, then `--memory-only`, the same
    step compiled from shapes (a compilation-cache hit) for its memory analysis."""
    lora = ("train-step", "--preset", "micro", "--lora", "4", "--base-dtype", "bfloat16", "--frameworks", "jaxsd")
    (rec,) = _command(bench_env, *lora, "--repeats", "1", "--warmup", "0")
    assert rec["config"]["lora"] == 4 and rec["config"]["base_dtype"] == "bfloat16"
    j = rec["jaxsd"]
    assert all(_is_stats(j[k]) for k in ("step_s", "peak_rss_gb", "compile_s"))
    trained = j["info"]["num_trainable"]
    assert trained == 4 * MICRO_LORA_VALUES_PER_RANK
    assert 0.1 < j["info"]["first_loss"] < 10  # an epsilon-prediction MSE of a random UNet is O(1)
    # the step's arguments: the base in bf16 (2 bytes a value), the fp32 adapters and their two AdamW
    # moments (12 bytes), the batch (latents 8×8×4 and text 77×32, fp32) and a few scalars — nothing else
    base = j["info"]["num_params"] - trained
    extra = j["info"]["xla_memory"]["argument_gb"] * 1e9 - (2 * base + 12 * trained + 4 * (8 * 8 * 4 + 77 * 32))
    assert 0 <= extra <= 64, extra

    (mem,) = _command(bench_env, *lora, "--memory-only")
    assert mem["config"]["memory_only"] and "torch" not in mem
    m = mem["jaxsd"]
    # compiled from shapes, nothing allocated: the same program as the measured one
    assert m["info"]["num_params"] == j["info"]["num_params"] and m["info"]["num_trainable"] == trained
    for key, value in j["info"]["xla_memory"].items():
        assert m[key] == pytest.approx(value, rel=1e-9), key
    assert m["temp_gb"] > 0 and m["per_device_gb"] >= m["argument_gb"]
    assert "trained M" in report.render([rec, mem])


# tests/train/test_loop.py's one-level UNet: half the compile of the tiny preset's
ONE_LEVEL_UNET = ("model.unet.block_out_channels=[32]", "model.unet.down_block_types=[CrossAttnDownBlock2D]",
                  "model.unet.up_block_types=[CrossAttnUpBlock2D]")


@pytest.mark.slow
def test_host_overhead_through_the_cli(bench_env):
    """`jaxsd bench host-overhead`: real `jaxsd train` runs with train.steps_in_flight 0 and 1, and the same
    compiled step dispatched back to back in a child of its own."""
    sets = [a for s in ONE_LEVEL_UNET for a in ("--set", s)]
    recs = _command(bench_env, "host-overhead", *sets, "--steps", "6", "--skip-steps", "2", "--repeats", "1",
                    "--warmup", "0")
    by_n = {r["config"]["steps_in_flight"]: r["jaxsd"] for r in recs}
    assert set(by_n) == {0, 1} and all(r["config"]["overrides"] == list(ONE_LEVEL_UNET) for r in recs)
    device = by_n[0]["device_step_s"]
    for j in by_n.values():
        assert all(_is_stats(j[k]) for k in ("loop_step_s", "device_step_s", "host_overhead_s"))
        assert j["device_step_s"] == device and j["device_step_s"]["median"] > 0  # one device child per round
        assert j["host_overhead_s"]["median"] == pytest.approx(j["loop_step_s"]["median"] - device["median"])
        # the device child found every program it ran in the runs' compilation cache: the same step
        assert j["info"]["device_new_programs"] == 0
        assert j["info"]["same_losses"] and j["info"]["batch_size"] == 8
        assert len(j["info"]["load_avg_at_start"]) == 3
    assert "host-overhead" in report.render(recs)


def test_host_overhead_option_errors(capsys):
    for argv, message in ((("--set", "train.steps=5"), "the benchmark sets train.steps"),
                          (("--steps", "5", "--skip-steps", "5"), "--skip-steps 5 must be >= 0 and below --steps 5"),
                          (("--set", "train.stepz=5"), "did you mean 'train.steps'")):
        assert cli.main(["bench", "host-overhead", *argv, "--no-record"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_lora_option_errors(capsys):
    for argv, message in ((("--lora", "4", "--step", "simple"), "use --step train"),
                          (("--base-dtype", "bfloat16"), "add --lora RANK"),
                          (("--memory-only", "--frameworks", "torch"), "include jaxsd")):
        assert cli.main(["bench", "train-step", "--preset", "micro", *argv, "--no-record"]) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.slow  # ~50 s: the torch child imports diffusers + PEFT
@pytest.mark.torch
def test_train_step_lora_micro_vs_peft(bench_env):
    (rec,) = _run(bench_env, "train-step", "--preset", "micro", "--lora", "4", "--repeats", "1", "--warmup", "0")
    j, t = rec["jaxsd"]["info"], rec["torch"]["info"]
    # the same adapters on the same layers: PEFT's LoRA params = jaxsd's, over the same UNet
    assert j["num_trainable"] == t["num_trainable"] == 4 * MICRO_LORA_VALUES_PER_RANK
    assert j["num_params"] == t["num_params"]
    # adapters start with up/B = 0: both steps' first losses are the base UNet's (own noise draws)
    for loss in (j["first_loss"], t["first_loss"]):
        assert 0.1 < loss < 10, loss
    assert set(rec["ratio"]) >= {"step_s", "peak_rss_gb"}


@pytest.mark.slow
@pytest.mark.torch
def test_conv_grads(bench_env):
    """conv-grads times the three convolutions of each SD shape in both frameworks, and jaxsd's two
    lowerings; the suite itself refuses a run whose ops disagree (mean and mean square of every
    output, 1e-4 across frameworks; im2col vs XLA elementwise, 1e-5)."""
    recs = _command(bench_env, "conv-grads", "--repeats", "1", "--warmup", "0", "--conv", "xla,im2col,taps")
    assert [r["config"]["shape"] for r in recs][:2] == ["level0 resnet", "level0 downsample"]
    for r in recs:
        for op in ("forward", "input_grad", "kernel_grad"):
            assert _is_stats(r["jaxsd"][f"{op}_ms"]) and _is_stats(r["torch"][f"{op}_ms"])
            assert _is_stats(r["jaxsd_im2col"][f"{op}_ms"]) and _is_stats(r["jaxsd_taps"][f"{op}_ms"])
            assert r["ratio"][f"{op}_ms"] > 0 and r["vs_xla"][f"{op}_ms"] > 0


def test_conv_grads_judges_lowerings_that_differ_by_the_float64_result():
    """Lowerings more than 1e-5 apart pass when none is further from the float64 result than 1e-5 or the
    first lowering is (XLA's own kernel gradient of a 256² image is 1.1e-5 off), and stop the run otherwise."""
    from bench.harness import BenchError
    from bench.suites.conv_grads import _check_against_exact

    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((1, 6, 6, 3), (3, 3, 3, 2), (1, 6, 6, 2)))
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    exact = np.stack([xp[:, i:i + 6, j:j + 6].reshape(-1, 3).T @ dy.reshape(-1, 2)
                      for i in range(3) for j in range(3)]).reshape(w.shape)
    off = lambda rel: exact + rel * np.abs(exact).max()
    _check_against_exact("t", "kernel_grad", {"xla": off(3e-5), "taps": off(1e-6)}, [x, w, dy], 1)
    with pytest.raises(BenchError, match="relative error vs float64"):
        _check_against_exact("t", "kernel_grad", {"xla": off(1e-6), "taps": off(3e-5)}, [x, w, dy], 1)


@pytest.mark.slow
@pytest.mark.torch
def test_eval_tiny(bench_env):
    """`jaxsd bench eval`: the full InceptionV3 on both sides (its compile is most of the ~1 min)."""
    (rec,) = _command(bench_env, "eval", "--repeats", "1", "--warmup", "0", "--batch", "1")
    for fw in ("jaxsd", "torch"):
        for what in ("fid", "clip"):
            assert _is_stats(rec[fw][f"{what}_images_per_s"]) and _is_stats(rec[fw][f"{what}_step_s"])
    assert _is_stats(rec["jaxsd"]["fid_compile_s"]) and rec["ratio"]["fid_images_per_s"] > 0
    # same weights and inputs: the two sides compute the same features and scores
    for key, tol in (("fid_features_avg", 1e-4), ("clip_cos_avg", 1e-3)):
        j, t = rec["jaxsd"]["info"][key], rec["torch"]["info"][key]
        assert abs(j - t) <= tol * max(abs(t), 1.0), (key, j, t)


@pytest.mark.slow  # ~60 s: compiles the micro step with a VAE decoder and VGG16 forward + backward
def test_train_step_perceptual_micro(bench_env):
    """`--perceptual`: jaxsd's step with loss.perceptual's LPIPS term; its arguments hold the frozen VGG16
    (14.7M values up to relu5_3) and the LPIPS heads beside the UNet state. torch has no counterpart."""
    args = ("train-step", "--preset", "micro", "--perceptual", "--frameworks", "jaxsd")
    (rec,) = _command(bench_env, *args, "--repeats", "1", "--warmup", "0")
    assert rec["config"]["perceptual"] == "lpips" and "torch" not in rec
    j = rec["jaxsd"]
    assert all(_is_stats(j[k]) for k in ("step_s", "compile_s"))
    vgg_and_heads = 14_714_688 + 1472
    assert j["info"]["xla_memory"]["argument_gb"] * 1e9 > 4 * vgg_and_heads


def test_train_step_perceptual_refuses_torch(capsys):
    assert cli.main(["bench", "train-step", "--preset", "micro", "--perceptual", "--frameworks", "jaxsd,torch",
                     "--no-record"]) == 2
    assert "--perceptual measures jaxsd train's step with loss.perceptual" in capsys.readouterr().err


@pytest.mark.slow  # ~80 s on a loaded machine: three children; jaxsd compiles VGG16's forward + backward, torch imports
@pytest.mark.torch  # diffusers and lpips
def test_vae_step_tiny(bench_env):
    """`jaxsd bench vae-step`: jaxsd train's VAE step vs the PyTorch one, from the same weights, batch and noise."""
    (rec,) = _command(bench_env, "vae-step", "--preset", "tiny", "--repeats", "1", "--warmup", "0")
    assert rec["suite"] == "vae-step" and rec["config"]["preset"] == "tiny" and rec["config"]["disc_start"] == 0
    for fw, figures in (("jaxsd", ("step_s", "peak_rss_gb", "compile_s")), ("torch", ("step_s", "peak_rss_gb"))):
        for fig in figures:
            assert _is_stats(rec[fw][fig]), (fw, fig, rec[fw].get(fig))
    assert rec["ratio"]["step_s"] > 0 and rec["ratio"]["peak_rss_gb"] > 0
    j, t = rec["jaxsd"]["info"], rec["torch"]["info"]
    # the same models: autoencoder + discriminator + LPIPS (VGG16 up to relu5_3 and its heads)
    assert j["num_params"] == t["num_params"] and j["num_trainable"] == t["num_trainable"]
    assert j["num_params"] - j["num_trainable"] == 14_714_688 + 1472
    # the discriminator is on in the first step, and both first steps agree figure by figure
    jm, tm = j["first_metrics"], t["first_metrics"]
    assert jm["disc_factor"] == 1.0 and jm["d_loss"] > 0 and jm["adaptive_weight"] > 0 and jm["lpips"] > 0
    for key in (*vae_step.AGREE, *vae_step.GRADIENT_FIGURES):
        assert abs(jm[key] - tm[key]) <= 1e-4 * abs(tm[key]), (key, jm[key], tm[key])
    assert set(rec["agreement"]) == {*vae_step.AGREE, *vae_step.GRADIENT_FIGURES}
    assert report.render([rec]).startswith("### vae-step")


def test_vae_step_refuses_first_steps_that_disagree():
    same = dict.fromkeys(vae_step.AGREE, 0.5)
    vae_step.check_agreement(same, dict(same))
    with pytest.raises(harness.BenchError, match="lpips"):
        vae_step.check_agreement({**same, "lpips": 0.5001}, same)


def test_vae_step_option_errors():
    proc = jaxsd_command("bench", "vae-step", "--batch", "0", "--no-record", check=False)
    assert proc.returncode == 2 and "--batch 0: must be ≥ 1" in proc.stderr, proc.stderr
