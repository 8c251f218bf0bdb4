"""The hybrid's text projection trains with the UNet on a cache of raw T5 states (`data.cache.text: t5`), through
the commands a user types: the tiny SD + T5 hybrid (tests/train/tiny_pipeline.py) saved in the real format,
its images cached by `jaxsd cache`, `jaxsd train` with conditioning dropout, `jaxsd export`.

The projection changed; the export's text_projection/ is the checkpoint's, and as a torch `nn.Linear` it
projects T5 states as jaxsd's projection with the trained params does (≤1e-4); the export's UNet is the
checkpoint's too.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxsd.cli import main
from tests.data.fakes import make_images
from tests.helpers import jaxsd_command, rel_err
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_hybrid_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("projection_training")
    pipe = tiny_hybrid_pipeline(base / "pipe")
    images = make_images(base / "images", 4)
    yaml = base / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {base / 'run'}, steps: {STEPS}, batch_size: 4, data_source: cache}}
optimizer: {{learning_rate: 0.01}}
loss: {{cond_dropout: 0.5}}
checkpoint: {{every: {STEPS}, async_save: false}}
logging: {{every: 1, progress_bar: false, tensorboard: false}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: t5, dtype: float32, batch_size: 4, max_length: 16}}
  loader: {{batch_size: 4, threads: 1, prefetch: 1}}
""")
    assert main(["cache", str(yaml), "--no-progress"]) == 0  # in-process: tests/train/tiny_run.py runs the command
    jaxsd_command("train", yaml)
    assert main(["export", str(base / "run"), "--out", str(base / "export")]) == 0  # in-process (test_export.py runs the command)
    return base, pipe


@pytest.mark.torch
def test_the_projection_trains_and_is_exported(run):
    import jax
    import jax.numpy as jnp
    import torch
    from safetensors.numpy import load_file

    from jaxsd.convert.text_encoders import load_text_projection
    from jaxsd.convert.unet import load_unet
    from jaxsd.models.text_projection import TextProjection
    from jaxsd.train.export import load_trained_unet

    base, pipe = run
    trained = load_trained_unet(base / "run")
    ours = trained.text.params["text_projection"]
    config, initial = load_text_projection(pipe / "text_projection")
    assert rel_err(ours["linear"]["kernel"], initial["linear"]["kernel"]) > 1e-3  # it trained
    _, exported = load_text_projection(base / "export" / "text_projection")
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(ours), strict=True):
        np.testing.assert_array_equal(x, y)
    state = load_file(str(base / "export" / "text_projection" / "diffusion_pytorch_model.safetensors"))
    linear = torch.nn.Linear(config.in_features, config.out_features, bias=config.bias)
    linear.load_state_dict({k.removeprefix("linear."): torch.from_numpy(v) for k, v in state.items()})
    x = np.random.default_rng(0).standard_normal((2, 5, config.in_features)).astype(np.float32)
    with torch.no_grad():
        theirs = linear(torch.from_numpy(x)).numpy()
    assert rel_err(np.asarray(TextProjection(config).apply({"params": ours}, jnp.asarray(x))), theirs) <= 1e-4
    _, unet = load_unet(base / "export" / "unet")
    np.testing.assert_array_equal(unet["conv_out"]["kernel"], trained.params["conv_out"]["kernel"])
