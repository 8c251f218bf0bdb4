"""Abstract parameter trees: shapes and logical axes without allocating a model."""

from __future__ import annotations

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def abstract_params(module: nn.Module, *example_inputs, **kwargs) -> tuple[dict, dict]:
    """Shapes and logical partitioning of `module`'s params, via `jax.eval_shape`.

    Returns (params, logical_specs): params is the unboxed tree of
    `jax.ShapeDtypeStruct`; logical_specs has the same structure with a
    `jax.sharding.PartitionSpec` of logical axis names per leaf.
    """
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs, **kwargs))["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(module: nn.Module, rng: jax.Array, *example_inputs, **kwargs) -> dict:
    """Randomly initialised, unboxed params (for from-scratch training)."""
    return nn.unbox(module.init(rng, *example_inputs, **kwargs)["params"])


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def fingerprint_params(params, samples: int = 256) -> str:
    """A stable fingerprint of a param tree: 16 hex digits of a sha256 over every param's path, shape and
    `samples` of its values at a fixed stride, rounded to bfloat16.

    Not a hash of every byte (a full SDXL UNet would take seconds): enough to tell one base model
    from another (a fine-tune changes every weight), and the same whether the params are held in
    fp32 or bf16 — a LoRA records its base UNet's fingerprint, and sampling warns on a different one.
    Works on sharded arrays (only the samples are fetched).
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(dict(params)).items()):
        x = jnp.ravel(jnp.asarray(leaf))
        picked = x[:: max(1, x.size // samples)][:samples].astype(jnp.bfloat16)
        digest.update("/".join(path).encode() + repr(tuple(leaf.shape)).encode())
        digest.update(np.asarray(jax.device_get(picked)).view(np.uint16).tobytes())
    return digest.hexdigest()[:16]
