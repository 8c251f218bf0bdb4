"""The TPU splash kernel path (`implementation="splash"`) against our einsum attention, on CPU.

Off TPU, jaxsd/models/splash.py runs JAX's splash kernel in Pallas interpret mode: the same kernel
body, block grid, segment-id masking and custom VJP, lowered to XLA:CPU ops instead of Mosaic. So
this checks everything we ship — layout, scale folding, padding of lengths (to 128) and head dims
(to 128), masks as segment ids, the fully-masked-row rule, the shard_map over a mesh — but not the
Mosaic compilation or the kernel's speed and memory on a TPU, which no CPU can show.

Tolerance: ≤ 1e-5 relative (max |Δ| / max |ref|), the project's rule for simple layers, in fp32.
The kernel's online softmax sums the keys block by block and rescales the partial sums by
exp(m_old − m_new) when a block raises the running max: a different order of fp32 operations than
one softmax over the whole row, so the results differ by rounding only — measured ~1e-6 here.
"""

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import rel_err, run_python
from tests.models.test_attention import outputs_and_gradients

# (Lq, Lk, head dim, kwargs). 300 tokens pad to 384 = three 128-blocks, so the online softmax
# crosses blocks and the padding is masked; head dim 40 (SD1.5) pads to 128; 77 text tokens pad to 128.
CASES = {
    "self_attention": (300, 300, 40, {}),
    "cross_attention_key_mask": (300, 77, 64, {"mask": "keys"}),  # T5 padding; one example fully masked
    "causal_key_mask": (300, 300, 64, {"is_causal": True, "mask": "keys"}),  # CLIP's pair
}


def _inputs(lq: int, lk: int, dim: int, masked: bool):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, lq, 2, dim))
    k, v = (jax.random.normal(key, (2, lk, 2, dim)) for key in ks[1:3])
    mask = None
    if masked:  # example 0: 30 % of the keys masked, key 0 among them (under causal, query 0 sees
        # no key); example 1: every key masked
        keep = jax.random.bernoulli(ks[3], 0.7, (2, lk)).at[0, 0].set(False).at[1].set(False)
        mask = keep[:, None, None, :]
    return q, k, v, mask


@pytest.mark.parametrize("case", list(CASES))
def test_splash_matches_einsum_forward_and_gradients(case):
    lq, lk, dim, kw = CASES[case]
    q, k, v, mask = _inputs(lq, lk, dim, kw.get("mask") == "keys")

    (out_s, grads_s), (out_e, grads_e) = outputs_and_gradients(("splash", "einsum"), q, k, v, mask=mask,
                                                               is_causal=kw.get("is_causal", False))
    assert rel_err(out_s, out_e) <= 1e-5
    for gs, ge in zip(grads_s, grads_e, strict=True):
        assert rel_err(gs, ge) <= 1e-5
    if mask is not None:  # the fully masked example is the mean of v, as in the einsum path
        assert rel_err(out_s[1], jnp.broadcast_to(v[1].mean(0), out_s[1].shape)) <= 1e-6


def test_splash_runs_per_device_under_a_mesh():
    """4 devices, mesh data=2 × tensor=2, traced under `jax.set_mesh`: the kernel runs inside a
    shard_map (batch over data, heads over tensor) and equals the einsum attention."""
    out = run_python("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxsd.models.attention import attention

        mesh = Mesh(np.asarray(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.device_put(jax.random.normal(key, (4, 100, 2, 64)), NamedSharding(mesh, P("data")))
                   for key in ks)
        mask = (jnp.arange(100) < jnp.array([[100], [70], [0], [30]]))[:, None, None, :]
        loss = lambda impl: lambda q, k, v: (attention(q, k, v, mask=mask, implementation=impl) ** 2).sum()
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(loss("splash"))(q, k, v))
            got = jax.jit(jax.value_and_grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.value_and_grad(loss("einsum"), argnums=(0, 1, 2)))(q, k, v)
        rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
        print("shard_map" in jaxpr, "out_specs=(P('data', None, 'tensor', None),)" in jaxpr,
              max(rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))))
    """, devices=4)
    in_shard_map, specs, err = out.split()
    assert in_shard_map == "True" and specs == "True", out
    assert float(err) <= 1e-5


def test_mesh_axes_follow_the_trainer():
    """models/ cannot import train/: the axes splash shard_maps over must stay the trainer's."""
    from jaxsd.config import ShardingConfig
    from jaxsd.models import splash
    from jaxsd.train.sharding import BATCH_AXES

    assert splash.BATCH_MESH_AXES == BATCH_AXES
    assert splash.HEAD_MESH_AXES == (ShardingConfig().rules["heads"],)
