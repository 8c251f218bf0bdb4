"""Train-state checkpoints in <run_dir>/checkpoints (orbax CheckpointManager).

A checkpoint holds two items: "state" (the sharded TrainState: params, frozen,
optimizer state, EMA, step, rng) and "meta" (JSON: the resolved config YAML, the
data iterator's position, the step). Saves are asynchronous (training continues
while the arrays are written); orbax commits a step only once it is complete, so
a process killed mid-save leaves no half-written checkpoint behind as "latest".

Reading is in two parts so a resume can look before it restores: `metas()` walks the
steps newest first and yields each one's meta; `restore(step, abstract)` then reads
the state — or, with `partial=True`, only the subtrees `abstract` names (what
`jaxsd export` and `train.resume=params_only` need; the optimizer state is never read).

The directory may be local or gs:// (an epath.Path, see `jaxsd.train.run_dir`); every process
writes its own shards of the state, process 0 the rest.

A checkpoint that fails to read (files missing or corrupt) is reported with a warning
naming it and the error, moved aside to <run_dir>/checkpoints.damaged/<step> (process 0),
and the previous one is tried; reaching that step again writes a fresh checkpoint. If
checkpoints exist but none restores, that is an error — never a silent fresh start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxsd.config import CheckpointConfig
from jaxsd.errors import InputError
from jaxsd.train.run_dir import move_tree, run_path

log = logging.getLogger("jaxsd.train")

# What a damaged checkpoint raises from orbax/tensorstore: missing files (FileNotFoundError/OSError),
# unreadable or truncated data and metadata (ValueError, incl. JSON errors), missing keys (KeyError).
RESTORE_ERRORS = (OSError, ValueError, KeyError)


class DamagedCheckpoints(InputError):
    """The run directory has checkpoints, and none of them reads."""


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    # PyTree (not Standard) handlers: they also read tree metadata and partial trees
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
        registry.add("state", args, ocp.PyTreeCheckpointHandler())
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add("meta", args, ocp.handlers.JsonCheckpointHandler())
    return registry


class Checkpointer:
    """Save / restore the train state of one run directory."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = run_path(directory, "checkpoint directory")
        self.cfg = cfg
        self.damaged: list[str] = []  # "<path>: <error type>" of the checkpoints set aside
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handlers())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start an (async) save of `state` at `step`; `meta` must be JSON-serialisable."""
        if step in self.manager.all_steps():
            return  # already saved (e.g. a trigger-file save on a periodic step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        log.info("checkpoint: saving step %d to %s", step, self.directory)

    def restore_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta of one step (config YAML, data position, step)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any, *, partial: bool = False) -> Any:
        """The state of one step. abstract_state: ShapeDtypeStruct tree with shardings; with
        partial=True a nested dict naming only the subtrees to read (e.g. {"params": ..., "frozen": ...})."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args, partial_restore=partial)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def metas(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(step, meta) newest first; a step whose meta does not read is set aside as damaged."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
            except RESTORE_ERRORS as e:
                self.set_aside(step, e)
                continue
            yield step, meta

    def set_aside(self, step: int, error: Exception) -> None:
        """Report a damaged checkpoint and move it out of the way (so the step can be saved again)."""
        where = self.directory / str(step)
        aside = self.directory.parent / (self.directory.name + ".damaged") / str(step)
        log.warning("checkpoint %s is incomplete or corrupt (%s: %s); moved to %s, falling back to the previous one",
                    where, type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", aside)
        self.damaged.append(f"{where}: {type(error).__name__}")
        if jax.process_index() == 0 and where.exists():
            if aside.exists():
                aside.rmtree()
            move_tree(where, aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxsd set aside checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
