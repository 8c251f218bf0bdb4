"""A toy denoiser for engine tests: a few jaxsd layers (conv, group norm, cross-attention q/k/v, dense)
with logical axis names, so the step/sharding machinery sees a UNet-like param tree but compiles in a second."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.layers import Conv, Dense, GroupNorm


class ToyDenoiser(nn.Module):
    width: int = 32

    @nn.compact
    def __call__(self, x, t, ehs, added=None):
        h = Conv(self.width, name="conv_in")(x)
        h = h + Dense(self.width, axes=("embed", "conv_out"), name="time_proj")(
            jnp.sin(t[:, None] / 100.0 * jnp.arange(1, 9))).reshape(x.shape[0], 1, 1, -1)
        h = nn.silu(GroupNorm(4, name="norm")(h))
        b, hh, ww, c = h.shape
        q = Dense(self.width, axes=("embed", "heads"), use_bias=False, name="to_q")(h.reshape(b, hh * ww, c))
        k = Dense(self.width, axes=("embed", "heads"), use_bias=False, name="to_k")(ehs)
        v = Dense(self.width, axes=("embed", "heads"), use_bias=False, name="to_v")(ehs)
        a = jax.nn.softmax(q @ k.transpose(0, 2, 1) / jnp.sqrt(c), axis=-1) @ v
        h = h + Dense(self.width, axes=("heads", "embed"), name="to_out_0")(a).reshape(h.shape)
        return Conv(x.shape[-1], name="conv_out")(h)


def toy(width=32, channels=4, size=8, text=(8, 32)):
    """(module, params, apply_fn, logical specs) of a toy denoiser."""
    from jaxsd.models.params import abstract_params
    m = ToyDenoiser(width)
    ex = (jnp.zeros((1, size, size, channels)), jnp.zeros((1,)), jnp.zeros((1, *text)))
    params = jax.jit(lambda k: nn.unbox(m.init(k, *ex)["params"]))(jax.random.key(0))
    _, specs = abstract_params(m, *ex)
    apply_fn = lambda p, noisy, t, ehs, added: m.apply({"params": p}, noisy, t, ehs, added)
    return m, params, apply_fn, specs


def batch(n=8, size=8, channels=4, text=(8, 32), seed=0):
    """numpy arrays (an eager jax.random call per new shape costs an XLA compile)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((n, size, size, channels), np.float32),
            "encoder_hidden_states": rng.standard_normal((n, *text), np.float32)}
