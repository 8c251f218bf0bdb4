"""Updating bfloat16 params: the update is added in fp32 and rounded stochastically to bfloat16.

With `model.param_dtype: bfloat16` there is no fp32 master copy (kohya's "full bf16"). A bf16
value has 8 significant bits, so round-to-nearest drops every update below half a unit in
the last place: at lr 1e-5 an Adam step (~lr) vanishes entirely on a weight of 0.05 (ulp
2^-13 ≈ 1.2e-4), and training stalls. Stochastic rounding rounds up with probability equal
to the fraction of the ulp the exact sum lies above the lower neighbour, so the expected
stored value is the exact sum and small updates accumulate on average (Gupta et al. 2015,
"Deep Learning with Limited Numerical Precision").

bf16 is the upper half of an fp32's bits: adding 16 uniformly random bits to the fp32 sum's
low half and truncating does exactly that (for either sign: the bits are sign-magnitude).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LOW_PRECISION = (jnp.bfloat16,)


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """fp32 x (any shape) → bfloat16, rounded down or up at random, unbiased: E[result] = x.
    Exact when x is a bf16 value already (then no bits are below the cut); inf stays inf."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    # a NaN's payload may carry into the exponent: keep NaN as it is
    rounded = jnp.where(jnp.isnan(x), bits, (bits + noise) & jnp.uint32(0xFFFF0000))
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def apply_updates(params: Any, updates: Any, key: jax.Array | None) -> Any:
    """`optax.apply_updates`, except that bfloat16 params get p + u computed in fp32 and rounded
    stochastically (one key per param, folded from `key`). key None: round to nearest everywhere."""
    p_leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, (p, u) in enumerate(zip(p_leaves, treedef.flatten_up_to(updates), strict=True)):
        if key is not None and p.dtype in LOW_PRECISION:
            exact = p.astype(jnp.float32) + u.astype(jnp.float32)
            out.append(stochastic_round_bf16(exact, jax.random.fold_in(key, i)))
        else:
            out.append(jnp.asarray(p + u).astype(p.dtype))  # as optax.apply_updates
    return treedef.unflatten(out)


def needs_stochastic_rounding(params: Any) -> bool:
    """Whether any of these params (arrays or ShapeDtypeStructs) is bfloat16."""
    return any(x.dtype in LOW_PRECISION for x in jax.tree.leaves(params))
