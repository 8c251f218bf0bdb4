"""`train.fused_update`: each UNet block's AdamW update inside the backward pass, as soon as its gradients exist.

With `model.segmented_backward` every ResNet block, attention and resampler finishes its weight gradients in
its own backward pass; still, XLA:CPU schedules every optimizer update after the whole backward pass, so all
those gradients are alive at the peak (SD1.5 batch 4: 1.9 GB; docs/benchmarks.md, "Memory (issue #19)").
Here the update itself runs in the block's backward pass (`jaxsd.models.segmented_backward.segment_updates`):

* the AdamW moments go into the model as two more variable collections (`MU`, `NU`, laid out as "params"),
  so a block's backward pass sees its own; it hands on the block's new weights and moments as the
  cotangents of "params", `MU` and `NU`, and `jax.vjp` of the step returns them where the gradients were;
* the earlier blocks' backward passes wait for those results (a data dependency, module doc there), so
  XLA cannot move the update after them, and a block's gradients die inside its backward pass;
* the step's scalars (learning rate, bias corrections, the skip) depend on the loss, which exists only
  after the forward pass: the step sets them on the hook between `jax.vjp`'s forward and backward, and the
  blocks' backward passes — traced when the step calls the VJP — read them there;
* the params outside every segmented block (conv_in, the time embedding, norm_out, conv_out) are
  updated after the backward pass, as before, from their gradients.

The arithmetic is `fused_adamw`'s (`dense_update`, the same coefficients): the params and moments are
those of the unfused streamed step. The skip is decided by the loss alone, as in the streamed step; there is
no global gradient norm (nothing can see every gradient), so the step reports whether the updated params are
all finite instead (`params_finite`). Supported: AdamW with fp32 moments, fp32 params, no clipping, no
gradient accumulation, the UNet fully or partly fine-tuned (not LoRA, not the text side): the config check is
`jaxsd.config_fused.check_fused_update`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxsd.config import Config
from jaxsd.models.segmented_backward import segment_updates
from jaxsd.train.fused_adamw import Coefficients, FusedAdamWState, dense_update, step_coefficients
from jaxsd.train.optimizers import decays
from jaxsd.train.trainable import flatten, unflatten

MU, NU = "adam_mu", "adam_nu"  # the variable collections of the moments, beside "params"


class AdamWSegmentUpdate:
    """The `SegmentUpdate` hook: a block's params and moments → their AdamW step (module doc)."""

    collections = (MU, NU)

    def __init__(self, b1: float, b2: float, eps: float, weight_decay: float):
        self.b1, self.b2, self.eps, self.weight_decay = b1, b2, eps, weight_decay
        self.claimed: list[tuple[str, ...]] = []  # module paths of the blocks that update their own params
        self.updated: list[tuple[str, ...]] = []  # ... and of those whose backward pass has (been traced)
        self.coefficients: Coefficients | None = None  # set by the step after the forward pass

    def claim(self, path: tuple[str, ...]) -> None:
        self.claimed.append(path)

    def update(self, p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        """One param (any shape, fp32): (new param, new m, new v), as `fused_adamw` and optax.apply_updates."""
        if self.coefficients is None:
            raise RuntimeError("a segment's update was traced before the step set its coefficients")
        wd = self.weight_decay if decays(p) else 0.0  # as the unfused optimizer's mask
        u, m, v = dense_update(g, m, v, p, self.coefficients, weight_decay=wd, eps=self.eps)
        return (p + u).astype(p.dtype), m, v

    def __call__(self, path: tuple[str, ...], variables: dict[str, Any], grads: Any) -> dict[str, Any]:
        self.updated.append(path)
        params, g = flatten(variables["params"]), flatten(grads)
        mu, nu = flatten(variables.get(MU, {})), flatten(variables.get(NU, {}))
        new = {"params": {}, MU: {}, NU: {}}
        for key, p in params.items():
            if key not in mu:  # not trained (train.frozen): its gradient, which the step drops
                new["params"][key] = g[key]
                continue
            new["params"][key], new[MU][key], new[NU][key] = self.update(p, g[key], mu[key], nu[key])
        return {c: unflatten(tree) for c, tree in new.items()}


def fused_update_step(loss_fn: Callable[[Any, dict], tuple[jax.Array, Any]], params: Any,
                      opt_state: FusedAdamWState, lr: jax.Array, hook: AdamWSegmentUpdate,
                      ) -> tuple[jax.Array, Any, Any, FusedAdamWState]:
    """(loss, the objective's second value, new params, new optimizer state) of one step.

    loss_fn(params, moments) -> (loss, aux): the objective with the model applied to {"params": ...,
    **moments}, moments = {MU: mu tree, NU: nu tree} shaped as `params`. lr: f32 [] the learning rate at
    `opt_state.count`. The skip (non-finite loss) rewrites params and moments with themselves."""
    with segment_updates(hook):
        loss, vjp_fn, aux = jax.vjp(lambda p, mu, nu: loss_fn(p, {MU: mu, NU: nu}), params, opt_state.mu,
                                    opt_state.nu, has_aux=True)
    count, hook.coefficients = step_coefficients(opt_state.count, jnp.isfinite(loss), jnp.ones([], jnp.float32),
                                                 lr, hook.b1, hook.b2)
    g, g_mu, g_nu = (flatten(t) for t in vjp_fn(jnp.ones_like(loss)))  # the blocks' updates run in here
    done = tuple("/".join(path) + "/" for path in hook.claimed)
    p, mu, nu = flatten(params), flatten(opt_state.mu), flatten(opt_state.nu)
    new_p, new_mu, new_nu = {}, {}, {}
    for key in p:
        if key.startswith(done):  # the block's backward pass handed on its new param and moments
            new_p[key], new_mu[key], new_nu[key] = g[key], g_mu[key], g_nu[key]
        else:  # outside every segmented block: updated here from its gradient
            new_p[key], new_mu[key], new_nu[key] = hook.update(p[key], g[key], mu[key], nu[key])
    return loss, aux, unflatten(new_p), FusedAdamWState(count, unflatten(new_mu), unflatten(new_nu))


def params_finite(params: Any) -> jax.Array:
    """int32 []: 1 if every param is finite (the fused step's stand-in for a finite gradient norm)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])).astype(jnp.int32)


def fused_update_hook(cfg: Config) -> AdamWSegmentUpdate | None:
    """The step's hook for `train.fused_update` (a fresh one per trace: it records what it traced), or None."""
    if not cfg.train.fused_update:
        return None
    o = cfg.optimizer
    return AdamWSegmentUpdate(o.b1, o.b2, o.eps, o.weight_decay)
