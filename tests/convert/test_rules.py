"""The generic naming/layout rules, on a small state dict with every leaf kind.

The per-model parity and round-trip tests exercise the same rules on real
architectures; this test pins the rules themselves, including the reverse
split that must keep `linear_1` whole but split `down_blocks_0`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.convert.rules import ConversionError, flax_to_torch, torch_key, torch_to_flax


def test_torch_key_reverse_split_only_for_module_lists():
    assert torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel")) == "down_blocks.0.resnets.1.conv1.weight"
    assert torch_key(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
    assert torch_key(("attn", "to_out_0", "kernel")) == "attn.to_out.0.weight"
    assert torch_key(("norm", "scale")) == "norm.weight"
    assert torch_key(("tok", "embedding")) == "tok.weight"


def _abstract():
    s = jax.ShapeDtypeStruct
    return {
        "down_blocks_0": {"conv": {"kernel": s((3, 3, 4, 8), jnp.float32), "bias": s((8,), jnp.float32)}},
        "proj": {"kernel": s((8, 6), jnp.float32)},
        "norm": {"scale": s((8,), jnp.float32), "bias": s((8,), jnp.float32)},
        "tok": {"embedding": s((10, 8), jnp.float32)},
        "attn": {"to_q": {"kernel": s((8, 8), jnp.float32)}},
    }


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "down_blocks.0.conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "down_blocks.0.conv.bias": rng.standard_normal(8).astype(np.float32),
        "proj.weight": rng.standard_normal((6, 8)).astype(np.float32),
        "norm.weight": rng.standard_normal(8).astype(np.float32),
        "norm.bias": rng.standard_normal(8).astype(np.float32),
        "tok.weight": rng.standard_normal((10, 8)).astype(np.float32),
        "attn.to_q.weight": rng.standard_normal((8, 8)).astype(np.float32),
    }


def test_layouts_and_bit_exact_round_trip():
    state = _state()
    params = torch_to_flax(state, _abstract())
    np.testing.assert_array_equal(params["down_blocks_0"]["conv"]["kernel"],
                                  state["down_blocks.0.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["proj"]["kernel"], state["proj.weight"].T)
    np.testing.assert_array_equal(params["tok"]["embedding"], state["tok.weight"])  # embeddings: no transpose
    back = flax_to_torch(params)
    assert sorted(back) == sorted(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k


def test_legacy_1x1_conv_weight_loads_into_linear_kernel():
    w = np.random.default_rng(1).standard_normal((8, 8, 1, 1)).astype(np.float32)
    params = torch_to_flax({"attn.to_q.weight": w}, {"attn": _abstract()["attn"]})
    np.testing.assert_array_equal(params["attn"]["to_q"]["kernel"], w[:, :, 0, 0].T)


def test_one_error_lists_missing_unexpected_and_mismatched():
    state = _state()
    del state["norm.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["proj.weight"] = np.zeros((5, 8), np.float32)
    with pytest.raises(ConversionError) as e:
        torch_to_flax(state, _abstract(), source="ckpt.safetensors")
    msg = str(e.value)
    assert msg.startswith("ckpt.safetensors does not match the model")
    assert "missing keys (1): norm.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "proj.weight: checkpoint (5, 8) vs model (8, 6)" in msg


def test_bf16_load_casts_each_tensor():
    params = torch_to_flax(_state(), _abstract(), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
