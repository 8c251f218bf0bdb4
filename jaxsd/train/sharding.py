"""Device mesh, param/optimizer/batch shardings, multi-host start-up.

Mesh axes are ("data", "fsdp", "tensor"). Params carry logical axis names (see
jaxsd/models/layers.py); `sharding.rules` maps each logical name to mesh axes.
For one param, a mesh axis is used at most once (first dimension wins), and a
dimension whose size is not divisible by its mesh axes' size stays replicated —
small layers (a 4-channel conv_out) are not worth padding. When the rules leave the
fsdp axis unused for a param, its largest dimension divisible by the fsdp size is
sharded over fsdp, so FSDP reaches every param that can be split.

Optimizer-state leaves that mirror a param (Adam's mu/nu, EMA) are sharded like
it; any other leaf (8-bit blocks, Adafactor's factored moments) is sharded over
fsdp along its largest divisible dimension, or replicated when small.

Batches are sharded along their first dimension over ("data", "fsdp"); each
process builds its global jax.Array from only its local rows
(`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import ShardingConfig
from jaxsd.errors import ConfigError

log = logging.getLogger("jaxsd.train")
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(cfg: ShardingConfig) -> bool:
    """`jax.distributed.initialize` when configured ("on", or a coordinator address) or detected.

    Detection ("auto"): an explicit coordinator address, or the environment variables of a GKE TPU
    pod, SLURM or Open MPI. A TPU VM pod may lack them (JAX reads its metadata server instead):
    there, use "on" (launch/tpu_pod.sh does).
    Must run before any other JAX call touches the backend. Returns whether it initialised.
    """
    if cfg.distributed == "off":
        return False
    detected = any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                                              "JAX_COORDINATOR_ADDRESS"))
    if cfg.distributed == "on" or cfg.coordinator_address or detected:
        kwargs = {k: v for k, v in (("coordinator_address", cfg.coordinator_address),
                                    ("num_processes", cfg.num_processes), ("process_id", cfg.process_id))
                  if v is not None}
        jax.distributed.initialize(**kwargs)
        log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False


def mesh_shape(cfg: ShardingConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one −1 filled by the remaining devices; product must equal num_devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"sharding: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"sharding: {num_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(f"sharding: mesh data×fsdp×tensor = {sizes} needs {int(np.prod(sizes))} devices, "
                          f"there are {num_devices}; use -1 for one axis to fill")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: ShardingConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _rule(rules: dict[str, Any], name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ConfigError(f"sharding.rules has no entry for logical axis {name!r}; rules: {sorted(rules)}")
    target = rules[name]
    if target is None:
        return ()
    axes = (target,) if isinstance(target, str) else tuple(target)
    for a in axes:
        if a not in AXES:
            raise ConfigError(f"sharding.rules[{name!r}] = {target!r}: mesh axis {a!r} is not one of {AXES}")
    return axes


def spec_for(shape: tuple[int, ...], logical: P, mesh: Mesh, rules: dict[str, Any]) -> P:
    """Mesh PartitionSpec of one param from its logical spec (see module docstring for the rules)."""
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = tuple(a for a in _rule(rules, name) if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and dim % size == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    n = mesh.shape["fsdp"]
    if n > 1 and "fsdp" not in used:
        # FSDP must reach every big param: when the rules leave fsdp unused (a conv_in of 4 channels),
        # shard the largest free dimension divisible by it.
        free = [d for d in range(len(shape)) if out[d] is None and shape[d] % n == 0]
        if free:
            out[max(free, key=lambda d: shape[d])] = "fsdp"
    return P(*out)


def param_shardings(shapes: Any, logical_specs: Any, mesh: Mesh, rules: dict[str, Any]) -> Any:
    """NamedSharding tree for a params tree (shapes: arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda s, spec: NamedSharding(mesh, spec_for(s.shape, spec, mesh, rules)),
                        shapes, logical_specs, is_leaf=lambda x: isinstance(x, P))


def _largest_divisible(shape: tuple[int, ...], n: int) -> P:
    if n > 1:
        for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[d] % n == 0 and shape[d] >= n:
                return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return P()


def state_shardings(tree_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer-state-like tree: leaves whose key path ends with a param's path and
    whose shape equals that param's take its sharding; others go over fsdp (largest divisible dim)."""
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[tuple(str(k) for k in path)] = sh

    def one(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in range(len(keys), 0, -1):
            sh = by_path.get(keys[-n:])
            if sh is not None and _fits(sh, leaf.shape):
                return sh
        return NamedSharding(mesh, _largest_divisible(tuple(leaf.shape), mesh.shape["fsdp"]))

    return jax.tree_util.tree_map_with_path(one, tree_shapes)


def train_state_shardings(abstract_state: Any, trainable: Any, frozen: Any, mesh: Mesh) -> Any:
    """Sharding tree of a TrainState (jaxsd/train/step.py): params/EMA as the params, optimizer state by
    `state_shardings`, scalars replicated."""
    rep = NamedSharding(mesh, P())
    return abstract_state.replace(step=rep, params=trainable, frozen=frozen,
                                  opt_state=state_shardings(abstract_state.opt_state, trainable, mesh),
                                  ema=None if abstract_state.ema is None else trainable, rng=rep, nonfinite=rep)


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else axes
        if dim % int(np.prod([sharding.mesh.shape[a] for a in names])):
            return False
    return True


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """For a [k, b, ...] stack of accumulation micro-batches: b over the batch axes."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the batch → global jax.Arrays sharded over ("data", "fsdp")."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def describe_shardings(shardings: Any, shapes: Any) -> list[str]:
    """One line per param: path, shape, mesh spec (for the run log)."""
    lines = []
    for (path, sh), s in zip(jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree.leaves(shapes)):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        lines.append(f"{name} {tuple(s.shape)} {sh.spec}")
    return lines
