"""Checkpoint → diffusers UNet folder (the `jaxsd export` command)."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxsd.config import from_yaml_text
from jaxsd.train.checkpoint import Checkpointer
from jaxsd.train.sharding import make_mesh
from jaxsd.train.trainable import merge_params


def export_unet(run_dir: str | Path, out: str | Path, *, ema: bool = False, step: int | None = None) -> tuple[Path, int]:
    """Write the UNet of checkpoint `step` (default latest) of `run_dir` to `out`; returns (out, step)."""
    from jaxsd.config import ShardingConfig
    from jaxsd.convert.unet import save_unet
    from jaxsd.train.loop import plan_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: not a jaxsd train run directory")
    cfg = from_yaml_text((run_dir / "config.yaml").read_text())
    if ema and not cfg.train.ema.enabled:
        raise ValueError(f"--ema: the run in {run_dir} was trained without EMA (train.ema.enabled=false)")
    mesh = make_mesh(ShardingConfig(data=1), jax.devices()[:1])  # export on one device, whatever trained it
    plan = plan_state(cfg, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    steps = ckpt.steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    if step is None:
        restored = ckpt.restore_latest(plan.abstract)
        state, _, step = restored
    else:
        if step not in steps:
            raise ValueError(f"--step {step}: no such checkpoint; have {steps}")
        state, _ = ckpt.restore(step, plan.abstract)
    ckpt.close()
    params = merge_params(state.ema if ema else state.params, state.frozen)
    save_unet(out, plan.module.config, jax.device_get(params))
    return Path(out), step
