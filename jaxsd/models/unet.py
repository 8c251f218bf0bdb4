"""diffusers' `UNet2DConditionModel` in Flax (SD 1.x, SD 2.x, SDXL, hybrids). NHWC.

`UNetConfig` holds the diffusers config keys these families use, interpreted
exactly as diffusers does (including its historical naming: `attention_head_dim`
is the *number of heads* per block, head size = channels // heads). Any other
diffusers key must sit at its default; a value we do not implement is an error
naming the key, never silently ignored.

Param names mirror diffusers (`down_blocks_0/attentions_1/transformer_blocks_0/
attn1/to_q/kernel` ⇔ `down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.errors import InputError
from jaxsd.models.layers import Conv, Dense, GroupNorm, activation
from jaxsd.models.token_merging import TokenMerging, timestep_key
from jaxsd.models.unet_blocks import AttnSettings, DownBlock, MidBlock, UpBlock

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# diffusers UNet2DConditionModel keys we do not implement, with the value that
# means "feature off". Any other value is refused.
UNSUPPORTED_DEFAULTS: dict[str, object] = {
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "num_attention_heads": None,
}
# Keys diffusers reads only for features we refuse above; any value is harmless.
INERT_KEYS = {"addition_embed_type_num_heads": 64}

IntOrTuple = int | tuple[int, ...]


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class UNetConfig:
    """The diffusers `UNet2DConditionModel` config keys SD-family checkpoints use (diffusers names)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    mid_block_only_cross_attention: bool | None = None  # read by diffusers only for other mid-block types
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8  # diffusers: the number of heads (historical name)
    use_linear_projection: bool = False
    # SD2.1's flag, read and written; changes nothing: logits and softmax are always fp32 (see
    # jaxsd/models/attention_select.py), and diffusers' default SDPA processor ignores it too
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # Keys this class reads nothing from but keeps for an exact round trip.
    extra: tuple[tuple[str, object], ...] = field(default=(), compare=True)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, _tuple(v))
        self._validate()

    # ---- diffusers dict <-> config ------------------------------------------------
    @classmethod
    def from_diffusers(cls, config: Mapping) -> UNetConfig:
        """From a diffusers `config.json` dict. Keys starting with `_` are metadata and skipped."""
        own = {f.name for f in fields(cls)} - {"extra"}
        kwargs, extra, unknown = {}, [], []
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in own:
                kwargs[key] = _tuple(value)
            elif key in UNSUPPORTED_DEFAULTS:
                default = UNSUPPORTED_DEFAULTS[key]
                if value != default:
                    hint = (" (diffusers refuses it too: the per-block head count goes in attention_head_dim)"
                            if key == "num_attention_heads" else "")
                    raise InputError(f"UNet config {key}={value!r} is not supported by jaxsd; only "
                                     f"{default!r} is{hint}")
            elif key in INERT_KEYS:
                if value != INERT_KEYS[key]:
                    extra.append((key, _tuple(value)))
            else:
                unknown.append(key)
        if unknown:
            raise InputError(f"UNet config has keys jaxsd does not know: {sorted(unknown)}; "
                             "they are not part of diffusers' UNet2DConditionModel as jaxsd implements it")
        return cls(**kwargs, extra=tuple(extra))

    def to_diffusers(self) -> dict:
        """diffusers `config.json` dict (lists, every key explicit) that loads in `UNet2DConditionModel`."""
        out = {"_class_name": "UNet2DConditionModel"}
        for key, value in asdict(self).items():
            if key != "extra":
                out[key] = list(value) if isinstance(value, tuple) else value
        out.update(UNSUPPORTED_DEFAULTS)
        out.update(INERT_KEYS)
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.extra})
        return out

    # ---- resolved per-block values (diffusers' conventions) ----------------------
    def per_block(self, name: str) -> tuple:
        """A scalar-or-list key expanded to one value per down block."""
        v = getattr(self, name)
        return tuple(v) if isinstance(v, tuple) else (v,) * len(self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def context_dim(self) -> int:
        return self.per_block("cross_attention_dim")[0]

    def _validate(self) -> None:
        def bad(key, why):
            raise InputError(f"UNet config {key}={getattr(self, key)!r}: {why}")

        n = len(self.down_block_types)
        for t in self.down_block_types:
            if t.removeprefix("UNetRes") not in DOWN_BLOCKS:
                bad("down_block_types", f"block type {t!r} is not supported; choose from {DOWN_BLOCKS}")
        for t in self.up_block_types:
            if t.removeprefix("UNetRes") not in UP_BLOCKS:
                bad("up_block_types", f"block type {t!r} is not supported; choose from {UP_BLOCKS}")
        if self.mid_block_type not in MID_BLOCKS:
            bad("mid_block_type", f"not supported; choose from {MID_BLOCKS}")
        if len(self.up_block_types) != n:
            bad("up_block_types", f"needs as many entries as down_block_types ({n})")
        for key in ("block_out_channels", "only_cross_attention", "layers_per_block", "cross_attention_dim",
                    "transformer_layers_per_block", "attention_head_dim"):
            v = getattr(self, key)
            if isinstance(v, tuple) and len(v) != n:
                bad(key, f"needs one entry per block ({n})")
            if isinstance(v, tuple) and any(isinstance(x, tuple) for x in v):
                bad(key, "nested per-layer lists (asymmetric UNets) are not supported")
        if len(set(self.per_block("cross_attention_dim"))) != 1:
            bad("cross_attention_dim", "per-block values must be equal: one encoder_hidden_states feeds every block")
        activation(self.act_fn)
        if not isinstance(self.norm_num_groups, int):
            bad("norm_num_groups", "must be an int (configs without norms are not supported)")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, key) % 2 != 1:
                bad(key, "must be odd (diffusers pads by (k-1)//2, so even kernels change the size)")
        if self.addition_embed_type not in (None, "text_time"):
            bad("addition_embed_type", "only None and 'text_time' (SDXL) are supported")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            bad("addition_embed_type", "'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim")


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding as diffusers' `get_timestep_embedding`. t: [N] -> [N, dim] fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 → act → linear_2. x: [B, Cin] -> [B, features]."""

    features: int
    act_fn: str = "silu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = Dense(self.features, axes=("embed", "mlp"), name="linear_1", **kw)(x)
        return Dense(self.features, axes=("mlp", "embed"), name="linear_2", **kw)(activation(self.act_fn)(h))


class UNet2DConditionModel(nn.Module):
    """The conditional UNet.

    __call__(sample [B,H,W,in_channels], timesteps [B] or scalar, encoder_hidden_states [B,L,D],
    added_cond None | {"text_embeds": [B,P], "time_ids": [B,T]}) -> [B,H,W,out_channels] in `dtype`.

    dtype: compute dtype (params stay `param_dtype`; norms and softmax run in fp32).
    attention_impl: "auto" | "einsum" | "xla" | "cudnn" | "splash" (see `jaxsd.models.attention`).
    remat_policy: None, or a `jax.checkpoint_policies` name applied per ResNet and transformer block.
    segmented_backward: None, or the variable collection that trains ("params"; LoRA: "lora"): each ResNet
      block, spatial transformer, transformer block and resampler then computes its gradients of it in its own
      backward pass (`jaxsd.models.segmented_backward`); same values.
    token_merging: None, or ToMe in the transformer blocks (`jaxsd.models.token_merging`); its random
      dst choice is drawn from the timesteps (`timestep_key`).
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    remat_policy: str | None = None
    token_merging: TokenMerging | None = None
    segmented_backward: str | None = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 added_cond: Mapping[str, jax.Array] | None = None) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b = sample.shape[0]
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be [B, H, W, {cfg.in_channels}] (NHWC), got {sample.shape}")
        if encoder_hidden_states.shape[-1] != cfg.context_dim:
            raise ValueError(f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != "
                             f"cross_attention_dim {cfg.context_dim}")
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # time (+ SDXL text/size conditioning)
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, name="time_embedding", **kw)(t_emb.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond, b)
        context = encoder_hidden_states.astype(self.dtype)
        tm = self.token_merging
        tome_key = timestep_key(t) if tm is not None and tm.active and tm.use_rand else None
        block_key = lambda i: None if tome_key is None else jax.random.fold_in(tome_key, i)
        latent_size = tuple(sample.shape[1:3])

        # down
        h = Conv(cfg.block_out_channels[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
                 name="conv_in", **kw)(sample)
        skips = [h]
        n = len(cfg.down_block_types)
        layers = cfg.per_block("layers_per_block")
        for i, block_type in enumerate(cfg.down_block_types):
            h, res = DownBlock(cfg.block_out_channels[i], layers[i], self._attn(block_type, i), add_downsample=i < n - 1,
                               downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}",
                               **self._block_kw(latent_size))(h, emb, context, block_key(i))
            skips.extend(res)

        # mid
        h = MidBlock(cfg.block_out_channels[-1], 1, self._attn("CrossAttn", n - 1),
                     output_scale_factor=cfg.mid_block_scale_factor, name="mid_block",
                     **self._block_kw(latent_size))(h, emb, context, block_key(n))

        # up: block i mirrors down block n-1-i; its channels, heads, layers come reversed
        # (diffusers reverses num_attention_heads = attention_head_dim for the up path).
        rev_channels = cfg.block_out_channels[::-1]
        factor = 2 ** (n - 1)
        odd_size = any(d % factor for d in sample.shape[1:3])
        for i, block_type in enumerate(cfg.up_block_types):
            num = layers[n - 1 - i] + 1
            res, skips = tuple(skips[-num:]), skips[:-num]
            last = i == n - 1
            up_size = tuple(skips[-1].shape[1:3]) if odd_size and not last else None
            h = UpBlock(rev_channels[i], num, self._attn(block_type, n - 1 - i), add_upsample=not last,
                        name=f"up_blocks_{i}", **self._block_kw(latent_size))(h, res, emb, context, up_size,
                                                                              block_key(n + 1 + i))

        h = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return Conv(cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2,
                    name="conv_out", **kw)(h)

    def _block_kw(self, latent_size: tuple[int, int]) -> dict:
        cfg = self.config
        tm = self.token_merging if self.token_merging is not None and self.token_merging.active else None
        return {"norm_num_groups": cfg.norm_num_groups, "norm_eps": cfg.norm_eps, "act_fn": cfg.act_fn,
                "attention_impl": self.attention_impl, "remat_policy": self.remat_policy,
                "segmented_backward": self.segmented_backward, "token_merging": tm,
                "latent_size": latent_size if tm is not None else None,
                "dtype": self.dtype, "param_dtype": self.param_dtype}

    def _attn(self, block_type: str, i: int) -> AttnSettings | None:
        """Attention settings for down block i (or the up block mirroring it); None without attention.

        only_cross_attention for up blocks: diffusers reverses that list too, so the
        value of down block i applies to its mirror — same index i here.
        """
        if "CrossAttn" not in block_type:
            return None
        cfg = self.config
        return AttnSettings(
            heads=cfg.per_block("attention_head_dim")[i],
            transformer_layers=cfg.per_block("transformer_layers_per_block")[i],
            use_linear_projection=cfg.use_linear_projection,
            # the mid block (UNetMidBlock2DCrossAttn) ignores only_cross_attention in diffusers
            only_cross_attention=bool(cfg.per_block("only_cross_attention")[i]) and block_type != "CrossAttn")

    def _text_time_embedding(self, added_cond: Mapping[str, jax.Array] | None, batch: int) -> jax.Array:
        """SDXL: concat(pooled text embeds, sinusoidal(time ids)) → add_embedding (a TimestepEmbedding)."""
        cfg = self.config
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("addition_embed_type 'text_time' (SDXL) needs added_cond="
                             "{'text_embeds': [B, P], 'time_ids': [B, 6]}")
        text, ids = added_cond["text_embeds"], added_cond["time_ids"]
        ids_emb = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(batch, -1)
        add = jnp.concatenate([text.astype(jnp.float32), ids_emb], axis=-1)
        if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds width {text.shape[-1]} + {ids.shape[-1]} time ids × {cfg.addition_time_embed_dim} = "
                f"{add.shape[-1]}, but projection_class_embeddings_input_dim is "
                f"{cfg.projection_class_embeddings_input_dim}")
        # add_embedding uses diffusers' TimestepEmbedding default activation (silu), not act_fn
        return TimestepEmbedding(cfg.time_embed_dim, "silu", name="add_embedding", dtype=self.dtype,
                                 param_dtype=self.param_dtype)(add.astype(self.dtype))


def example_inputs(config: UNetConfig, batch: int = 1, size: int | None = None) -> tuple:
    """Smallest valid inputs (for `jax.eval_shape` of the params). Returns the positional args of __call__."""
    size = size or 2 ** (len(config.down_block_types) - 1)
    sample = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
    context = jnp.zeros((batch, 1, config.context_dim), jnp.float32)
    added = None
    if config.addition_embed_type == "text_time":
        n_ids = 6
        text_dim = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
        if text_dim <= 0:  # not SDXL's 6 size/crop ids: let the whole width be "text"
            n_ids, text_dim = 0, config.projection_class_embeddings_input_dim
        added = {"text_embeds": jnp.zeros((batch, text_dim), jnp.float32),
                 "time_ids": jnp.zeros((batch, n_ids), jnp.float32)}
    return sample, jnp.zeros((batch,), jnp.float32), context, added
