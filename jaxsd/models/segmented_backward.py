"""A block whose backward pass computes its own weight gradients before the earlier blocks' backward.

`call_segmented(module, x, *rest)` is `module(x, *rest)` with a custom VJP: the backward pass runs the
block's VJP (param cotangents and input cotangents at once), then hands on the cotangent of `x` only
after it has taken a data dependency on every one of the block's param gradients
(`x̄ + 0 · Σ_params Σ ḡ`). The earlier blocks' backward passes need `x̄`, so no scheduler can move a
weight gradient dW = xᵀ·dy of this block past them — which XLA:CPU otherwise does (it computes them
late, next to the optimizer update), keeping every block's backward intermediates alive until then
(issue #19: 8.8 of SD1.5 batch 4's 11.2 GB of temporaries). XLA cannot fold the `0 ·` away: for
floats `0 · s` is not 0 when s is NaN or inf, and an optimization barrier would not do, XLA:CPU drops
those before scheduling.

The block's forward is recomputed in its backward pass (full remat, whatever its own remat policy),
from its inputs and variables made to wait for the output cotangent the same way: no recomputation
runs early, and XLA's CSE cannot merge it with the forward pass (which would keep the forward's copies
of the weights in the compute dtype alive from the forward pass to here).

The block's param gradients in turn wait for its input cotangents and for each other (all of what its
backward pass hands on gets `+ 0 · Σ (ḡ, x̄, rest̄)`): the cotangents read its weights (x̄ = ȳ·Wᵀ), and a
nested block's weights are also read by the outer block's recomputed forward, which feeds only the outer
block's other weight gradients. Every read of a weight then comes before the optimizer update that
overwrites it in place (the train state is donated). Without that, XLA keeps a copy of each such weight from its first read
in the forward pass to the update (SD1.5: 439 fp32 copies, 2.1 GB; sd15-b4's temporaries 7.7 → 4.7 GB,
docs/benchmarks.md).

The values are the plain ones: `x̄ + 0.0` is `x̄` exactly for a finite sum. A NaN or inf gradient in the
block makes the earlier blocks' gradients NaN too, and a NaN or inf input cotangent the block's own (the
step's NaN skip sees either).

Which variables get gradients (`grad_vars`): "params" when the weights train; "lora" when only the
adapters do. The block's gradients are computed for every variable of that collection, whether the
step uses them or not (XLA cannot drop those the step ignores: the dependency keeps them).

A segment's update (`segment_updates(hook)`, the train step's `train.fused_update`): the outermost
segmented blocks hand their gradients to `hook` inside their backward pass, and what the hook makes of
them — e.g. the optimizer's updated weights and moments, the moments given to the model as variable
collections of their own (`hook.collections`) — is handed on as the cotangents of those variables, so
`jax.vjp` of the step returns them where the gradients were. The block's input cotangents then wait for
the hook's results, so every block's update runs inside the backward pass, before the earlier blocks'
backward passes, and its gradients die there (XLA:CPU otherwise runs every update after the whole
backward pass, all gradients alive). A nested block (a transformer block inside a segmented attention)
leaves the update to the block around it. The model knows nothing of optimizers: the hook is the seam.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp


class SegmentUpdate(Protocol):
    """What the outermost segmented blocks' backward passes do with their gradients (module doc)."""

    collections: tuple[str, ...]  # variable collections besides grad_vars whose cotangents `__call__` returns

    def claim(self, path: tuple[str, ...]) -> None:
        """Called as each such block runs forward: `path` (the block's module path) is updated by the hook."""

    def __call__(self, path: tuple[str, ...], variables: dict[str, Any], grads: Any) -> dict[str, Any]:
        """The block's variables ({collection: tree}, all of them) and the gradients of its grad_vars →
        {collection: tree} for grad_vars and each of `collections` the block has: the cotangents it hands on."""


_HOOK: contextvars.ContextVar[SegmentUpdate | None] = contextvars.ContextVar("segment_update", default=None)


@contextlib.contextmanager
def segment_updates(hook: SegmentUpdate | None) -> Iterator[None]:
    """Segmented blocks traced inside this context (forward) hand their gradients to `hook` (module doc)."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def _after(tree: Any, ready: Any) -> Any:
    """`tree`'s floating-point leaves + 0 · Σ (the floating-point leaves of `ready`): their values, available
    only once every leaf of `ready` is (the other leaves, e.g. PRNG keys and their float0 cotangents, as they are)."""
    floating = lambda v: jnp.issubdtype(v.dtype, jnp.floating)
    total = sum((jnp.sum(r.astype(jnp.float32)) for r in jax.tree.leaves(ready) if floating(r)), jnp.zeros([], jnp.float32))
    return jax.tree.map(lambda v: v + (total * 0.0).astype(v.dtype) if floating(v) else v, tree)


def call_block(module: nn.Module, x: jax.Array, *rest: Any, grad_vars: str | None, **static: Any) -> Any:
    """`module(x, *rest, **static)`; with grad_vars (the training collection) segmented: `call_segmented`."""
    if grad_vars is None:
        return module(x, *rest, **static)
    return call_segmented(module, x, *rest, grad_vars=grad_vars, **static)


def call_segmented(module: nn.Module, x: jax.Array, *rest: Any, grad_vars: str = "params", **static: Any) -> Any:
    """`module(x, *rest, **static)` whose backward pass finishes the gradients of `module`'s `grad_vars`
    before it hands on the cotangent of `x` (module doc). x: the block's main input; rest: other array
    arguments or None (their cotangents are handed on as computed); static: non-array keyword arguments.

    The backward pass recomputes the block's forward from its inputs (as full remat does) and starts that
    only once the block's output cotangent exists, so no block's recomputed forward runs early either.
    Inside `segment_updates(hook)` (and not nested in another segmented block) its gradients go through `hook`."""
    standalone = module.clone(parent=None, name=None)
    hook, path = _HOOK.get(), tuple(module.path)
    extra = () if hook is None else tuple(hook.collections)
    if hook is not None:
        hook.claim(path)

    def apply(mdl, *args):
        with segment_updates(None):  # a nested segmented block leaves the update to this one
            return mdl(*args, **static)

    def forward(mdl, *args):
        return apply(mdl, *args), (mdl.variables, args)

    def backward(residuals, y_bar):
        # the recomputation reads the block's inputs and variables only once y_bar exists: nothing of it runs
        # early, and XLA cannot merge (CSE) it with the forward pass — which would keep e.g. the forward's
        # bf16 or fp32 copies of the weights alive until here
        stored, args = residuals
        variables, (x, *rest) = _after(({k: v for k, v in stored.items() if k not in extra}, args), y_bar)
        others = {k: v for k, v in variables.items() if k != grad_vars}
        block = lambda trained, *args: standalone.apply({grad_vars: trained, **others}, *args, **static)
        with segment_updates(None):
            _, vjp_fn = jax.vjp(block, variables.get(grad_vars, {}), x, *rest)
            var_bar, x_bar, *rest_bar = vjp_fn(y_bar)
        # everything this backward pass hands on waits for all of it: the earlier blocks' backward passes (they
        # need x̄) for this block's weight gradients, and the optimizer's in-place update of a weight (the state
        # is donated) for every read of that weight here (x̄ = ȳ·Wᵀ; a nested block's recomputed forward) —
        # else XLA keeps a copy of the weight from the forward pass to the update
        var_bar, x_bar, *rest_bar = _after((var_bar, x_bar, *rest_bar), (var_bar, x_bar, *rest_bar))
        # as the primal's variables: a block without variables of `grad_vars` (a ResNet block of a LoRA run on
        # attention) has none to give gradients to
        var_out = {grad_vars: var_bar} if grad_vars in variables else {}
        if hook is not None and var_out:
            # the update inside the backward pass: the earlier blocks' backward passes (they need x̄) wait for it
            # the variables as stored, not the copies made to wait for ȳ: a non-finite ȳ (a skipped step) would make
            # those non-finite, and the hook's skip rewrites each variable with itself
            new = hook(path, stored, var_bar)
            var_out = {c: new[c] for c in (grad_vars, *extra) if c in stored}
            x_bar, *rest_bar = _after((x_bar, *rest_bar), var_out)
        return (var_out, x_bar, *rest_bar)

    collections = grad_vars if hook is None else (grad_vars, *extra)
    return nn.custom_vjp(apply, forward_fn=forward, backward_fn=backward, grad_vars=collections)(module, x, *rest)
