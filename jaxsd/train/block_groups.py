"""Where 8-bit AdamW keeps its quantised moments: params packed into a few flat block buffers.

Each quantised param is flattened and cut into whole blocks of `block_size` values (its
last block zero-padded), as `jaxsd.train.adamw8bit.quantize` lays it out. Consecutive
params (in tree order) share one buffer of such rows — a *group* of up to
`GROUP_VALUES` values — so the update is one loop over uniformly shaped
[CHUNK_ROWS, block_size] chunks per group (plus one chunk of the rows left over).

Why: XLA compiles every loop and every fused elementwise program of its own. One
update per param (SDXL: ~1000 quantised params, ~230 of them large enough to need a
chunk loop of their own) compiled for minutes; one loop per group compiles the
8-bit arithmetic a handful of times. The gradients are copied into their group's
buffer (in place, each as soon as it exists) and the update is read back out of it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Rows (blocks) per loop iteration: the fp32 temporaries of one chunk, not of a whole param
# or group, are alive at once (as one elementwise pass XLA:CPU kept every param's fp32 moments
# alive: SD1.5 10.5 GB of temporaries).
CHUNK_ROWS = 64
# Values per group: bounds the staging buffer a group's gradients are copied into (fp32:
# 1 GB), while SDXL's 2.6 G values still make only ~10 loops.
GROUP_VALUES = 1 << 28


@dataclasses.dataclass(frozen=True)
class Slot:
    """One param's place in its group: leaf index (in the params' flattening order), first row,
    rows (= ceil(size / block_size)), its shape."""

    leaf: int
    row: int
    rows: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Group:
    """Consecutive quantised params sharing one [rows, block_size] buffer (rows: the sum of their slots')."""

    slots: tuple[Slot, ...]
    rows: int


def plan_groups(shapes: list[tuple[int, ...]], quantised: list[bool], block_size: int,
                group_values: int | None = None) -> list[Group]:
    """The groups of the params whose `quantised` flag is set (shapes in flattening order)."""
    limit = max(GROUP_VALUES if group_values is None else group_values, 1)
    groups, slots, row = [], [], 0

    def close():
        nonlocal slots, row
        if slots:
            groups.append(Group(tuple(slots), row))
        slots, row = [], 0

    for leaf, (shape, q) in enumerate(zip(shapes, quantised, strict=True)):
        if not q:
            continue
        rows = -(-math.prod(shape) // block_size)
        if slots and (row + rows) * block_size > limit:
            close()
        slots.append(Slot(leaf, row, rows, tuple(shape)))
        row += rows
    close()
    return groups


def gather(group: Group, leaves: list[jax.Array], block_size: int) -> jax.Array:
    """fp32 [group.rows, block_size]: each slot's leaf (flattened, zero-padded) in its rows, zeros elsewhere.

    Written slot by slot into one buffer (dynamic-update-slices XLA does in place), so a gradient
    can be freed as soon as it is copied instead of waiting for a concatenation of all of them."""
    out = jnp.zeros((group.rows, block_size), jnp.float32)
    for s in group.slots:
        flat = leaves[s.leaf].reshape(-1).astype(jnp.float32)
        blocks = jnp.pad(flat, (0, s.rows * block_size - s.size)).reshape(s.rows, block_size)
        out = jax.lax.dynamic_update_slice_in_dim(out, blocks, s.row, 0)
    return out


def scatter(group: Group, blocks: jax.Array) -> dict[int, jax.Array]:
    """{leaf index: its values read back from a [group.rows, block_size] buffer, in its own shape}."""
    return {s.leaf: blocks[s.row:s.row + s.rows].reshape(-1)[:s.size].reshape(s.shape) for s in group.slots}


def find_slot(groups: list[Group], leaf: int) -> tuple[int, Slot]:
    """(group index, slot) of leaf index `leaf`; KeyError when that param is not quantised."""
    for i, g in enumerate(groups):
        for s in g.slots:
            if s.leaf == leaf:
                return i, s
    raise KeyError(leaf)
