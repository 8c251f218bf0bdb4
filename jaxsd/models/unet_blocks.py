"""The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D`,
`DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`). NHWC.

Each block takes fully resolved per-block settings (the UNet resolves diffusers'
config conventions once); ResNet and transformer blocks are rematerialised with
`remat_policy` when it is set; with `segmented_backward` each of them (and each resampler) finishes its
weight gradients in its own backward pass (`jaxsd.models.segmented_backward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jaxsd.models.segmented_backward import call_block
from jaxsd.models.token_merging import TokenMerging
from jaxsd.models.transformer import Transformer2DModel, maybe_remat


@dataclass(frozen=True)
class AttnSettings:
    """Cross-attention settings of one block (None on a block without attention)."""

    heads: int
    transformer_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False


class _BlockBase(nn.Module):
    """Fields every UNet block shares."""

    out_channels: int
    num_layers: int
    attn: AttnSettings | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    attention_impl: str = "auto"
    remat_policy: str | None = None
    segmented_backward: str | None = None  # the collection whose gradients each sub-block finishes itself
    token_merging: TokenMerging | None = None
    latent_size: tuple[int, int] | None = None  # the UNet input's (H, W), for ToMe's choice of levels
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _resnet(self, i: int, output_scale_factor: float = 1.0) -> nn.Module:
        cls = maybe_remat(ResnetBlock2D, self.remat_policy)
        return cls(self.out_channels, self.norm_num_groups, self.norm_eps, self.act_fn, output_scale_factor,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}")

    def _transformer(self, i: int, x: jax.Array, context: jax.Array | None,
                     tome_key: jax.Array | None) -> jax.Array:
        """Attention layer i on x; tome_key (ToMe's random dst choice) folded with i."""
        key = None if tome_key is None else jax.random.fold_in(tome_key, i)
        return self._call(self._transformer_module(i), x, context, key)

    def _call(self, module: nn.Module, x: jax.Array, *rest, **static) -> jax.Array:
        """module(x, *rest, **static), its weight gradients finished in its own backward pass with
        `segmented_backward`; static: non-array keyword arguments."""
        return call_block(module, x, *rest, grad_vars=self.segmented_backward, **static)

    def _transformer_module(self, i: int) -> nn.Module:
        a = self.attn
        if self.out_channels % a.heads:
            raise InputError(f"{self.out_channels} channels are not divisible into {a.heads} attention heads "
                             "(config key attention_head_dim, which diffusers uses as the number of heads)")
        return Transformer2DModel(
            a.heads, self.out_channels // a.heads, a.transformer_layers, self.norm_num_groups,
            a.use_linear_projection, a.only_cross_attention, self.attention_impl,
            self.remat_policy, self.token_merging, self.latent_size, segmented_backward=self.segmented_backward,
            dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{i}")


class DownBlock(_BlockBase):
    """`DownBlock2D` (attn None) or `CrossAttnDownBlock2D`: (resnet [→ transformer]) × num_layers [→ downsample].

    x: [B, H, W, Cin] -> (x_out, skips): x_out [B, H', W', out_channels] (H' = ceil(H/2) when
    downsampling), skips: one tensor per layer plus the downsampled output.
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None, tome_key: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = self._call(self._resnet(i), x, temb)
            if self.attn is not None:
                x = self._transformer(i, x, context, tome_key)
            skips.append(x)
        if self.add_downsample:
            x = self._call(Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name="downsamplers_0"), x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_BlockBase):
    """`UNetMidBlock2DCrossAttn`: resnet → (transformer → resnet) × num_layers, resnets scaled by
    `output_scale_factor` (config `mid_block_scale_factor`). x: [B, H, W, C] -> same."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
                 tome_key: jax.Array | None = None) -> jax.Array:
        x = self._call(self._resnet(0, self.output_scale_factor), x, temb)
        for i in range(self.num_layers):
            x = self._transformer(i, x, context, tome_key)
            x = self._call(self._resnet(i + 1, self.output_scale_factor), x, temb)
        return x


class UpBlock(_BlockBase):
    """`UpBlock2D` (attn None) or `CrossAttnUpBlock2D`: (concat skip → resnet [→ transformer]) × num_layers
    [→ upsample]. Skips are consumed last-first.

    x: [B, H, W, C]; skips: tuple of [B, H, W, Ci]; upsample_size: target (H, W) of the
    upsampler when the input size is not a multiple of the UNet's total downscale.
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array | None,
                 upsample_size: tuple[int, int] | None = None, tome_key: jax.Array | None = None) -> jax.Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"up block expects {self.num_layers} skip tensors, got {len(skips)}")
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self._call(self._resnet(i), x, temb)
            if self.attn is not None:
                x = self._transformer(i, x, context, tome_key)
        if self.add_upsample:
            upsample = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")
            x = self._call(upsample, x, output_size=upsample_size)
        return x
