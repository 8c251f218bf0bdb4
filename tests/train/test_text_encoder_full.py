"""`train.text_encoder: full` through the commands a user types: a tiny SD1 pipeline (saved in the real format)
whose images `jaxsd cache` stores as token ids; `jaxsd train` fine-tunes the UNet and the CLIP text encoder
together (the encoder at its own train.text_encoder_lr), `jaxsd export` writes both.

* the encoder changed, and the exported text_encoder/ loads in transformers' CLIPTextModel with the outputs
  of jaxsd's encoder with the checkpoint's params (≤1e-4); the exported UNet is the checkpoint's;
* a resume from the middle checkpoint ends bit for bit where the straight run ends;
* the config errors: full with lora.text_encoder, full without a token cache.
"""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import load_config
from jaxsd.errors import ConfigError
from tests.data.fakes import make_images
from tests.helpers import jaxsd_command, rel_err
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

STEPS = 4
PROMPTS = ["caption 1", "a photo of a cat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The straight run (checkpoints at 2 and 4) and its export."""
    base = tmp_path_factory.mktemp("text_encoder_full")
    pipe = tiny_pipeline(base / "pipe", text_sensitive=True)
    images = make_images(base / "images", 4)
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {base / 'run'}, steps: {STEPS}, batch_size: 4, data_source: cache, text_encoder: full,
         text_encoder_lr: 0.02}}
optimizer: {{learning_rate: 0.001}}
checkpoint: {{every: 2, async_save: false}}
logging: {{every: 1, progress_bar: false, tensorboard: false}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: tokens, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
""")
    jaxsd_command("cache", yaml, "--no-progress")
    jaxsd_command("train", yaml)
    jaxsd_command("export", base / "run", "--out", base / "export")
    return base, pipe, yaml


def _encode(params, config, ids) -> np.ndarray:
    from jaxsd.models.clip import CLIPTextModel

    return np.asarray(CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids)).last_hidden_state)


@pytest.mark.torch
def test_the_trained_text_encoder_is_exported_and_loads_in_transformers(run):
    import torch
    import transformers

    from jaxsd.convert.text_encoders import load_clip
    from jaxsd.convert.unet import load_unet
    from jaxsd.text.tokenizers import load_tokenizer
    from jaxsd.train.export import load_trained_unet

    base, pipe, _ = run
    trained = load_trained_unet(base / "run")
    config, base_params = load_clip(pipe / "text_encoder")
    ids = np.asarray(load_tokenizer(pipe / "tokenizer")(PROMPTS).input_ids)
    ours = _encode(trained.text.params["text_encoder"], config, ids)
    assert rel_err(ours, _encode(base_params, config, ids)) > 1e-3  # the encoder trained
    ref = transformers.CLIPTextModel.from_pretrained(base / "export" / "text_encoder")
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_err(ours, theirs) <= 1e-4
    _, unet = load_unet(base / "export" / "unet")  # and the UNet beside it is the checkpoint's
    np.testing.assert_array_equal(unet["conv_out"]["kernel"], trained.params["conv_out"]["kernel"])


@pytest.mark.slow  # a third `jaxsd train`
def test_a_resume_ends_where_the_straight_run_ends(run):
    import jax

    from jaxsd.train.export import load_trained_unet

    base, _, yaml = run
    resumed = base / "resumed"
    shutil.copytree(base / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    jaxsd_command("train", yaml, f"train.run_dir={resumed}")
    a, b = (load_trained_unet(d, step=STEPS) for d in (base / "run", resumed))
    assert set(a.text.params) == {"text_encoder"}
    for x, y in zip(jax.tree.leaves((a.params, a.text.params)), jax.tree.leaves((b.params, b.text.params)),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_full_and_lora_text_encoder_contradict(run):
    _, _, yaml = run
    with pytest.raises(ConfigError, match="contradicts train.text_encoder=full"):
        load_config(yaml, ["lora.text_encoder=true"])
    with pytest.raises(ConfigError, match="data.cache.text: tokens"):
        load_config(yaml, ["data.cache.text=clip"])
    legacy = load_config(yaml, ["train.text_encoder=null", "train.text_encoder_lr=null", "lora.text_encoder=true",
                                "lora.rank=2"])
    assert legacy.train.text_encoder == "lora"  # lora.text_encoder: true is train.text_encoder: lora


@pytest.mark.slow  # a third command on the run
def test_the_single_file_export_holds_the_trained_text_encoder(run):
    import jax

    from jaxsd.convert.single_file.to_folder import model_folder
    from jaxsd.convert.text_encoders import load_clip
    from jaxsd.train.export import load_trained_unet

    base, _, _ = run
    out = base / "model.safetensors"
    jaxsd_command("export", base / "run", "--single-file", "--out", out)
    _, written = load_clip(model_folder(out) / "text_encoder")
    trained = load_trained_unet(base / "run").text.params["text_encoder"]
    for x, y in zip(jax.tree.leaves(written), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(x, y)
