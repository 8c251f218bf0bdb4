"""Compiling the generation program before the UNet's and VAE's weights are read (`from_folder(weights=False)`,
what `jaxsd sample` does without LoRA files): the same program, the same image, bit for bit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsd.errors import InputError
from jaxsd.pipelines import generate as generate_module
from jaxsd.pipelines.pipeline import StableDiffusion

KW = {"negative_prompt": "blurry", "steps": 4, "sampler": "dpmpp_2m", "seed": 5, "guidance": 6.0, "num_images": 2}


def test_compiling_before_the_weights_gives_the_same_image(sd_folder, sd_pipe, monkeypatch):
    monkeypatch.setattr(generate_module, "_COMPILED", {})  # compiled from the loaded arrays
    reference = sd_pipe.generate("a red cube", **KW)
    assert sd_pipe.last_compile_seconds > 0

    monkeypatch.setattr(generate_module, "_COMPILED", {})  # compiled from shapes alone
    late = StableDiffusion.from_folder(sd_folder, weights=False)
    assert not late.pipe.weights_loaded
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((late.pipe.unet_params,
                                                                             late.pipe.vae_params)))
    with pytest.raises(InputError, match="weights are not loaded yet"):
        late.generate("a red cube", **KW)
    assert late.generate("a red cube", compile_only=True, **KW) is None
    assert late.last_compile_seconds > 0
    late.load_weights()
    assert late.pipe.weights_loaded
    images = late.generate("a red cube", **KW)
    assert late.last_compile_seconds == 0.0  # the program compiled from shapes ran
    np.testing.assert_array_equal(images, reference)
    for ours, loaded in zip(jax.tree.leaves(late.pipe.unet_params), jax.tree.leaves(sd_pipe.pipe.unet_params),
                            strict=True):
        assert ours.shape == loaded.shape and ours.dtype == loaded.dtype
