"""LoRA / LoCon training through the commands a user types, on a tiny pipeline saved in the real format.

`jaxsd cache` → `jaxsd train` with `lora.rank` / `lora.conv_rank`, dropout on the adapter input and
the adapters started from a kohya file (`lora.init_from`, alpha ≠ rank) → the checkpoint holds only
the adapters and their optimizer state (the base is reloaded and fingerprinted) → `jaxsd export --lora`
in both layouts loads in diffusers (`load_lora_weights`) with the same UNet output as jaxsd's
unmerged adapters, and `--merge-lora` writes that same UNet as a folder. Step 0 of an `init_from` run
is the UNet `jaxsd sample --lora FILE` applies; a file that does not fit is one error naming what
differs. A run `kill -9`ed and resumed equals the straight run bit for bit (slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxsd.cli import main
from jaxsd.config import CheckpointConfig
from jaxsd.train.checkpoint import Checkpointer
from tests.data.fakes import make_images
from tests.helpers import JAXSD, jaxsd_command, jaxsd_env, kill_9_once_logged, rel_err
from tests.train.tiny_lora import random_lora_file
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEPS = 40  # the per-step loss is noisy (fresh noise and timesteps): compare 8-step means
LORA = {"rank": 4, "alpha": 2, "targets": "all_linear", "conv_rank": 2, "conv_alpha": 4}


def _start_file(path: Path, pipe: Path, *, linear_only: bool = False, text: bool = False) -> Path:
    """A kohya LoRA file with random down/up for LORA's layers of the tiny UNet (what lora.init_from continues):
    rank 4 alpha 2 on the linear layers, rank 2 alpha 4 on the LoCon convs. linear_only: without the convs;
    text: with adapters on the text encoder too (PEFT layout)."""
    return random_lora_file(path, pipe, LORA, text={"rank": 4, "alpha": 2} if text else None,
                            layout="peft" if text else "kohya", skip_convs=linear_only)


def _yaml(base: Path, pipe: Path, images: Path, run: str, steps: int) -> Path:
    path = base / f"{run}.yaml"
    path.write_text(f"""
model: {{pretrained: {pipe}}}
optimizer: {{learning_rate: 0.05}}
lora: {{rank: 4, alpha: 2, targets: all_linear, conv_rank: 2, conv_alpha: 4, dropout: 0.1,
        init_from: {base / 'start.safetensors'}}}
train: {{run_dir: {base / run}, steps: {steps}, batch_size: 4, data_source: cache, compilation_cache: {base / 'xla'}}}
checkpoint: {{every: 20, async_save: false}}
logging: {{every: 1, progress_bar: false}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: clip, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
""")
    return path


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora_train")
    pipe = tiny_pipeline(base / "pipe")
    images = make_images(base / "images", 4)
    _start_file(base / "start.safetensors", pipe)
    yaml = _yaml(base, pipe, images, "run", STEPS)
    assert main(["cache", str(yaml), "--no-progress"]) == 0  # in-process: tests/train/tiny_run.py runs the command
    jaxsd_command("train", yaml, env={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    return base, pipe, images, base / "run"


def test_only_the_adapters_train_and_are_checkpointed(run):
    run_dir = run[3]
    losses = _losses(run_dir)
    assert len(losses) == STEPS and np.mean(losses[-8:]) < 0.95 * np.mean(losses[:8]), losses
    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig())
    stored = ckpt.manager.item_metadata(STEPS)["state"]
    ckpt.close()
    assert "frozen" not in stored  # the base UNet is reloaded from model.pretrained, fingerprinted
    adapters = jax.tree_util.tree_flatten_with_path(stored["params"])[0]
    assert adapters and {str(p[-1].key) for p, _ in adapters} == {"down", "up"}
    nbytes = lambda tree: sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(tree))
    # AdamW: two moments per adapter value, and a step count — nothing for the base
    assert nbytes(stored["opt_state"]) == 2 * nbytes(stored["params"]) + 4


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_exported_files_load_in_diffusers_and_merge_lora_is_the_same_unet(run):
    import diffusers
    import torch

    from jaxsd.convert.lora import lora_variables, read_lora
    from jaxsd.convert.unet import load_unet
    from jaxsd.models.unet import UNet2DConditionModel
    from jaxsd.pipelines.loading import load_pipeline
    from jaxsd.pipelines.lora import lora_model

    base, pipe, _, run_dir = run
    for layout in ("peft", "kohya"):
        jaxsd_command("export", run_dir, "--lora", "--format", layout, "--out", base / f"{layout}.safetensors")
    jaxsd_command("export", run_dir, "--merge-lora", "--out", base / "merged")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t, ctx = np.array([10, 700]), rng.standard_normal((2, 5, 32)).astype(np.float32)
    config, params = load_unet(pipe / "unet")
    unet = UNet2DConditionModel(config)
    model = lora_model(load_pipeline(pipe))

    def ours(lora=None):
        variables = {"params": params} if lora is None else {"params": params, "lora": lora}
        return np.asarray(unet.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx)).transpose(0, 3, 1, 2)

    def theirs(folder, lora_file=None):
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        if lora_file is not None:
            ref.load_lora_weights(lora_file)
        with torch.no_grad():
            return ref.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()

    trained = ours(lora_variables(read_lora(base / "peft.safetensors", model), 1.0)["unet"])
    assert rel_err(ours(), trained) > 1e-3  # the adapters learnt something
    for layout in ("peft", "kohya"):
        assert rel_err(trained, ours(lora_variables(read_lora(base / f"{layout}.safetensors", model), 1.0)["unet"])) == 0
        assert rel_err(trained, theirs(pipe, base / f"{layout}.safetensors")) <= 1e-4, layout
    assert rel_err(trained, theirs(base / "merged")) <= 1e-4  # base + adapters at scale 1, merged


def _fresh_start(run, *overrides: str):
    """The run's config (with `overrides`) planned on one device, and its fresh train state."""
    from jaxsd.config import ShardingConfig, load_config
    from jaxsd.train.model import initial_params
    from jaxsd.train.plan import fresh_state, plan_state
    from jaxsd.train.sharding import make_mesh

    base, pipe, images, _ = run
    cfg = load_config(_yaml(base, pipe, images, "inproc", STEPS), list(overrides))
    plan = plan_state(cfg, make_mesh(ShardingConfig(data=1), jax.devices()[:1]))
    params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings, dtype=plan.base_dtype)
    return plan, fresh_state(cfg, plan, params)


def test_init_from_step_0_is_the_unet_jaxsd_sample_lora_applies(run):
    # the file has alpha 2 ≠ rank 4 (scale 0.5) and LoCon alpha 4 ≠ rank 2: the run continues that function
    from jaxsd.pipelines.loading import load_pipeline
    from jaxsd.pipelines.lora import apply_loras, read_loras

    base, pipe = run[:2]
    plan, state = _fresh_start(run)
    sample = load_pipeline(pipe)  # what `jaxsd sample --model PIPE --lora FILE` runs, at scale 1.0
    sample_lora = apply_loras(sample, read_loras(sample, [base / "start.safetensors"]), [1.0])
    ours, theirs = traverse_util.flatten_dict(state.params), traverse_util.flatten_dict(sample_lora)
    # the file's (random, nonzero) down/up on all 31 layers, as sampling reads them
    assert len(ours) == 2 * 31 and all(np.array_equal(v, theirs[p]) for p, v in ours.items())
    rng = np.random.default_rng(0)
    x, t = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.asarray([10, 700])
    ctx = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    unet = jax.jit(plan.module.apply)
    assert np.array_equal(unet(plan.variables(state.params, state.frozen), x, t, ctx),
                          unet({"params": sample.unet_params, "lora": sample_lora}, x, t, ctx))


def test_init_from_that_does_not_fit_is_one_error_naming_what_differs(run):
    from jaxsd.errors import ConfigError

    base, pipe = run[:2]
    linear_only = _start_file(base / "linear.safetensors", pipe, linear_only=True)
    text = _start_file(base / "text.safetensors", pipe, text=True)
    cases = [  # (overrides of the run's config, what the one error says)
        ("lora.dropout=1", r"lora.dropout = 1.0 must be in \[0, 1\)"),
        (f"lora.init_from={base / 'nothing.safetensors'}", r"lora.init_from=.*nothing.safetensors: no such file"),
        ("lora.rank=8", (r"rank differs on 19 layers: .*resnets.0.time_emb_proj \(file 4, run 8\)(.|\n)*the file "
                         r"has linear and 1x1 layers: rank 4, alpha 2 .* LoCon convs: rank 2, alpha 4")),
        ("lora.conv_alpha=1", r"alpha differs on \d+ layers: .*conv1 \(file 4, run 1\)"),
        ("lora.targets=[time_emb_proj$]", r"in the file, not adapted by this run on 14 layers: mid_block.attentions"),
        (f"lora.init_from={linear_only}", r"adapted by this run, not in the file on \d+ layers: .*resnets.0.conv1"),
        (f"lora.init_from={text}", (r"holds text-encoder adapters: text_encoder \(24 tensors, e.g. text_encoder\."
                                    r"text_model.encoder.layers.0.mlp.fc1.lora_A.weight\).*text_encoder=false")),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            _fresh_start(run, override)


def _exported(run_dir: Path, out: Path) -> dict[str, np.ndarray]:
    from jaxsd.convert.safetensors_io import SafetensorsFile

    jaxsd_command("export", run_dir, "--lora", "--out", out)
    f = SafetensorsFile(out)
    return {k: np.array(f[k]) for k in f}


@pytest.mark.slow  # a killed run and its resume, two more processes
def test_kill_9_and_resume_equals_the_straight_run(run):
    # killed from outside after step 12 (checkpoints every 5), resumed: dropout masks, noise and the
    # data order continue exactly; lora.init_from is not read again (the checkpoint's adapters win)
    base, pipe, images, run_dir = run
    yaml = _yaml(base, pipe, images, "killed", STEPS)
    args = ["train", yaml, "checkpoint.every=5"]
    kill_9_once_logged([JAXSD, *args], base / "killed" / "metrics.jsonl", 12, jaxsd_env())
    jaxsd_command(*args)
    assert _losses(base / "killed") == _losses(run_dir)
    log = (base / "killed" / "train.log").read_text()
    assert re.search(r"resumed from checkpoint step (5|10) .*lora.init_from=.* not read", log), log[-2000:]
    straight, killed = _exported(run_dir, base / "straight.safetensors"), _exported(base / "killed", base / "k.safetensors")
    assert straight.keys() == killed.keys() and all(np.array_equal(straight[k], killed[k]) for k in straight)
