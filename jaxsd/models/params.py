"""Abstract parameter trees: shapes and logical axes without allocating a model."""

from __future__ import annotations

import flax.linen as nn
import jax


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
