"""Tensor names of the original LDM single-file layout ⇔ diffusers/transformers names, per component.

Each component maps a diffusers key (as in its component folder) to a `Ref`: the LDM key (without
the component's prefix, e.g. `model.diffusion_model.`) and how the tensor's layout differs:

  same      the same tensor
  conv1x1   VAE mid-block attention q/k/v/proj_out: [C, C, 1, 1] convs in LDM, [C, C] linears in diffusers
  T         OpenCLIP `text_projection` is [C, P] (x @ W); transformers' `text_projection.weight` is [P, C]
  qkv:i     OpenCLIP's fused `attn.in_proj_weight/bias` [3C, ...]: q, k, v are its rows' thirds i = 0, 1, 2

The maps are tables of renames plus the block arithmetic of the LDM UNet (its input/output blocks are
numbered flat: a down block of L layers takes L + 1 numbers, its downsampler the last) and of the LDM
VAE (decoder up blocks numbered in reverse). Written from the LDM layout as diffusers' single-file
loader reads it (diffusers/loaders/single_file_utils.py); checked against that reader in the tests.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from jaxsd.errors import InputError


class Ref(NamedTuple):
    """Where a diffusers tensor lives in a single file: `key` (after the component prefix) and `layout`."""

    key: str
    layout: str = "same"  # same | conv1x1 | T | qkv:0 | qkv:1 | qkv:2


def _renamed(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    """`rest` with its leading module name renamed by `table` (diffusers name -> LDM name)."""
    for new, old in table:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


# -- UNet (`model.diffusion_model.`) ------------------------------------------------------------

UNET_TOP = (
    ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
)
UNET_RESNET = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
)
# (diffusers pattern, LDM template); {i}/{o} are the flat input/output block numbers, {u} the
# upsampler's slot (after the attention when the up block has one), {r2} the mid resnet's slot.
_UNET_BLOCKS = (
    (r"down_blocks\.(?P<b>\d+)\.resnets\.(?P<l>\d+)\.(?P<rest>.+)", "input_blocks.{i}.0.{resnet}"),
    (r"down_blocks\.(?P<b>\d+)\.attentions\.(?P<l>\d+)\.(?P<rest>.+)", "input_blocks.{i}.1.{rest}"),
    (r"down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv\.(?P<rest>.+)", "input_blocks.{down}.0.op.{rest}"),
    (r"mid_block\.resnets\.(?P<r>\d+)\.(?P<rest>.+)", "middle_block.{r2}.{resnet}"),
    (r"mid_block\.attentions\.0\.(?P<rest>.+)", "middle_block.1.{rest}"),
    (r"up_blocks\.(?P<b>\d+)\.resnets\.(?P<l>\d+)\.(?P<rest>.+)", "output_blocks.{o}.0.{resnet}"),
    (r"up_blocks\.(?P<b>\d+)\.attentions\.(?P<l>\d+)\.(?P<rest>.+)", "output_blocks.{o}.1.{rest}"),
    (r"up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv\.(?P<rest>.+)", "output_blocks.{up}.{u}.conv.{rest}"),
)


def unet_ref(key: str, layers_per_block: int, up_has_attention: tuple[bool, ...]) -> Ref:
    """The LDM name of diffusers UNet key `key` (a UNet with `layers_per_block` resnets per down block)."""
    top = _renamed(key, UNET_TOP)
    if top != key:
        return Ref(top)
    n = layers_per_block + 1
    for pattern, template in _UNET_BLOCKS:
        m = re.fullmatch(pattern, key)
        if m:
            g = {k: (int(v) if v.isdigit() else v) for k, v in m.groupdict().items()}
            b, layer = g.get("b", 0), g.get("l", 0)
            return Ref(template.format(
                i=1 + b * n + layer, down=(b + 1) * n, o=b * n + layer, up=b * n + n - 1,
                u=2 if up_has_attention[b] else 1, r2=2 * g.get("r", 0),
                rest=g["rest"], resnet=_renamed(g["rest"], UNET_RESNET)))
    raise InputError(f"UNet tensor {key!r} has no name in the single-file (LDM) layout: jaxsd writes and reads "
                     "SD1/SD2/SDXL UNets (no class embeddings, controlnets or other extras)")


# -- VAE (`first_stage_model.`) -----------------------------------------------------------------

VAE_TOP = (("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out"))
VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_VAE_BLOCKS = (
    (r"encoder\.down_blocks\.(?P<b>\d+)\.resnets\.(?P<l>\d+)\.(?P<rest>.+)", "encoder.down.{b}.block.{l}.{resnet}"),
    (r"encoder\.down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv\.(?P<rest>.+)", "encoder.down.{b}.downsample.conv.{rest}"),
    (r"decoder\.up_blocks\.(?P<b>\d+)\.resnets\.(?P<l>\d+)\.(?P<rest>.+)", "decoder.up.{rb}.block.{l}.{resnet}"),
    (r"decoder\.up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv\.(?P<rest>.+)", "decoder.up.{rb}.upsample.conv.{rest}"),
    (r"(?P<side>encoder|decoder)\.mid_block\.resnets\.(?P<r>\d+)\.(?P<rest>.+)", "{side}.mid.block_{r1}.{resnet}"),
    (r"(?P<side>encoder|decoder)\.mid_block\.attentions\.0\.(?P<rest>.+)", "{side}.mid.attn_1.{attention}"),
)


def vae_ref(key: str, n_blocks: int) -> Ref:
    """The LDM name of diffusers VAE key `key` (a VAE of `n_blocks` down/up blocks)."""
    top = _renamed(key, VAE_TOP)
    if top != key:
        return Ref(top)
    for pattern, template in _VAE_BLOCKS:
        m = re.fullmatch(pattern, key)
        if m:
            g = {k: (int(v) if v.isdigit() else v) for k, v in m.groupdict().items()}
            attention = _renamed(g["rest"], VAE_ATTENTION)
            conv = "attentions.0" in key and key.endswith(".weight") and "group_norm" not in key
            return Ref(template.format(
                **g, rb=n_blocks - 1 - g.get("b", 0), r1=g.get("r", 0) + 1,
                resnet=_renamed(g["rest"], VAE_RESNET), attention=attention), "conv1x1" if conv else "same")
    return Ref(key)  # conv_in, conv_out, quant_conv, post_quant_conv: the same names


# -- text encoders ------------------------------------------------------------------------------

def clip_ref(key: str) -> Ref:
    """transformers CLIPTextModel keys under an LDM `...transformer.` prefix: the same names, always with
    `text_model.` (transformers 5 saves CLIPTextModel without it)."""
    if key == "text_projection.weight" or key.startswith("text_model."):
        return Ref("transformer." + key)
    return Ref("transformer.text_model." + key)


OPEN_CLIP_TOP = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm", "ln_final"),
)
OPEN_CLIP_LAYER = (
    ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
)
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def open_clip_ref(key: str) -> Ref:
    """OpenCLIP (`...model.`, SD2 and SDXL's second encoder) name of a transformers CLIP key."""
    if not key.startswith("text_model.") and key != "text_projection.weight":
        key = "text_model." + key
    if key == "text_projection.weight":
        return Ref("text_projection", "T")
    top = _renamed(key, OPEN_CLIP_TOP)
    if top != key:
        return Ref(top)
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.groups()
        qkv = re.fullmatch(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", rest)
        if qkv:
            return Ref(f"transformer.resblocks.{layer}.attn.in_proj_{qkv.group(2)}", f"qkv:{_QKV[qkv.group(1)]}")
        return Ref(f"transformer.resblocks.{layer}.{_renamed(rest, OPEN_CLIP_LAYER)}")
    raise InputError(f"text encoder tensor {key!r} has no name in the OpenCLIP single-file layout")


__all__ = ["Ref", "clip_ref", "open_clip_ref", "unet_ref", "vae_ref"]
