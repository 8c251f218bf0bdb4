"""LoRA / LoCon training through the commands a user types, on a tiny pipeline saved in the real format.

`jaxsd cache` → `jaxsd train` with `lora.rank` / `lora.conv_rank` → the checkpoint holds only the
adapters and their optimizer state (the base is reloaded and fingerprinted) → `jaxsd export --lora`
in both layouts loads in diffusers (`load_lora_weights`) with the same UNet output as jaxsd's
unmerged adapters, and `--merge-lora` writes that same UNet as a folder. A run stopped at step 20
and resumed equals a straight run bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import CheckpointConfig
from jaxsd.train.checkpoint import Checkpointer
from tests.data.fakes import make_images
from tests.helpers import jaxsd_command, rel_err
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEPS = 40  # the per-step loss is noisy (fresh noise and timesteps): compare 8-step means
LORA = "lora: {rank: 4, alpha: 2, targets: all_linear, conv_rank: 2, conv_alpha: 4}"


def _yaml(base: Path, pipe: Path, images: Path, run: str, steps: int) -> Path:
    path = base / f"{run}.yaml"
    path.write_text(f"""
model: {{pretrained: {pipe}}}
optimizer: {{learning_rate: 0.05}}
{LORA}
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
    yaml = _yaml(base, pipe, images, "run", STEPS)
    jaxsd_command("cache", yaml, "--no-progress")
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


@pytest.mark.slow  # two more runs; resume itself is proven in the default run by test_loop / test_buckets_cli
def test_stopped_and_resumed_equals_straight(run):
    # stopping at step 20 and resuming reloads the frozen base and the adapters' state exactly
    base, pipe, images, run_dir = run
    short = _yaml(base, pipe, images, "resumed", 20)
    jaxsd_command("train", short)
    jaxsd_command("train", short, f"train.steps={STEPS}")
    assert _losses(base / "resumed") == _losses(run_dir)
