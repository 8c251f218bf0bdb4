"""Training with the text encoded in the step, through the commands a user types, on a tiny SD1 pipeline
saved in the real format; its images cached once by `jaxsd cache` with `data.cache.text: tokens` (token ids).

* Frozen encoders: a run on the token cache equals a run on an embedding cache of the same data, loss for
  loss within 1e-5, conditioning dropout on (the two cache modes agree end to end); the text encoder is
  part of the frozen base, so a resume with another one is refused.
* `jaxsd train` with `lora.text_encoder=true` (one optimizer over the UNet's and the text encoder's
  adapters, both started from a kohya file (`lora.init_from`) and trained with `lora.dropout`, a sample
  grid at the last step) → `jaxsd export --lora` in both layouts and `--merge-lora` →
  diffusers' `load_lora_weights(FILE)` (and the merged folder) give the same text-encoder and UNet outputs
  as jaxsd with the checkpoint's adapters; the grid is what `jaxsd sample --lora FILE` makes, and not what
  the UNet's adapters alone make.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from jaxsd.cli import main
from jaxsd.config import CheckpointConfig, load_config
from jaxsd.train.checkpoint import Checkpointer
from tests.data.fakes import make_images
from tests.data.test_cache_text import _save_tiny_clip
from tests.helpers import jaxsd_command, rel_err
from tests.train.tiny_lora import random_lora_file
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEPS = 24  # the per-step loss is noisy (fresh noise and timesteps): compare 6-step means
UNET_LORA, TEXT_LORA = {"targets": "all_linear", "rank": 4, "alpha": 2}, {"rank": 4, "alpha": 2}
PROMPT = "caption 1"
SAMPLING = {"sample_steps": 2, "sample_guidance_scale": 7.5, "sample_sampler": "dpmpp_2m", "sample_seed": 0}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _yaml(base: Path, pipe: Path, images: Path, run: str, extra: str = "",
          logging: str = "every: 1, progress_bar: false, tensorboard: false") -> Path:
    path = base / f"{run}.yaml"
    path.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {base / run}, steps: {STEPS}, batch_size: 4, data_source: cache}}
checkpoint: {{every: {STEPS}, async_save: false}}
logging: {{{logging}}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: tokens, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
{extra}""")
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """The pipeline and its images cached with `jaxsd cache` (token ids; latents)."""
    base = tmp_path_factory.mktemp("text_training")
    pipe = tiny_pipeline(base / "pipe", text_sensitive=True)
    images = make_images(base / "images", 4)
    assert main(["cache", str(_yaml(base, pipe, images, "cache")), "--no-progress"]) == 0  # in-process: tests/train/tiny_run.py runs the command
    return base, pipe, images


@pytest.fixture(scope="module")
def frozen_runs(cached):
    """The same settings (frozen text encoder, cond_dropout 0.5) on the token cache and on an embedding cache
    of the same images (a copy of the root: a manifest holds one text cache; the latents are the same
    files), trained in this process. Only conv_out trains: the loss still sees the whole UNet conditioned
    on the text, and the backward pass, hence the compile, is short."""
    from jaxsd.train.loop import train

    base, pipe, images = cached
    shutil.copytree(images, base / "images_embeddings")
    settings = "optimizer: {learning_rate: 0.01}\nloss: {cond_dropout: 0.5}"  # + train.trainable below
    tokens = _yaml(base, pipe, images, "frozen_tokens", settings)
    embeddings = _yaml(base, pipe, base / "images_embeddings", "frozen_embeddings", settings)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["cache", str(embeddings), "data.cache.text=clip", "--only", "text", "--no-progress"]) == 0
    overrides = {tokens: [], embeddings: ["data.cache.text=clip"]}
    return {path: train(load_config(path, [*extra, "train.steps=6", "train.trainable=[conv_out]"])).losses
            for path, extra in overrides.items()}, tokens


def test_token_cache_run_equals_embedding_cache_run(frozen_runs):
    losses, _ = frozen_runs
    tok, emb = losses.values()
    assert len(tok) == len(emb) == 6
    np.testing.assert_allclose(tok, emb, rtol=1e-5, atol=0)


def test_a_resume_with_another_text_encoder_is_refused(cached, frozen_runs, tmp_path):
    from jaxsd.train.base import base_fingerprint
    from jaxsd.train.loop import train
    from jaxsd.train.resume import ResumeMismatch

    _, pipe, _ = cached
    other = tmp_path / "other"  # the same tokenizer (the cache still fits), another text encoder
    shutil.copytree(pipe, other, ignore=shutil.ignore_patterns("text_encoder"))
    _save_tiny_clip(other / "text_encoder", 1, 32, False)
    yaml = frozen_runs[1]
    with pytest.raises(ResumeMismatch, match="was trained on another base model"):
        train(load_config(yaml, ["train.steps=7", "train.trainable=[conv_out]", f"data.cache.text_encoder={other}"]))
    # the fingerprint covers the text encoders of runs that encode in the step only: embedding runs keep theirs
    tokens = load_config(yaml)
    embeddings = load_config(yaml, ["data.cache.text=clip"])
    assert base_fingerprint(tokens).startswith(base_fingerprint(embeddings) + "+text:")


@pytest.fixture(scope="module")
def run(cached):
    """`jaxsd train` with adapters on the UNet and the text encoder, then its exports."""
    base, pipe, images = cached
    sampling = ", ".join(f"{k}: {v}" for k, v in SAMPLING.items())
    start = random_lora_file(base / "start.safetensors", pipe, UNET_LORA, text=TEXT_LORA)  # kohya, lora_te_ keys
    yaml = _yaml(base, pipe, images, "run", f"""optimizer: {{learning_rate: 0.05}}
lora: {{rank: 4, alpha: 2, targets: all_linear, text_encoder: true, dropout: 0.1, init_from: {start}}}
loss: {{cond_dropout: 0.2}}""", logging=f'every: 1, progress_bar: false, sample_every: {STEPS}, '
                                f'sample_prompts: ["{PROMPT}"], {sampling}')
    before = _digest(pipe)
    train = jaxsd_command("train", yaml)
    jaxsd_command("export", base / "run", "--lora", "--out", base / "peft.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):  # the same command in this process: no second start-up
        assert main(["export", str(base / "run"), "--lora", "--format", "kohya", "--out",
                     str(base / "kohya.safetensors")]) == 0
        assert main(["export", str(base / "run"), "--merge-lora", "--out", str(base / "merged")]) == 0
    return base, pipe, base / "run", before, train.stderr


def test_text_encoder_adapters_train_with_the_unets_and_only_adapters_are_saved(run):
    _, pipe, run_dir, before, log = run
    assert "text encoders of" in log and "LoRA adapters on 12 of their layers" in log  # 2 layers × 6
    assert "LoRA adapters: from lora.init_from=" in log and "text_encoder: linear and 1x1 layers: rank 4" in log
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and np.mean(losses[-6:]) < 0.95 * np.mean(losses[:6]), losses
    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig())
    stored = ckpt.manager.item_metadata(STEPS)["state"]
    ups = ckpt.restore(STEPS, {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                                      stored["params"])}, partial=True)["params"]
    ckpt.close()
    assert "frozen" not in stored and set(stored["params"]) == {"unet", "text_encoder"}
    leaves = jax.tree_util.tree_flatten_with_path(stored["params"])[0]
    assert {str(p[-1].key) for p, _ in leaves} == {"down", "up"}
    te_ups = [v for p, v in jax.tree_util.tree_flatten_with_path(ups["text_encoder"])[0] if p[-1].key == "up"]
    assert len(te_ups) == 12 and all(np.abs(np.asarray(u)).max() > 0 for u in te_ups)  # fresh ups are 0
    nbytes = lambda tree: sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(tree))
    assert nbytes(stored["opt_state"]) == 2 * nbytes(stored["params"]) + 4  # one AdamW over all adapters
    assert _digest(pipe) == before  # the base (UNet and text encoder) is read, never written


def test_init_from_starts_the_unets_and_the_text_encoders_adapters_from_the_file(run):
    # lora.init_from with lora.text_encoder (and dropout, in the run above): both models' adapters are the file's
    from jaxsd.config import ShardingConfig
    from jaxsd.convert.lora import LoraModel, read_lora
    from jaxsd.errors import ConfigError
    from jaxsd.train.model import initial_params
    from jaxsd.train.plan import fresh_state, plan_state
    from jaxsd.train.sharding import make_mesh

    base, pipe = run[:2]

    def fresh(*overrides):
        cfg = load_config(base / "run.yaml", list(overrides))
        plan = plan_state(cfg, make_mesh(ShardingConfig(data=1), jax.devices()[:1]))
        params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings, dtype=plan.base_dtype)
        return plan, fresh_state(cfg, plan, params)

    plan, state = fresh()
    weights = read_lora(base / "start.safetensors", LoraModel("sd1", plan.module.config, plan.text.configs()))
    for component in ("unet", "text_encoder"):
        ours = traverse_util.flatten_dict(state.params[component])
        file = {m + (leaf,): getattr(layer, leaf) for m, layer in weights.layers[component].items()
                for leaf in ("down", "up")}
        assert ours.keys() == file.keys() and all(np.array_equal(ours[k], file[k]) for k in ours), component
    unet_only = random_lora_file(base / "unet_only.safetensors", pipe, UNET_LORA)
    with pytest.raises(ConfigError, match=r"text_encoder: adapted by this run, not in the file on 12 layers"):
        fresh(f"lora.init_from={unet_only}")


def _inputs(config) -> dict:
    """Fixed token ids and UNet inputs (NCHW latents; SDXL: with added conditioning) for `config`'s UNet."""
    rng = np.random.default_rng(0)
    added = None
    if config.addition_embed_type == "text_time":
        added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
                 "time_ids": rng.uniform(0, 64, (2, 6)).astype(np.float32)}
    return {"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "t": np.array([10, 700], np.float32),
            "ctx": rng.standard_normal((2, 5, config.context_dim)).astype(np.float32), "added": added}


def _jaxsd_outputs(run_dir, pipe, ids, inputs) -> dict:
    """Every text encoder's hidden states (and projected embeds) and the UNet output of the base with the
    checkpoint's adapters, unmerged."""
    from jaxsd.convert.text_encoders import load_clip
    from jaxsd.convert.unet import load_unet
    from jaxsd.models.clip import CLIPTextModel
    from jaxsd.models.unet import UNet2DConditionModel
    from jaxsd.train.export import load_trained_unet

    trained = load_trained_unet(run_dir)
    out = {}
    for name, plan in trained.text.plans.items():
        config, params = load_clip(pipe / name)
        te = CLIPTextModel(config).apply({"params": params, "lora": plan.variables(trained.text.adapters[name])},
                                         jnp.asarray(ids))
        out[f"{name}.last"], out[f"{name}.penultimate"] = te.last_hidden_state, te.hidden_states[-2]
        if te.text_embeds is not None:
            out[f"{name}.embeds"] = te.text_embeds
    config, params = load_unet(pipe / "unet")
    added = None if inputs["added"] is None else {k: jnp.asarray(v) for k, v in inputs["added"].items()}
    unet = UNet2DConditionModel(config).apply({"params": params, "lora": trained.adapter_plan.variables(
        trained.adapters)}, jnp.asarray(inputs["x"].transpose(0, 2, 3, 1)), inputs["t"], inputs["ctx"], added)
    out["unet"] = np.asarray(unet).transpose(0, 3, 1, 2)
    return out


def _diffusers_outputs(folder, ids, inputs, components, lora_file=None) -> dict:
    """The same outputs from diffusers' pipeline at `folder`, with `load_lora_weights(lora_file)`."""
    import diffusers
    import torch

    ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    if lora_file is not None:
        ref.load_lora_weights(lora_file)
    out = {}
    with torch.no_grad():
        for name in components:
            te = getattr(ref, name)(torch.from_numpy(np.asarray(ids)).long(), output_hidden_states=True)
            out[f"{name}.last"], out[f"{name}.penultimate"] = te.last_hidden_state, te.hidden_states[-2]
            if getattr(te, "text_embeds", None) is not None:
                out[f"{name}.embeds"] = te.text_embeds
        added = None if inputs["added"] is None else {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
        out["unet"] = ref.unet(*(torch.from_numpy(inputs[k]) for k in ("x", "t", "ctx")),
                               added_cond_kwargs=added).sample
    return {k: np.asarray(v) for k, v in out.items()}


def _check_against_diffusers(base, pipe, run_dir, exports) -> None:
    """jaxsd with the checkpoint's adapters = diffusers with each exported file (or merged folder), ≤1e-4."""
    from jaxsd.convert.unet import load_unet
    from jaxsd.text.tokenizers import load_tokenizer

    ids = load_tokenizer(pipe / "tokenizer")([PROMPT, "a photo of a cat"]).input_ids
    inputs = _inputs(load_unet(pipe / "unet")[0])
    ours = _jaxsd_outputs(run_dir, pipe, ids, inputs)
    components = sorted({k.split(".")[0] for k in ours} - {"unet"})
    plain = _diffusers_outputs(pipe, ids, inputs, components)
    assert min(rel_err(ours[k], plain[k]) for k in ours) > 1e-3  # the adapters learnt something, everywhere
    for export in exports:
        got = (_diffusers_outputs(export, ids, inputs, components) if export.is_dir() else
               _diffusers_outputs(pipe, ids, inputs, components, export))
        errors = {k: rel_err(ours[k], got[k]) for k in ours}
        assert max(errors.values()) <= 1e-4, (export, errors)


def _text_key_prefixes(path: Path) -> set[str]:
    from jaxsd.convert.safetensors_io import SafetensorsFile

    return {k.split(".")[0] if k.startswith("text_encoder") else k.split("_text_model")[0]
            for k in SafetensorsFile(path) if not k.startswith(("unet.", "lora_unet_"))}


def test_exported_files_name_the_text_encoder_layers(run):
    base = run[0]
    assert _text_key_prefixes(base / "peft.safetensors") == {"text_encoder"}
    assert _text_key_prefixes(base / "kohya.safetensors") == {"lora_te"}
    record = json.loads((base / "merged" / "jaxsd_export.json").read_text())
    assert record["merged_text_encoders"] == ["text_encoder"]
    assert not (base / "merged" / "text_encoder" / "model.safetensors").samefile(
        base / "pipe" / "text_encoder" / "model.safetensors")  # written merged, not linked from the base


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_exported_files_and_merged_folder_give_diffusers_the_trained_text_encoder(run):
    base, pipe, run_dir, _, _ = run
    _check_against_diffusers(base, pipe, run_dir, [base / "peft.safetensors", base / "kohya.safetensors",
                                                   base / "merged"])


@pytest.mark.slow  # a torch-built SDXL pipeline and a third training run
@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sdxl_adapters_on_both_text_encoders_load_in_diffusers(tmp_path):
    from tests.pipelines.tiny import build_sdxl

    pipe = build_sdxl(tmp_path / "pipe")
    yaml = _yaml(tmp_path, pipe, make_images(tmp_path / "images", 4), "run", """optimizer: {learning_rate: 0.05}
lora: {rank: 4, alpha: 8, targets: attn, text_encoder: true}""")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["cache", str(yaml), "--no-progress"]) == 0
        assert main(["train", str(yaml), "train.steps=6"]) == 0
        for layout in ("peft", "kohya"):
            assert main(["export", str(tmp_path / "run"), "--lora", "--format", layout, "--out",
                         str(tmp_path / f"{layout}.safetensors")]) == 0
        assert main(["export", str(tmp_path / "run"), "--merge-lora", "--out", str(tmp_path / "merged")]) == 0
    assert _text_key_prefixes(tmp_path / "peft.safetensors") == {"text_encoder", "text_encoder_2"}
    assert _text_key_prefixes(tmp_path / "kohya.safetensors") == {"lora_te1", "lora_te2"}
    _check_against_diffusers(tmp_path, pipe, tmp_path / "run", [tmp_path / "peft.safetensors",
                                                                tmp_path / "kohya.safetensors", tmp_path / "merged"])


def test_the_sample_grid_applies_the_text_encoder_adapters(run):
    """The training grid is what `jaxsd sample --lora peft.safetensors` makes (the pipeline tolerance), and
    the UNet's adapters alone make another image."""
    from jaxsd.convert.lora import LoraWeights, read_lora
    from jaxsd.pipelines.grids import label_grid
    from jaxsd.pipelines.lora import lora_model
    from jaxsd.pipelines.pipeline import StableDiffusion

    base, pipe, run_dir, _, _ = run
    sd = StableDiffusion.from_folder(pipe)
    weights = read_lora(base / "peft.safetensors", lora_model(sd.pipe))
    grid = np.asarray(Image.open(run_dir / "samples" / f"step_{STEPS:06d}.png")).astype(np.int16)

    def image_of(lora):
        sd.loras = [lora]
        sd.set_lora_scales([1.0])
        return sd.generate([PROMPT], steps=SAMPLING["sample_steps"], guidance=SAMPLING["sample_guidance_scale"],
                           sampler=SAMPLING["sample_sampler"], seed=SAMPLING["sample_seed"])[0]

    image = image_of(weights)
    diff = np.abs(grid - np.asarray(label_grid([(PROMPT, [image])], scale=256 // IMAGE_SIZE)).astype(np.int16))
    assert diff.mean() <= 0.3 and diff.max() <= 3, (diff.mean(), diff.max())
    unet_only = np.abs(image.astype(np.int16) - image_of(LoraWeights({"unet": weights.layers["unet"]})))
    assert unet_only.mean() > 2 * 0.3, unet_only.mean()  # twice the tolerance that calls images equal


@pytest.mark.slow  # an 8-device process compiling its own step
def test_text_encoders_and_their_adapters_shard_like_the_unet(run):
    """8 fake devices, mesh data 1 × fsdp 4 × tensor 2 (the text encoders sharded by the same rules as the
    UNet): the first 3 losses of the text-encoder LoRA run equal the 1-device run's within 1e-5."""
    from tests.helpers import run_python

    base, _, run_dir, _, _ = run
    out = run_python(f"""
        from jaxsd.config import load_config
        from jaxsd.train.loop import train
        cfg = load_config({str(base / 'run.yaml')!r}, ["train.steps=3", "train.run_dir={base / 'sharded'}",
                          "logging.sample_every=0", "sharding.data=1", "sharding.fsdp=4", "sharding.tensor=2"])
        print(train(cfg).losses)
    """)
    sharded = json.loads(out.strip().splitlines()[-1])
    straight = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:3]
    np.testing.assert_allclose(sharded, straight, rtol=1e-5, atol=0)
