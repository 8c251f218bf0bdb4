"""Tiny pipelines saved once per session, their diffusers twins, and one jaxsd pipeline each."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest


@pytest.fixture(scope="session")
def torch_single_thread():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    # This machine is shared: torch's default thread pool makes the tiny reference 40x slower.
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory, torch_single_thread):
    from tests.pipelines.tiny import build_sd
    return build_sd(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory, torch_single_thread):
    from tests.pipelines.tiny import build_sdxl
    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="session")
def sd_reference(sd_folder):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder).to("cpu")
    pipe.folder_scheduler_config = dict(pipe.scheduler.config)  # tests swap pipe.scheduler; keep the original
    return pipe


@pytest.fixture(scope="session")
def sd_pipe(sd_folder):
    from jaxsd.pipelines.pipeline import StableDiffusion
    return StableDiffusion.from_folder(sd_folder)


def diffusers_scheduler(pipe, name: str):
    """The diffusers scheduler our sampler `name` reproduces, configured from `pipe`'s scheduler config."""
    import diffusers

    from jaxsd.diffusion.samplers import DIFFUSERS_EQUIVALENT
    cls_name, overrides = DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def to_uint8(images_01: np.ndarray) -> np.ndarray:
    """diffusers output_type="np" images ([0, 1] float) → the uint8 its PIL output would hold."""
    return (np.asarray(images_01) * 255).round().astype(np.uint8)


def assert_images_close(ours: np.ndarray, ref: np.ndarray, *, mean: float = 0.3, worst: int = 3) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.uint8 == ref.dtype, (ours.shape, ref.shape)
    d = np.abs(ours.astype(np.int32) - ref.astype(np.int32))
    assert d.mean() <= mean and d.max() <= worst, f"mean |diff| {d.mean():.3f} (≤ {mean}), max {d.max()} (≤ {worst})"


def assert_images_differ(ours: np.ndarray, ref: np.ndarray) -> None:
    """The sensitivity check: a deliberately wrong setting must fail the parity tolerance by far."""
    d = np.abs(ours.astype(np.int32) - ref.astype(np.int32))
    assert d.mean() > 1.0 and d.max() > 10, f"a wrong setting changed the images only by mean {d.mean():.3f}"


@contextlib.contextmanager
def lora_loaded(pipe, *paths, weights=None):
    """A diffusers pipeline with LoRA files loaded (`load_lora_weights`, as adapters l0, l1, ... at
    `weights`), unloaded again afterwards so session pipelines stay clean."""
    for i, path in enumerate(paths):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    if weights is not None:
        pipe.set_adapters([f"l{i}" for i in range(len(paths))], adapter_weights=list(weights))
    try:
        yield pipe
    finally:
        pipe.unload_lora_weights()
