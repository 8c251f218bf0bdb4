"""Read chosen parts of a run's checkpoints, never the rest (orbax partial restore).

`jaxsd export` needs the trained params (or their EMA) and the frozen params of one step — not
the optimizer state, which is 2-3x the params (SDXL with AdamW: ~31 GB fp32), nor the step
counters. `CheckpointReader.restore_fields` asks orbax for exactly those top-level fields of the
saved `TrainState`: orbax's `partial_restore=True` trims its metadata tree to the requested
fields, so the other arrays are never opened; a checkpoint whose optimizer entries are gone
still restores them.

Arrays come back as host numpy arrays (no device memory, whatever the run's mesh was).
The manager is read-only: reading a run that is still training never writes, deletes or
cleans up anything in its checkpoint directory.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsd.train.run_dir import run_path


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


class CheckpointReader:
    """Read-only access to `<run_dir>/checkpoints` as `jaxsd.train.checkpoint.Checkpointer` writes it."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = run_path(directory, "checkpoint directory")  # local or gs:// (an epath.Path)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        absl = logging.getLogger("absl")
        absl.addFilter(_not_read_only_notice)  # orbax warns that read_only is read-only: that is the point
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        finally:
            absl.removeFilter(_not_read_only_notice)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def meta(self, step: int) -> dict[str, Any]:
        """The step's "meta" item (JSON: step, data position, resolved config YAML)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_fields(self, step: int, fields: dict[str, Any]) -> dict[str, Any]:
        """{name: pytree of numpy arrays} for the named top-level `TrainState` fields of `step`.

        fields: {name: pytree of ShapeDtypeStruct} — e.g. {"params": abstract.params, "frozen": ...};
        the shapes must be the saved ones, the dtypes are those returned. An empty subtree (nothing
        frozen) is returned as {} without asking orbax for it (it stored no array for it).
        """
        wanted = {k: v for k, v in fields.items() if jax.tree.leaves(v)}
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), wanted)
        state = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=state))["state"]
        got = jax.tree.map(np.shape, restored, is_leaf=lambda x: isinstance(x, np.ndarray))
        if got != jax.tree.map(lambda s: tuple(s.shape), wanted):
            raise ValueError(f"{self.directory / str(step)}: the stored {', '.join(wanted)} do not have the "
                             "shapes of the run's config (was the checkpoint written by another config?)")
        return {k: restored[k] if k in wanted else {} for k in fields}

    def close(self) -> None:
        self.manager.close()
