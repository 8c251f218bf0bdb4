"""VAE training where the user meets it: `jaxsd train` with `model.kind: vae` (configs/vae_tiny.yaml) on a
folder of PNGs, then `jaxsd export RUN --out DIR`, each a `jaxsd` command in its own process.

Default run: one tiny autoencoder from scratch, 12 steps, the discriminator from step 6 on: the
reconstruction loss falls, the discriminator's loss is 0 before its start and moves after it, the
reconstruction grid is written, the export is an AutoencoderKL folder diffusers decodes as jaxsd does, and
two steps with every conv's kernel gradient as tap matmuls (`JAXSD_CONV=taps`) give the same figures.
Slow: a decoder-only fine-tune of that export leaves its encoder bitwise as it was; a run killed with
`kill -9` and resumed is bitwise the straight run; the same run on 2 devices (params, optimizer states and
batch sharded over fsdp) computes the first step as one device does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxsd.convert.safetensors_io import SafetensorsFile
from jaxsd.train.logging import read_images, read_scalars
from tests.helpers import JAXSD, jaxsd_command, jaxsd_env, kill_9_once_logged, rel_err

STEPS, DISC_START = 12, 6
WEIGHTS = "diffusion_pytorch_model.safetensors"
# vae_tiny with one block and a one-layer discriminator: fewer ops, a faster compile
SMALL = ["model.vae.block_out_channels=[16]", "model.vae.down_block_types=[DownEncoderBlock2D]",
         "model.vae.up_block_types=[UpDecoderBlock2D]", "loss.vae.disc_layers=1"]


def make_pngs(folder: Path, n: int = 8) -> Path:
    """n images of flat colour with a rectangle each, 40×48 and 48×40 (cropped to 32×32 by the loader); no captions."""
    folder.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        a = np.zeros((40, 48, 3) if i % 2 else (48, 40, 3), np.uint8)
        a[:] = rng.integers(0, 256, 3)
        a[8:30, 4 + i:24 + i] = rng.integers(0, 256, 3)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def train_args(run_dir: Path, images: Path, *extra: str) -> list[str]:
    return ["train", "vae_tiny", f"data.roots=[{images}]", f"train.run_dir={run_dir}", f"train.steps={STEPS}",
            "train.batch_size=4", f"loss.vae.disc_start={DISC_START}", "logging.every=1", "logging.progress_bar=false",
            "checkpoint.every=4", "checkpoint.keep=5", "train.ema.enabled=true", *SMALL, *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("vae_cli")
    images = make_pngs(base / "images")
    run_dir = base / "run"
    jaxsd_command(*train_args(run_dir, images, f"logging.sample_every={STEPS}"))
    jaxsd_command("export", run_dir, "--out", base / "vae", "--ema")
    return base, images, run_dir


def test_reconstruction_improves_and_the_discriminator_starts_at_disc_start(run):
    _, _, run_dir = run
    steps = records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert np.mean([r["rec"] for r in steps[-3:]]) < 0.8 * np.mean([r["rec"] for r in steps[:3]])
    before, after = steps[:DISC_START], steps[DISC_START:]
    assert all(r["d_loss"] == 0 and r["disc_factor"] == 0 and r["disc_grad_norm"] == 0 for r in before)
    assert all(r["d_loss"] > 0 and r["disc_factor"] == 1 and r["disc_grad_norm"] > 0 for r in after)
    assert len({r["d_loss"] for r in after}) == len(after)  # it moves, step by step
    assert all(r["adaptive_weight"] > 0 and np.isfinite(r["psnr"]) for r in steps)
    scalars = read_scalars(run_dir / "tensorboard")
    for name in ("rec", "kl", "lpips", "g_loss", "d_loss", "adaptive_weight", "psnr"):
        assert len(scalars[f"train/{name}"]) == STEPS, name
    grid = Image.open(run_dir / "samples" / f"step_{STEPS:06d}.png")
    assert grid.width > grid.height  # a row of inputs over a row of their reconstructions
    assert [s for s, _ in read_images(run_dir / "tensorboard")["samples/ema"]] == [STEPS]


def test_taps_convolutions_train_the_same_steps(run):
    """`JAXSD_CONV=taps` (every k×k conv's kernel gradient as tap matmuls; `auto` keeps this tiny VAE on XLA):
    the first two steps' figures — the second made after an update from every kernel gradient — equal the
    default run's within the whole-model tolerance."""
    base, images, run_dir = run
    taps_dir = base / "taps"
    jaxsd_command(*train_args(taps_dir, images, "train.steps=2"), env={"JAXSD_CONV": "taps"})
    for ours, ref in zip(records(taps_dir), records(run_dir)[:2], strict=True):
        for key in ("loss", "rec", "kl", "adaptive_weight", "grad_norm"):
            assert rel_err(ours[key], ref[key]) <= 1e-4, (ours["step"], key)


def test_the_log_counts_the_discriminator_on_both_sides_of_trainable(run):
    """train.log's "trainable: X of Y (autoencoder a of b, discriminator d)": everything trains here, so
    X = Y; b is the exported autoencoder's size and the discriminator is in both X and Y."""
    base, _, run_dir = run
    line = next(x for x in (run_dir / "train.log").read_text().splitlines() if "trainable: " in x)
    counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) params", line.split("trainable: ")[1])]
    assert len(counts) == 5, line
    trained, total, ae_trained, ae_total, disc = counts
    exported = sum(int(x.size) for x in SafetensorsFile(base / "vae" / WEIGHTS).values())
    assert ae_total == exported and disc > 0, line
    assert trained == total == ae_total + disc and ae_trained == ae_total, line


@pytest.mark.torch
def test_export_loads_in_diffusers_and_decodes_as_jaxsd(run):
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from jaxsd.convert.vae import load_vae
    from jaxsd.models.vae import AutoencoderKL

    folder = run[0] / "vae"
    record = json.loads((folder / "jaxsd_export.json").read_text())
    assert record["step"] == STEPS and record["ema"]
    config, params = load_vae(folder)
    z = np.random.default_rng(0).normal(size=(2, 8, 8, config.latent_channels)).astype(np.float32)
    ours = np.asarray(AutoencoderKL(config).apply({"params": params}, z, method="decode"))
    with torch.no_grad():
        theirs = TorchVAE.from_pretrained(folder).eval().decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
    assert rel_err(ours, theirs.numpy().transpose(0, 2, 3, 1)) < 1e-4


def test_export_refuses_the_unet_only_flags(run):
    base, _, run_dir = run
    proc = jaxsd_command("export", run_dir, "--out", base / "no", "--lora", check=False)
    assert proc.returncode == 2 and "trained a VAE" in proc.stderr and "--lora" in proc.stderr
    assert not (base / "no").exists()


@pytest.mark.slow
def test_decoder_only_fine_tune_keeps_the_encoder_bitwise(run):
    base, images, _ = run
    run_dir = base / "decoder_only"
    jaxsd_command(*train_args(run_dir, images, f"model.pretrained={base / 'vae'}", "loss.vae.train_encoder=false",
                              "train.steps=4"))
    jaxsd_command("export", run_dir, "--out", base / "decoder_only_vae")
    before, after = SafetensorsFile(base / "vae" / WEIGHTS), SafetensorsFile(base / "decoder_only_vae" / WEIGHTS)
    assert set(before) == set(after)
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)
    assert all(not np.array_equal(before[k], after[k]) for k in before if k.startswith("decoder.conv_out."))


@pytest.mark.slow
def test_kill_9_and_resume_is_bitwise_the_straight_run(run):
    base, images, straight = run
    run_dir = base / "killed"
    args = train_args(run_dir, images, f"logging.sample_every={STEPS}")
    kill_9_once_logged([JAXSD, *args], run_dir / "metrics.jsonl", 7, jaxsd_env())
    jaxsd_command(*args)
    ours, theirs = records(run_dir), records(straight)
    drop = ("step_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ours] == \
        [{k: v for k, v in r.items() if k not in drop} for r in theirs]
    jaxsd_command("export", run_dir, "--out", base / "killed_vae", "--ema")
    a, b = SafetensorsFile(base / "vae" / WEIGHTS), SafetensorsFile(base / "killed_vae" / WEIGHTS)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_devices_fsdp_compute_the_first_step_as_one(run):
    base, images, _ = run
    runs = {}
    for devices in (1, 2):
        run_dir = base / f"devices_{devices}"
        jaxsd_command(*train_args(run_dir, images, "train.steps=2", "loss.vae.disc_start=0", "sharding.data=1",
                                  f"sharding.fsdp={devices}"), devices=devices)
        runs[devices] = records(run_dir)[0]
    for key in ("loss", "rec", "kl", "g_loss", "d_loss", "adaptive_weight", "psnr", "grad_norm", "disc_grad_norm"):
        np.testing.assert_allclose(runs[2][key], runs[1][key], rtol=1e-4, err_msg=key)
