"""Data-parallel generation: one generation batch split over several devices (`StableDiffusion.generate(devices=...)`).

The images are split over a 1-D mesh ("data" axis) of the devices: every device runs the
single-device generation program (`make_generate`) on its own m = N/d images, params replicated,
no communication between devices. The per-image inputs are placed with a NamedSharding over
"data"; the inputs that hold [uncond; cond] rows (context, SDXL's added conditioning) are
reordered so each device's block is its own images' [uncond; cond], the layout the program expects.
The batch is padded to a multiple of the device count by repeating its last image (the padding
is dropped from the outputs), so any N works.

Why shard_map and not a sharded jit: the program concatenates [x; x] and splits [uncond; cond]
along the batch axis, which a batch-sharded jit would turn into cross-device traffic; with
shard_map each device's program is the single-device one, so an image does not depend on how
many devices ran its batch (given the same noise, a deterministic sampler, and the same per-device
batch: XLA may vectorize another batch size differently; see docs/dreambooth.md).
Stochastic samplers draw per-step noise from the one run key in every device's program, so there an
image depends on its position within its device's block.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsd.host_memory import release_freed_host_memory
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.models.vae import AutoencoderKL, VAEConfig
from jaxsd.pipelines.generate import GenerateSpec, make_generate, signature

AXIS = "data"
PER_IMAGE = ("noise", "image", "mask")  # [N, ...] inputs
PAIRED = ("context", "added")  # [2N, ...] inputs: [uncond; cond] rows


def padded_size(n: int, devices: int) -> int:
    """n rounded up to a multiple of the device count."""
    return math.ceil(n / devices) * devices


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """x [k, ...] padded to [n, ...] by repeating its last row."""
    return x if x.shape[0] == n else np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)])


def _device_blocks(x: np.ndarray, n: int, devices: int) -> np.ndarray:
    """[uncond; cond] rows [2k, ...] → padded to n images and reordered: d blocks of (uncond_j; cond_j), [2n, ...]."""
    uncond, cond = np.split(x, 2, axis=0)
    both = np.stack([_pad_rows(uncond, n), _pad_rows(cond, n)])  # [2, n, ...]
    both = both.reshape((2, devices, n // devices) + x.shape[1:]).swapaxes(0, 1)  # [d, 2, m, ...]
    return both.reshape((2 * n,) + x.shape[1:])


def split_inputs(inputs: dict, devices: int) -> tuple[dict, int]:
    """(inputs in the data-parallel layout, images before padding). inputs: `make_generate`'s, N images.
    The per-image ones are rearranged on the host (numpy: no small programs to compile)."""
    n_images = inputs["noise"].shape[0]
    n = padded_size(n_images, devices)
    out = dict(inputs)
    for name in PER_IMAGE:
        if name in out:
            out[name] = _pad_rows(np.asarray(out[name]), n)
    for name in PAIRED:
        if out.get(name) is not None:
            out[name] = jax.tree.map(lambda x: _device_blocks(np.asarray(x), n, devices), out[name])
    return out, n_images


def _specs(inputs: dict) -> dict:
    """PartitionSpec per top-level input: the batch axis over "data" for per-image inputs, else replicated."""
    return {k: PartitionSpec(AXIS) if k in PER_IMAGE + PAIRED else PartitionSpec() for k in inputs}


def generation_mesh(devices: Sequence[jax.Device]) -> Mesh:
    return Mesh(np.asarray(list(devices)), (AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of `tree` on every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def place_inputs(inputs: dict, mesh: Mesh, placed: dict | None = None) -> dict:
    """Put the (data-parallel layout) inputs on the mesh: per-image rows sharded, the rest replicated.
    placed: inputs already on the mesh (e.g. the replicated params of an earlier call), used as they are."""
    specs, placed = _specs(inputs), placed or {}
    return {k: placed[k] if k in placed else v if v is None else jax.device_put(v, NamedSharding(mesh, specs[k]))
            for k, v in inputs.items()}


_COMPILED: dict[tuple, Any] = {}


def compiled_data_parallel(unet: UNet2DConditionModel, vae: AutoencoderKL, vae_config: VAEConfig, spec: GenerateSpec,
                           inputs: dict, mesh: Mesh) -> tuple[Callable, float]:
    """(compiled data-parallel generate over `mesh` for these placed inputs, seconds compiling — 0 when cached).

    inputs: as `place_inputs` returns. The result: {"latents" [n,h,w,C], "images" uint8 [n,H,W,3]}
    (n padded), sharded over "data" in image order.
    """
    key = (unet.config, unet.dtype, unet.attention_impl, unet.token_merging, vae_config, spec, signature(inputs),
           tuple(mesh.devices.flat))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    # check_vma off: the loop's progress debug.callback and the replicated key are per-device by design
    program = jax.shard_map(make_generate(unet, vae, vae_config, spec), mesh=mesh, in_specs=(_specs(inputs),),
                            out_specs=PartitionSpec(AXIS), check_vma=False)
    compiled = jax.jit(program).lower(inputs).compile()
    release_freed_host_memory()
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - t0
