"""ResNet block and resamplers shared by the UNet and the VAE (diffusers'
`ResnetBlock2D`, `Downsample2D`, `Upsample2D`). NHWC throughout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.layers import Conv, Dense, GroupNorm, activation


class ResnetBlock2D(nn.Module):
    """norm → act → conv → (+ time embedding) → norm → act → conv, plus shortcut.

    x: [B, H, W, Cin]; temb: [B, temb_channels] or None. Returns [B, H, W, out_channels].
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    use_time_emb: bool = True
    # norm → act recomputed in the backward pass from its input (kept anyway): the normalised values and the
    # activation's own residuals are not saved (the VAE: 3 of a 256² resnet's 7 saved activations)
    recompute_norm_act: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_act = lambda norm, h: act(norm(h))
        if self.recompute_norm_act:
            norm_act = nn.checkpoint(norm_act)
        h = norm_act(GroupNorm(self.groups, self.eps, name="norm1", **kw), x)
        h = Conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        if self.use_time_emb and temb is not None:
            t = Dense(self.out_channels, axes=("embed", "conv_out"), name="time_emb_proj", **kw)(act(temb))
            h = h + t[:, None, None, :]
        h = norm_act(GroupNorm(self.groups, self.eps, name="norm2", **kw), h)
        h = Conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return (x.astype(h.dtype) + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. padding=0 pads (bottom, right) by one first, as diffusers does.

    x: [B, H, W, C] -> [B, H/2, W/2, out_channels].
    """

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return Conv(self.out_channels, 3, strides=2, padding=pad, name="conv",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2× upsampling then a 3×3 conv. x: [B, H, W, C] -> [B, 2H, 2W, out_channels]."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        oh, ow = output_size or (2 * h, 2 * w)
        double = (oh, ow) == (2 * h, 2 * w)
        if not double:  # odd skip sizes: nearest like torch's F.interpolate(size=...)
            x = x[:, (jnp.arange(oh) * h) // oh][:, :, (jnp.arange(ow) * w) // ow]
        # the exact 2× upsampling happens inside the conv (on CPU never materialised: jaxsd/models/subpixel.py)
        return Conv(self.out_channels, 3, padding=1, upsample2x=double, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)
