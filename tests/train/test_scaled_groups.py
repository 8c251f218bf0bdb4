"""`scaled_groups`: a component's learning rate (train.text_encoder_lr) as a scale on its updates — the same
updates as its optimizer run at lr·scale, for every optimizer (8-bit AdamW's packed moments included), and
the other components' updates untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import OptimizerConfig
from jaxsd.train.optimizers import make_optimizer, scaled_groups

SCALE = 0.25


def _tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"unet": {"w": jnp.asarray(rng.standard_normal((64, 96)), jnp.float32),
                     "b": jnp.asarray(rng.standard_normal(96), jnp.float32)},
            "text_encoder": {"w": jnp.asarray(rng.standard_normal((80, 64)), jnp.float32)}}


def _updates(cfg: OptimizerConfig, scales: dict | None) -> dict:
    """Updates of 3 steps (the last one) from fixed gradients."""
    tx, _ = make_optimizer(cfg, 10)
    if scales is not None:
        tx = scaled_groups(tx, scales)
    params, state = _tree(0), None
    state = tx.init(params)
    for i in range(3):
        updates, state = tx.update(_tree(i + 1), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return updates


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion", "sgd"])
def test_a_scaled_group_updates_as_its_optimizer_at_the_scaled_lr(name):
    cfg = OptimizerConfig(name=name, learning_rate=0.01, block_size=256, weight_decay=0.1, clip_grad_norm=None)
    scaled = _updates(cfg, {"text_encoder": SCALE})
    plain = _updates(cfg, None)
    # the UNet's updates are exactly the unscaled optimizer's (the state is not touched by the scale)
    for x, y in zip(jax.tree.leaves(scaled["unet"]), jax.tree.leaves(plain["unet"]), strict=True):
        np.testing.assert_array_equal(x, y)
    # the scaled group follows the trajectory of its optimizer at lr·scale (8-bit AdamW: the same gradients
    # give the same moment codes in both runs)
    low = _updates(OptimizerConfig(**{**cfg.__dict__, "learning_rate": cfg.learning_rate * SCALE}), None)
    np.testing.assert_allclose(scaled["text_encoder"]["w"], low["text_encoder"]["w"], rtol=1e-5, atol=1e-9)
