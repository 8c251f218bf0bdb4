"""`train.fused_update`: each segmented block's AdamW update inside its backward pass gives the params and
moments of the unfused segmented step, skips a non-finite loss, and refuses what it does not support."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import ShardingConfig, load_config
from jaxsd.errors import ConfigError
from jaxsd.train.fused_update import fused_update_hook
from jaxsd.train.model import initial_params
from jaxsd.train.plan import fresh_state, plan_state, plan_train_step
from jaxsd.train.sharding import make_mesh
from jaxsd.train.synthetic import SyntheticSource
from tests.helpers import rel_err

# the tiny preset, segmented, AdamW without clipping, weight decay on, a frozen block (a param inside a segmented
# block without moments) and a learning rate that moves the params visibly in 2 steps
BASE = ["model.segmented_backward=true", "model.remat_policy=full", "optimizer.clip_grad_norm=null",
        "optimizer.weight_decay=0.01", "optimizer.warmup_steps=0", "train.batch_size=2",
        "train.frozen=[down_blocks_1/resnets_0/conv1]"]


def _run(fused: bool, steps: int = 2, poison: bool = False):
    """(params, moments (mu, nu), per-step metrics, count) after `steps` steps of the tiny preset on one device."""
    cfg = load_config("tiny", [*BASE, f"train.fused_update={str(fused).lower()}"])
    mesh = make_mesh(ShardingConfig(data=1), jax.devices()[:1])
    plan = plan_state(cfg, mesh)
    params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings)
    state = fresh_state(cfg, plan, params)
    source = SyntheticSource(cfg.synthetic, global_batch_size=cfg.train.batch_size)
    step = jax.jit(plan_train_step(cfg, plan, mesh, source.empty_prompt()))
    metrics = []
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in source.batch(i).items()}
        if poison and i == 1:  # a NaN latent: a non-finite loss, the step is skipped
            batch["latents"] = batch["latents"].at[0, 0, 0, 0].set(jnp.nan)
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return state.params, (state.opt_state.mu, state.opt_state.nu), metrics, int(state.opt_state.count)


@pytest.mark.slow  # two compiles of the tiny UNet's step (~40 s)
def test_fused_update_gives_the_unfused_params_and_moments(monkeypatch):
    import jaxsd.train.plan as plan_module

    hooks = []
    monkeypatch.setattr(plan_module, "fused_update_hook", lambda cfg: hooks.append(fused_update_hook(cfg)) or hooks[-1])
    plain_p, plain_m, plain_metrics, _ = _run(False)
    fused_p, fused_m, fused_metrics, count = _run(True)
    assert count == 2
    # the blocks updated their params in their own backward passes: every ResNet block, attention and resampler
    # of the tiny UNet, not the transformer blocks nested in the attentions (their attention updates them)
    claimed = {p for h in hooks for p in h.claimed}
    assert {p for h in hooks for p in h.updated} == claimed
    assert ("down_blocks_0", "resnets_0") in claimed and ("mid_block", "attentions_0") in claimed
    assert not any("transformer_blocks_0" in p for p in claimed)
    leaves = jax.tree_util.tree_leaves_with_path(plain_p)
    assert len(leaves) > 100
    for (path, a), b in zip(leaves, jax.tree.leaves(fused_p), strict=True):
        assert rel_err(b, a) <= 1e-6, jax.tree_util.keystr(path)
    for a, b in zip(jax.tree.leaves(plain_m), jax.tree.leaves(fused_m), strict=True):
        assert rel_err(b, a) <= 1e-6
    for mp, mf in zip(plain_metrics, fused_metrics, strict=True):
        assert float(mf["loss"]) == pytest.approx(float(mp["loss"]), rel=1e-6)
        assert int(mf["params_finite"]) == 1 and int(mf["skipped"]) == 0


@pytest.mark.slow
def test_a_non_finite_loss_skips_the_fused_update():
    once_p, once_m, _, _ = _run(True, steps=1)
    p, m, metrics, count = _run(True, steps=2, poison=True)
    assert int(metrics[1]["skipped"]) == 1 and count == 1
    for a, b in zip(jax.tree.leaves((once_p, once_m)), jax.tree.leaves((p, m)), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("override, says", [
    ("model.segmented_backward=false", "model.segmented_backward: true"),
    ("optimizer.clip_grad_norm=1.0", "optimizer.clip_grad_norm: null"),
    ("optimizer.name=adamw8bit", "optimizer.name: adamw"),
    ("train.grad_accum_steps=2", "train.grad_accum_steps: 1"),
    ("model.param_dtype=bfloat16", "model.param_dtype: float32"),
])
def test_unsupported_combinations_are_refused_by_name(override, says):
    with pytest.raises(ConfigError, match=f"train.fused_update: true needs .*{says}"):
        load_config("tiny", [*BASE, "train.fused_update=true", override])
