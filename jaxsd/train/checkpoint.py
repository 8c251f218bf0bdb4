"""Train-state checkpoints in <run_dir>/checkpoints (orbax CheckpointManager).

A checkpoint holds two items: "state" (the sharded TrainState: params, frozen,
optimizer state, EMA, step, rng) and "meta" (JSON: the resolved config YAML, the
data iterator's position, the step). Saves are asynchronous (training continues
while the arrays are written); orbax commits a step only once it is complete, so
a process killed mid-save leaves no half-written checkpoint behind as "latest".

Restore walks the steps newest first. A checkpoint that fails to restore (files
missing or corrupt) is reported with a warning naming it and the error, and the
previous one is tried; if none restores, that is an error — never a silent fresh
start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxsd.config import CheckpointConfig

log = logging.getLogger("jaxsd.train")

# What a damaged checkpoint raises from orbax/tensorstore: missing files (FileNotFoundError/OSError),
# unreadable or truncated data and metadata (ValueError, incl. JSON errors), missing keys (KeyError).
RESTORE_ERRORS = (OSError, ValueError, KeyError)


class Checkpointer:
    """Save / restore the train state of one run directory."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start an (async) save of `state` at `step`; `meta` must be JSON-serialisable."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        log.info("checkpoint: saving step %d to %s", step, self.directory)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of one step. abstract_state: ShapeDtypeStruct tree with shardings."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any], int] | None:
        """The newest checkpoint that restores, falling back past damaged ones with a warning.

        None when the directory has no checkpoint at all; RuntimeError when there are some but
        none restores.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                state, meta = self.restore(step, abstract_state)
            except RESTORE_ERRORS as e:
                where = self.directory / str(step)
                log.warning("checkpoint %s is incomplete or corrupt (%s: %s); falling back to the previous one",
                            where, type(e).__name__, str(e).splitlines()[0][:300])
                failures.append(f"{where}: {type(e).__name__}")
                continue
            return state, meta, step
        if failures:
            raise RuntimeError("no checkpoint in the run directory restores: " + "; ".join(failures) +
                               ". Delete them (or the run dir) to start fresh deliberately.")
        return None

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
