"""The UNet's spatial transformer: diffusers' `Transformer2DModel` (continuous
input), `BasicTransformerBlock` and the GEGLU `FeedForward`. NHWC.

Only the configuration Stable Diffusion UNets use is built: layer norms with
affine params, self-attention (`attn1`), cross-attention (`attn2`) and a GEGLU
feed-forward, with 1×1-conv (SD1) or linear (SD2/SDXL) `proj_in`/`proj_out`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from jaxsd.errors import InputError
from jaxsd.models import token_merging as tome
from jaxsd.models.attention import Attention
from jaxsd.models.layers import Conv, Dense, GroupNorm, LayerNorm
from jaxsd.models.segmented_backward import call_block
from jaxsd.models.token_merging import TokenMerging


def remat_policy(name: str | None):
    """`jax.checkpoint_policies` entry by name (or one of REMAT_ALIASES); None means no rematerialisation."""
    if name is None:
        return None
    name = REMAT_ALIASES.get(name, name)
    policy = getattr(jax.checkpoint_policies, name, None) if name in REMAT_POLICIES else None
    if policy is None:
        raise InputError(f"remat policy {name!r} unknown; choose None, one of {tuple(REMAT_ALIASES)} or one of "
                         f"{REMAT_POLICIES}")
    return policy


# Policies that need no extra arguments (the others in jax.checkpoint_policies are factories).
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")
# The short names configs use (`model.remat_policy`): "full" keeps only each block's inputs for the
# backward pass; "dots" also keeps the outputs of its weight matmuls (projections, feed-forward), so
# the backward pass recomputes norms, activations, convolutions and the attention scores only.
REMAT_ALIASES = {"full": "nothing_saveable", "dots": "dots_with_no_batch_dims_saveable"}


def maybe_remat(cls: type[nn.Module], policy_name: str | None) -> type[nn.Module]:
    """`cls` wrapped in `nn.remat` with the named policy (param names are unchanged)."""
    if policy_name is None:
        return cls
    return nn.remat(cls, policy=remat_policy(policy_name))


class GEGLU(nn.Module):
    """proj to 2×inner, split, value * gelu(gate) (exact erf gelu, as torch's F.gelu).

    x: [B, L, C] -> [B, L, inner].
    """

    inner_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(2 * self.inner_dim, axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: net_0 (GEGLU) → net_2 (Linear). x: [B, L, C] -> [B, L, C]."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
        # net_1 is dropout in diffusers (no params; always 0 in SD checkpoints)
        return Dense(dim, axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """norm1 → attn1 (self; cross if only_cross_attention) → norm2 → attn2 (cross) → norm3 → ff, each residual.

    x: [B, L, dim]; context: [B, Lk, cross_dim]. Returns [B, L, dim].
    token_merging, grid: ToMe (`jaxsd.models.token_merging`) over the (h, w) token grid x flattens,
    planned from the block's input and applied to the sub-layers it names (None: no merging here).
    tome_key: the key of the random dst choice (`token_merging.use_rand` with an even batch).
    """

    heads: int
    dim_head: int
    only_cross_attention: bool = False
    attention_impl: str = "auto"
    token_merging: TokenMerging | None = None
    grid: tuple[int, int] | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, tome_key: jax.Array | None = None) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn = lambda name: Attention(self.heads, self.dim_head, implementation=self.attention_impl, name=name, **kw)
        m_attn = m_cross = m_mlp = u_attn = u_cross = u_mlp = lambda t: t
        tm = self.token_merging
        r = tome.merge_count(x.shape[1], self.grid, tm) if tm is not None and self.grid is not None else 0
        if r > 0:
            # tomesd turns the random choice off for odd batches: [uncond; cond] halves must share it
            key = tome_key if tm.use_rand and x.shape[0] % 2 == 0 else None
            plan = tome.plan_merge(x, self.grid, tm, r, key)
            m, u = (lambda t: tome.merge(t, plan)), (lambda t: tome.unmerge(t, plan))
            m_attn, u_attn = (m, u) if tm.merge_attn else (m_attn, u_attn)
            m_cross, u_cross = (m, u) if tm.merge_crossattn else (m_cross, u_cross)
            m_mlp, u_mlp = (m, u) if tm.merge_mlp else (m_mlp, u_mlp)
        h = m_attn(LayerNorm(1e-5, name="norm1", **kw)(x))
        x = x + u_attn(attn("attn1")(h, context if self.only_cross_attention else None))
        h = m_cross(LayerNorm(1e-5, name="norm2", **kw)(x))
        x = x + u_cross(attn("attn2")(h, context))
        h = m_mlp(LayerNorm(1e-5, name="norm3", **kw)(x))
        return x + u_mlp(FeedForward(name="ff", **kw)(h))


class Transformer2DModel(nn.Module):
    """GroupNorm → proj_in → transformer blocks → proj_out, plus the input as residual.

    x: [B, H, W, C]; context: [B, Lk, cross_dim]. Returns [B, H, W, C].
    token_merging: ToMe in this level's blocks if it is downsampled at most `max_downsample` times from
    `latent_size`; tome_key: their random dst choice (folded with the block index), see BasicTransformerBlock.
    use_linear_projection: proj_in/proj_out are Linear over tokens (SD2/SDXL),
    else 1×1 convs before flattening / after unflattening (SD1).
    segmented_backward: None, or the variable collection ("params" / "lora") whose gradients each transformer
    block finishes in its own backward pass (`jaxsd.models.segmented_backward`).
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    attention_impl: str = "auto"
    remat_policy: str | None = None
    token_merging: TokenMerging | None = None
    latent_size: tuple[int, int] | None = None  # the UNet input's (H, W): which level this is, for ToMe
    segmented_backward: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, tome_key: jax.Array | None = None) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        height, channels = x.shape[1], x.shape[-1]
        inner = self.heads * self.dim_head
        residual = x
        h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            tokens = Dense(inner, axes=("conv_in", "conv_out"), name="proj_in", **kw)(
                rearrange(h, "b height width c -> b (height width) c"))
        else:
            tokens = rearrange(Conv(inner, 1, padding=0, name="proj_in", **kw)(h),
                               "b height width c -> b (height width) c")
        block_cls = maybe_remat(BasicTransformerBlock, self.remat_policy)
        tm, grid = self.token_merging, None
        if tm is not None and tm.active and tome.merges_at(self.latent_size or (height, x.shape[2]),
                                                           tokens.shape[1], tm.max_downsample):
            grid = (height, x.shape[2])
        for i in range(self.num_layers):
            key = None if tome_key is None else jax.random.fold_in(tome_key, i)
            block = block_cls(self.heads, self.dim_head, self.only_cross_attention, self.attention_impl,
                              tm, grid, name=f"transformer_blocks_{i}", **kw)
            tokens = call_block(block, tokens, context, key, grad_vars=self.segmented_backward)
        if self.use_linear_projection:
            h = rearrange(Dense(channels, axes=("conv_in", "conv_out"), name="proj_out", **kw)(tokens),
                          "b (height width) c -> b height width c", height=height)
        else:
            h = Conv(channels, 1, padding=0, name="proj_out", **kw)(
                rearrange(tokens, "b (height width) c -> b height width c", height=height))
        return h + residual.astype(h.dtype)
