"""The shared layers' param handling (their numerics are covered by every model parity test)."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxsd.models.layers import Conv, Dense


@pytest.mark.parametrize("layer, x", [(Dense(8), jnp.ones((2, 4))), (Conv(8), jnp.ones((1, 5, 5, 4)))])
def test_params_apply_boxed_or_plain_and_a_wrong_shape_is_named(layer, x):
    boxed = layer.init(jax.random.key(0), x)["params"]  # as init returns them: logical-axis boxes
    plain = nn.unbox(boxed)
    assert jnp.array_equal(layer.apply({"params": boxed}, x), layer.apply({"params": plain}, x))
    bad = {**plain, "kernel": jnp.zeros(plain["kernel"].shape[:-1] + (7,))}
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"\"kernel\".*expected.*8\).*has shape \(.*7\)"):
        layer.apply({"params": bad}, x)
