"""diffusers' `AutoencoderKL` in Flax (the SD 1.x / 2.x / SDXL / SD3-style VAE). NHWC.

Encoder: conv_in → DownEncoderBlock2D × n (resnets, stride-2 downsampler on all
but the last) → mid block (resnet, spatial self-attention, resnet) → GroupNorm →
SiLU → conv_out to 2×latent_channels (mean ‖ logvar) → optional 1×1 quant_conv.
Decoder: optional 1×1 post_quant_conv → conv_in → mid block → UpDecoderBlock2D × n
(layers_per_block + 1 resnets, nearest 2× upsampler on all but the last) →
GroupNorm → SiLU → conv_out.

Param names mirror diffusers (`encoder/down_blocks_0/resnets_1/conv1/kernel` ⇔
`encoder.down_blocks.0.resnets.1.conv1.weight`). Images are in [-1, 1],
[B, H, W, 3]; latents [B, H/f, W/f, latent_channels] with f = 2**(n_blocks-1).
Latents for diffusion are `(z - shift_factor) * scaling_factor`, or with `latents_mean` /
`latents_std` `(z - mean) * scaling_factor / std` per channel (as diffusers' SDXL pipelines);
see `VAEConfig.scale_latents` / `unscale_latents` / `scale_logvar`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.models.attention import Attention
from jaxsd.models.layers import Conv, GroupNorm
from jaxsd.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers' get_activation accepts only these for the VAE's act_fn.
VAE_ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")
# Fixed by diffusers' Encoder/Decoder (not config keys).
_EPS = 1e-6


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class VAEConfig:
    """The diffusers `AutoencoderKL` config keys (diffusers names and defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        self._validate()

    @classmethod
    def from_diffusers(cls, config: Mapping) -> VAEConfig:
        """From a diffusers `config.json` dict. Keys starting with `_` are metadata and skipped;
        any other key jaxsd does not know is an error (never silently ignored)."""
        own = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in own)
        if unknown:
            raise InputError(f"VAE config has keys jaxsd does not know: {unknown}; they are not part of "
                             f"diffusers' AutoencoderKL (known keys: {sorted(own)})")
        return cls(**{k: v for k, v in config.items() if k in own})

    def to_diffusers(self) -> dict:
        """diffusers `config.json` dict (lists, every key explicit) that loads in `AutoencoderKL`."""
        out: dict[str, object] = {"_class_name": "AutoencoderKL"}
        for key, value in asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 2**(number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _latent_stats(self, dtype) -> tuple[jax.Array, jax.Array] | None:
        """(latents_mean, latents_std) as [C] arrays (broadcast over NHWC's channel axis), or None."""
        if self.latents_mean is None:
            return None
        return jnp.asarray(self.latents_mean, dtype), jnp.asarray(self.latents_std, dtype)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """VAE latents [..., C] -> diffusion-model latents, as diffusers' pipelines do:
        with latents_mean/std (SDXL-pipeline VAEs such as Playground v2.5's) (z - mean) * scaling_factor / std,
        else (z - shift_factor) * scaling_factor (no shift when absent; SD3/Flux VAEs have one)."""
        stats = self._latent_stats(z.dtype)
        if stats is not None:
            mean, std = stats
            return (z - mean) * self.scaling_factor / std
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """Diffusion-model latents [..., C] -> VAE latents: z * std / scaling_factor + mean with
        latents_mean/std (diffusers' StableDiffusionXLPipeline decode), else z / scaling_factor + shift_factor."""
        stats = self._latent_stats(z.dtype)
        if stats is not None:
            mean, std = stats
            return z * std / self.scaling_factor + mean
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    def scale_logvar(self, logvar: jax.Array) -> jax.Array:
        """A posterior's log-variance [..., C] in diffusion-model space (what `scale_latents` does to a
        sample's spread): logvar + 2 log(scaling_factor / std), std = latents_std or 1."""
        stats = self._latent_stats(logvar.dtype)
        scale = self.scaling_factor if stats is None else self.scaling_factor / stats[1]
        return logvar + 2.0 * jnp.log(jnp.asarray(scale, logvar.dtype))

    def _validate(self) -> None:
        def bad(key, why):
            raise InputError(f"VAE config {key}={getattr(self, key)!r}: {why}")

        n = len(self.block_out_channels)
        if n == 0:
            bad("block_out_channels", "needs at least one block")
        for key, want in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, key)
            for t in types:
                if t != want:
                    bad(key, f"block type {t!r} is not supported; AutoencoderKL in jaxsd uses only {want!r}")
            if len(types) != n:
                bad(key, f"needs one entry per block_out_channels entry ({n})")
        if self.act_fn not in VAE_ACTIVATIONS:
            bad("act_fn", f"not supported; choose one of {VAE_ACTIVATIONS}")
        if not isinstance(self.norm_num_groups, int) or any(c % self.norm_num_groups for c in self.block_out_channels):
            bad("norm_num_groups", f"must be an int dividing every block_out_channels entry {self.block_out_channels}")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            bad("layers_per_block", "must be a positive int")
        for key in ("latents_mean", "latents_std"):
            v = getattr(self, key)
            if v is not None and len(v) != self.latent_channels:
                bad(key, f"needs one value per latent channel ({self.latent_channels})")
        self._validate_latent_stats()

    def _validate_latent_stats(self) -> None:
        # diffusers applies latents_mean/std only when both are set, and then ignores shift_factor (SDXL
        # pipelines), while SD3/Flux pipelines apply shift_factor and ignore them: a config with an unpaired
        # value, or with both kinds, has no one latent space, so it is refused rather than guessed.
        mean, std = self.latents_mean, self.latents_std
        if (mean is None) != (std is None):
            given, absent = ("latents_mean", "latents_std") if std is None else ("latents_std", "latents_mean")
            raise InputError(f"VAE config has {given} but no {absent}: diffusers uses the two together "
                             f"(latents = (z - mean) * scaling_factor / std); give both, or neither")
        if mean is None:
            return
        if self.shift_factor:
            raise InputError(f"VAE config has both shift_factor={self.shift_factor} and latents_mean/latents_std; "
                             "diffusers' pipelines apply one or the other (SD3/Flux: shift_factor, SDXL: mean/std), "
                             "so the latent space is ambiguous. Remove the one the model was not trained with")
        if any(not s > 0 for s in std):
            raise InputError(f"VAE config latents_std={list(std)}: every value must be > 0")


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (a pytree; jit-friendly).

    mean, logvar: [B, h, w, latent_channels]; logvar is clipped to [-30, 20] as diffusers does.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """moments: [B, h, w, 2C], mean first then logvar along channels (diffusers' chunk order)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * ε with ε ~ N(0, 1) drawn from `key`. Returns [B, h, w, C]."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """KL(self ‖ other), default other = N(0, 1), summed over h, w, C. Returns [B]."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-likelihood of x [B, h, w, C] under the posterior, summed per sample. Returns [B]."""
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(x - self.mean) / self.var,
                             axis=(1, 2, 3))


def _remat(cls: type[nn.Module], policy: str | None) -> type[nn.Module]:
    if policy is None:
        return cls
    try:
        return nn.remat(cls, policy=getattr(jax.checkpoint_policies, policy))
    except AttributeError:
        raise InputError(f"remat_policy {policy!r} is not a jax.checkpoint_policies name") from None


class MidBlock(nn.Module):
    """diffusers' `UNetMidBlock2D` without time embedding: resnet, [attention, resnet].

    One attention head of width C over the flattened h×w positions, with its own
    GroupNorm and a residual connection. x: [B, h, w, C] -> same.
    """

    channels: int
    groups: int
    act_fn: str
    add_attention: bool
    attention_impl: str = "auto"
    attention_chunk_size: int | None = None
    remat_policy: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet = _remat(ResnetBlock2D, self.remat_policy)
        x = resnet(self.channels, self.groups, _EPS, self.act_fn, recompute_norm_act=True, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = Attention(heads=1, dim_head=self.channels, qkv_bias=True, norm_num_groups=self.groups,
                          norm_eps=_EPS, residual_connection=True, implementation=self.attention_impl,
                          query_chunk_size=self.attention_chunk_size, name="attentions_0", **kw)(x)
        return resnet(self.channels, self.groups, _EPS, self.act_fn, recompute_norm_act=True, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) diffusers' encoder downsampler: pad (bottom, right), 3×3 stride 2.

    x: [B, H, W, Cin] -> [B, H/2 (or H), W/2 (or W), channels].
    """

    channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_downsample: bool
    remat_policy: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet = _remat(ResnetBlock2D, self.remat_policy)
        for j in range(self.num_layers):
            x = resnet(self.channels, self.groups, _EPS, self.act_fn, recompute_norm_act=True, name=f"resnets_{j}",
                       **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) nearest 2× upsampling and a 3×3 conv.

    x: [B, h, w, Cin] -> [B, 2h (or h), 2w (or w), channels].
    """

    channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_upsample: bool
    remat_policy: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet = _remat(ResnetBlock2D, self.remat_policy)
        for j in range(self.num_layers):
            x = resnet(self.channels, self.groups, _EPS, self.act_fn, recompute_norm_act=True, name=f"resnets_{j}",
                       **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2*latent_channels] (before quant_conv)."""

    config: VAEConfig
    attention_impl: str = "auto"
    attention_chunk_size: int | None = None
    remat_policy: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        channels = cfg.block_out_channels
        h = Conv(channels[0], 3, padding=1, name="conv_in", **kw)(x)
        for i, ch in enumerate(channels):
            h = DownEncoderBlock2D(ch, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                                   add_downsample=i < len(channels) - 1, remat_policy=self.remat_policy,
                                   name=f"down_blocks_{i}", **kw)(h)
        h = MidBlock(channels[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                     self.attention_impl, self.attention_chunk_size, self.remat_policy, name="mid_block", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(h))
        return Conv(2 * cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] (after post_quant_conv) -> image [B, h*f, w*f, out_channels]."""

    config: VAEConfig
    attention_impl: str = "auto"
    attention_chunk_size: int | None = None
    remat_policy: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        channels = tuple(reversed(cfg.block_out_channels))
        h = Conv(channels[0], 3, padding=1, name="conv_in", **kw)(z)
        h = MidBlock(channels[0], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                     self.attention_impl, self.attention_chunk_size, self.remat_policy, name="mid_block", **kw)(h)
        for i, ch in enumerate(channels):  # the decoder's blocks have one resnet more than the encoder's
            h = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                                 add_upsample=i < len(channels) - 1, remat_policy=self.remat_policy,
                                 name=f"up_blocks_{i}", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(h))
        return Conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL`.

    dtype: compute dtype. With `config.force_upcast` (the default, as in SD/SDXL VAEs)
      an fp16 request computes in fp32, because those VAEs overflow fp16's range — the rule
      diffusers' pipelines apply. bf16 has fp32's range and is honoured. `force_upcast`
      (None: the config's) overrides the config.
    remat_policy: None, or a `jax.checkpoint_policies` name applied per ResNet block.
    attention_chunk_size: the mid-block attention (one head over all h×w latents) runs its
      queries in chunks of this many when there are more (None: never), bounding its logits
      to chunk × h·w; the default leaves SD's 512 px (64×64 latents) in one piece and keeps
      1024 px SDXL at 256 MiB instead of 1 GiB per image. The result is the same.

    Methods (use `model.apply({"params": p}, x, method="encode")`):
      encode(x [B,H,W,in] in [-1,1]) -> DiagonalGaussian (mean, logvar [B,H/f,W/f,latent])
      encode_moments(x) -> [B,H/f,W/f,2*latent] (unclipped; what tiling blends)
      decode(z [B,h,w,latent]) -> [B,h*f,w*f,out]
      __call__(x) -> decode(encode(x).mode())  (also creates every param at init)
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    remat_policy: str | None = None
    force_upcast: bool | None = None
    attention_chunk_size: int | None = 4096

    @property
    def compute_dtype(self) -> jnp.dtype:
        upcast = self.config.force_upcast if self.force_upcast is None else self.force_upcast
        return jnp.dtype(jnp.float32) if upcast and jnp.dtype(self.dtype) == jnp.float16 else jnp.dtype(self.dtype)

    def setup(self):
        cfg = self.config
        kw = {"dtype": self.compute_dtype, "param_dtype": self.param_dtype}
        sub = dict(attention_impl=self.attention_impl, attention_chunk_size=self.attention_chunk_size,
                   remat_policy=self.remat_policy, **kw)
        self.encoder = Encoder(cfg, **sub)
        self.decoder = Decoder(cfg, **sub)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, 1, padding=0, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, 1, padding=0, **kw)

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected NHWC input [B, H, W, {channels}], got shape {x.shape}")

    def encode_moments(self, x: jax.Array) -> jax.Array:
        self._check(x, self.config.in_channels, "encode")
        h = self.encoder(x)
        return self.quant_conv(h) if self.config.use_quant_conv else h

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encode_moments(x))

    def decode(self, z: jax.Array) -> jax.Array:
        self._check(z, self.config.latent_channels, "decode")
        z = z.astype(self.compute_dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x).mode())


def example_inputs(config: VAEConfig, batch: int = 1) -> tuple:
    """Smallest image that survives every downsampler (for `jax.eval_shape` of the params)."""
    size = 2 * config.downscale
    return (jnp.zeros((batch, size, size, config.in_channels), jnp.float32),)


__all__ = [
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "DownEncoderBlock2D",
    "Encoder",
    "MidBlock",
    "UpDecoderBlock2D",
    "VAEConfig",
    "example_inputs",
]
