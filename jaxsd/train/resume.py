"""Resume: the newest checkpoint that restores, checked against the run's config before any array is read.

    resumed = resume(cfg, plan, ckpt, mesh)   # None: no checkpoint, start from model.pretrained / scratch

The checkpoint's own config (its meta["config"]) is compared with the run's and the keys that
changed are named, old → new:

* changes that keep the train state's structure (learning rate, schedule, steps, logging,
  sampling, data roots with the same cache spec, ...) resume with a warning listing them;
* changes that alter it (optimizer, train.trainable / train.frozen, EMA on/off, model
  shape or param dtype) stop with one `ResumeMismatch` naming the keys — unless
  `train.resume: params_only`, which takes the params from the checkpoint and starts the
  optimizer state (and EMA) fresh, logged.

A checkpoint does not hold the frozen params (`jaxsd.train.base`): they are loaded again from the
run's base, whose fingerprint must equal the one the checkpoint recorded.
Whether a change alters the structure is not guessed from key names: the checkpoint's config
is planned (`plan_state`, abstract shapes only) and its state tree compared with this run's.
A checkpoint whose files do not read is damaged, not "changed": `Checkpointer.metas` and the
fallback below set it aside and try the previous one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from omegaconf import OmegaConf

from jaxsd.config import Config, from_yaml_text, to_yaml
from jaxsd.errors import InputError
from jaxsd.train.base import base_fingerprint, checkpointed, from_checkpoint, load_frozen
from jaxsd.train.checkpoint import RESTORE_ERRORS, Checkpointer, DamagedCheckpoints
from jaxsd.train.model import initial_params
from jaxsd.train.plan import StatePlan, fresh_state, plan_state
from jaxsd.train.trainable import flatten, merge_params, split_params

log = logging.getLogger("jaxsd.train")


# The layout of the train state as this version writes it, recorded in each checkpoint's meta.
# 2 (2026-12-07): 8-bit AdamW's moments packed into block buffers (train/block_groups.py); before,
# one set per param. A change of layout that the config cannot show bumps this.
STATE_FORMAT = 2


class ResumeMismatch(InputError):
    """The run directory's checkpoint was made by a config whose train state differs from this one's."""


@dataclasses.dataclass
class Resumed:
    state: Any
    step: int
    meta: dict[str, Any]
    changes: dict[str, tuple[Any, Any]]  # config key -> (checkpoint's value, this run's value)
    how: str  # for the log: "resumed from checkpoint step N in DIR" (+ "params only ...")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old_yaml: str, new_yaml: str) -> dict[str, tuple[Any, Any]]:
    """Dotted config keys whose values differ: key -> (old, new); a key only one side has is "<absent>"."""
    old = _flat(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = _flat(OmegaConf.to_container(OmegaConf.create(new_yaml)))
    return {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(old.keys() | new.keys())
            if old.get(k, "<absent>") != new.get(k, "<absent>")}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changes.items())


def _layout(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], str]]]:
    return jax.tree.structure(tree), [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree)]


def same_structure(a: Any, b: Any) -> bool:
    """Whether two abstract train states have the same tree, shapes and dtypes."""
    return _layout(a) == _layout(b)


def _old_plan(meta: dict[str, Any], step: int, mesh) -> StatePlan:
    try:
        return plan_state(from_yaml_text(meta["config"]), mesh)
    except Exception as e:  # a config this version cannot plan cannot be compared either
        raise ResumeMismatch(f"checkpoint step {step}: its config cannot be read by this version of jaxsd "
                             f"({type(e).__name__}: {e}); start a new train.run_dir") from e


def _params_only(cfg: Config, plan: StatePlan, old_cfg: Config, old: StatePlan, ckpt: Checkpointer,
                 step: int) -> Any:
    """This run's fresh state from the checkpoint's trained params and the base's frozen ones (as the
    checkpoint's config split them), re-split for this config."""
    if cfg.model.kind == "vae" or old_cfg.model.kind == "vae":
        raise ResumeMismatch("train.resume=params_only is not available for VAE training (model.kind: vae): export "
                             "the run (jaxsd export RUN --out DIR) and start a new train.run_dir with "
                             "model.pretrained=DIR")
    if plan.adapters is not None or old.adapters is not None:
        raise ResumeMismatch("train.resume=params_only: a LoRA run's adapters cannot seed a different train state "
                             "(rank, targets or optimizer changed); export them (jaxsd export RUN --lora) and start a "
                             "new train.run_dir")
    old_shapes = {k: v.shape for k, v in flatten(old.param_shapes).items()}
    new_shapes = {k: v.shape for k, v in flatten(plan.param_shapes).items()}
    if old_shapes != new_shapes:
        diff = sorted(k for k in old_shapes.keys() | new_shapes.keys() if old_shapes.get(k) != new_shapes.get(k))
        raise ResumeMismatch(f"train.resume=params_only: the model's params differ from the checkpoint's "
                             f"({len(diff)} differ, first: {', '.join(diff[:3])}); the checkpoint cannot seed this "
                             "model. Use a new train.run_dir (export this run and set model.pretrained to it)")
    trained = ckpt.restore(step, {"params": old.abstract.params}, partial=True)["params"]
    base, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings)
    _, old_frozen = split_params(base, old_cfg.train.trainable, old_cfg.train.frozen)
    params = merge_params(trained, old_frozen)
    params = jax.tree.map(lambda p, s: p.astype(s.dtype), params, plan.param_shapes)
    state = fresh_state(cfg, plan, params)
    return state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding))


def resume(cfg: Config, plan: StatePlan, ckpt: Checkpointer, mesh,
           before_load: Callable[[int, dict[str, Any], dict[str, tuple[Any, Any]]], None] | None = None
           ) -> Resumed | None:
    """The newest checkpoint of the run restored into `plan` (see the module docstring); None if there is none.
    before_load(step, meta, changes): called once a checkpoint is chosen, before any of its arrays is read
    (the loop puts the data where it left off and compiles the first step then); again for an older one
    if that checkpoint turns out damaged.

    Raises ResumeMismatch for a config change that alters the state (without params_only), and
    DamagedCheckpoints when checkpoints exist but none of them reads.
    """
    this_yaml, base = to_yaml(cfg), base_fingerprint(cfg)
    for step, meta in ckpt.metas():
        changes = config_changes(meta["config"], this_yaml)
        where = f"checkpoint step {step} in {ckpt.directory}"
        if meta.get("base", base) != base:
            pretrained = {k: v for k, v in changes.items() if k.startswith(("model.pretrained", "model.variant",
                                                                            "model.unet", "train.seed"))}
            raise ResumeMismatch(
                f"{where} was trained on another base model (fingerprint {meta['base']}, now {base}"
                + (f"; changed: {describe_changes(pretrained)}" if pretrained else
                   ": the files of model.pretrained changed") + "). Its frozen params are not in the checkpoint "
                "and must be the same as when it was written: point model.pretrained at that model, or start "
                "a new train.run_dir")
        # before format 2 an 8-bit AdamW state was one set of moments per param: same config, other layout
        old_layout = meta.get("state_format", 1) < 2 and from_yaml_text(meta["config"]).optimizer.name == "adamw8bit"
        if old_layout or (changes and not same_structure(_old_plan(meta, step, mesh).abstract, plan.abstract)):
            if cfg.train.resume != "params_only":
                if old_layout:
                    raise ResumeMismatch(
                        f"{where} was written by an older jaxsd whose 8-bit AdamW state has another layout (one set "
                        "of moments per param; now packed into block buffers). Set train.resume=params_only to "
                        "continue from its params with a fresh optimizer state (and EMA), or resume it with the "
                        "jaxsd version that wrote it")
                raise ResumeMismatch(
                    f"{where} was made with a config whose train state differs from this one's; changed: "
                    f"{describe_changes(changes)}. Undo those changes to resume, or set train.resume=params_only "
                    "to start a fresh optimizer (and EMA) from the checkpoint's params")
            old_cfg = from_yaml_text(meta["config"])
            if before_load is not None:
                before_load(step, meta, changes)
            state = _params_only(cfg, plan, old_cfg, _old_plan(meta, step, mesh), ckpt, step)
            how = f"params only from {where} (train.resume=params_only; fresh optimizer state and EMA)"
            log.warning("%s; config changed: %s", how, describe_changes(changes))
            return Resumed(state, step, meta, changes, how)
        if changes:
            log.warning("resuming %s with a changed config (the train state is unchanged): %s", where,
                        describe_changes(changes))
        if before_load is not None:
            before_load(step, meta, changes)
        try:
            restored = ckpt.restore(step, checkpointed(plan.abstract), partial=True)
        except RESTORE_ERRORS as e:
            ckpt.set_aside(step, e)
            continue
        state = from_checkpoint(restored, load_frozen(cfg, plan), plan.abstract)
        how = f"resumed from {where}"
        if cfg.lora.enabled and cfg.lora.init_from:
            how += f" (lora.init_from={cfg.lora.init_from} not read: the checkpoint's adapters continue)"
        return Resumed(state, step, meta, changes, how)
    if ckpt.damaged:
        raise DamagedCheckpoints("no checkpoint in the run directory restores: " + "; ".join(ckpt.damaged) +
                                 f". They were moved to {ckpt.directory}.damaged; running again starts "
                                 "this run afresh")
    return None


def restore_data_position(source: Any, meta: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> None:
    """Put the data iterator where the checkpoint left it; when the data config changed and the saved
    position does not fit the new data, the data order starts afresh (with a warning)."""
    try:
        source.set_state(meta["data"])
    except ValueError as e:
        data_changes = {k: v for k, v in changes.items() if k.startswith(("data.", "dreambooth.", "train.batch_size"))}
        if not data_changes:
            raise
        log.warning("the data changed since the checkpoint (%s) and its saved position does not fit (%s): "
                    "the data order starts afresh", describe_changes(data_changes), e)
