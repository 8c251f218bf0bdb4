"""Our heads-first attention ("einsum", what "auto" runs on CPU) against jax.nn.dot_product_attention.

The models' parity tests against diffusers/transformers run "auto", i.e. "einsum" here; this
checks it against JAX's own implementation on what those models do not all exercise: key
length ≠ query length, bias + mask together, a fully masked row, causal masks, gradients.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxsd.models.attention import attention, choose_implementation


def outputs_and_gradients(implementations: tuple[str, ...], q, k, v, **kw) -> list:
    """[(output, (dq, dk, dv)) per implementation] of `attention(q, k, v, **kw)`, the gradients of
    sum(output²); all in one jitted function (one compile instead of op-by-op dispatch)."""
    @jax.jit
    def run(q, k, v):
        def one(impl):
            out, vjp = jax.vjp(lambda *qkv: attention(*qkv, implementation=impl, **kw), q, k, v)
            return out, vjp(2 * out)
        return [one(impl) for impl in implementations]
    return run(q, k, v)


def _rel(x, y):
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return float(jnp.abs(x - y).max() / jnp.abs(y).max())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto's choice on CPU")
def test_auto_is_einsum_on_cpu():
    q = jnp.zeros((1, 4096, 8, 40))
    assert choose_implementation("auto", q, q) == "einsum"
    with pytest.raises(ValueError, match="unknown"):
        choose_implementation("flash", q, q)


@pytest.mark.parametrize("case", ["plain", "bias", "mask", "bias_mask_scale", "causal"])
def test_einsum_matches_jax_attention_with_gradients(case):
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (2, 7, 3, 8))
    k, v = (jax.random.normal(key, (2, 5, 3, 8)) for key in ks[1:3])
    bias = jax.random.normal(ks[3], (1, 3, 7, 5))
    mask = jax.random.bernoulli(ks[4], 0.7, (2, 1, 7, 5)).at[0, 0, 2].set(False)  # one fully masked row
    kw = {"plain": {}, "bias": {"bias": bias}, "mask": {"mask": mask},
          "bias_mask_scale": {"bias": bias, "mask": mask, "scale": 1.0}, "causal": {"is_causal": True}}[case]
    if case == "causal":  # causal needs Lq == Lk
        k, v = (jax.random.normal(key, (2, 7, 3, 8)) for key in ks[1:3])

    (out_e, grads_e), (out_x, grads_x) = outputs_and_gradients(("einsum", "xla"), q, k, v, **kw)
    assert _rel(out_e, out_x) <= 1e-5
    for ge, gx in zip(grads_e, grads_x, strict=True):
        assert _rel(ge, gx) <= 1e-5
