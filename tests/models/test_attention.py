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


def _with_chunks(q, k, v, chunks: tuple) -> list:
    """[(output, (dq, dk, dv)) per `query_chunk_size` in `chunks`] of the "einsum" attention, the gradients
    of sum(output²); one jitted function."""
    @jax.jit
    def run(q, k, v):
        def one(chunk):
            out, vjp = jax.vjp(lambda *qkv: attention(*qkv, implementation="einsum", query_chunk_size=chunk), q, k, v)
            return out, vjp(2 * out)
        return [one(c) for c in chunks]
    return run(q, k, v)


def test_query_chunks_give_the_same_output_and_gradients():
    """Chunked queries (the last chunk padded) against all at once, fp32, forward and gradients."""
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (2, 100, 3, 8))
    k, v = (jax.random.normal(key, (2, 37, 3, 8)) for key in ks[1:])

    # None: 100 queries × 37 keys are far below the chunking threshold
    (out, grads), (out_c, grads_c) = _with_chunks(q, k, v, (None, 16))
    assert _rel(out_c, out) <= 1e-6
    for gc, g in zip(grads_c, grads, strict=True):
        assert _rel(gc, g) <= 1e-6


def _grad_temp_bytes(q_shape, query_chunk_size=None) -> int:
    """XLA's temporaries of the gradient of sum(attention(q, q, q)), compiled from shapes."""
    q = jax.ShapeDtypeStruct(q_shape, jnp.bfloat16)
    loss = lambda q: jnp.sum(attention(q, q, q, implementation="einsum",
                                       query_chunk_size=query_chunk_size).astype(jnp.float32))
    return jax.jit(jax.grad(loss)).lower(q).compile().memory_analysis().temp_size_in_bytes


def test_long_attention_is_chunked_and_its_gradient_holds_a_few_chunks():
    """SDXL's 4096-token self-attention at 1024 px (10 heads of 64): fp32 logits of 640 MiB per image.
    All at once, the gradient's temporaries hold four such blocks (logits, softmax, their gradients;
    measured 2.7 GB); `auto` runs 512 queries at a time (80 MiB of logits) and keeps a few chunks'
    worth (measured 0.39 GB)."""
    shape = (1, 4096, 10, 64)
    logits, chunk_logits = 4 * 10 * 4096 * 4096, 4 * 10 * 512 * 4096
    whole = _grad_temp_bytes(shape, query_chunk_size=4096)  # ≥ Lq: all queries at once
    chunked = _grad_temp_bytes(shape)
    assert whole >= 3 * logits
    assert chunked <= 6 * chunk_logits and 5 * chunked < whole, (chunked, whole)


def test_cpu_blocks_give_the_same_output_and_gradients(monkeypatch):
    """CPU's blocked attention (one (example, head) and a block of queries at a time, the softmax normalised
    after the second matmul; the last block padded) against all queries at once, fp32, forward and
    gradients, within the fp32 tolerance 1e-5 (relative to the largest value)."""
    from jaxsd.models import attention_select

    # 37 keys × 4 B = 148 B of logits per query: 100 queries exceed 4 KiB, blocks of 16 stay within it
    monkeypatch.setattr(attention_select, "CPU_BLOCK_LOGITS_BYTES", 4 << 10)
    assert attention_select.cpu_query_block("einsum", platform="cpu", q_len=100, kv_len=37) == 16
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (2, 100, 3, 8))
    k, v = (jax.random.normal(key, (2, 37, 3, 8)) for key in ks[1:])

    # an explicit chunk ≥ Lq: all at once; None: auto, blocked on CPU
    (out, grads), (out_b, grads_b) = _with_chunks(q, k, v, (1000, None))
    if jax.default_backend() == "cpu":
        assert float(jnp.abs(out_b - out).max()) > 0  # another computation ran (normalised after the matmul)
    assert _rel(out_b, out) <= 1e-5
    for gb, g in zip(grads_b, grads, strict=True):
        assert _rel(gb, g) <= 1e-5
