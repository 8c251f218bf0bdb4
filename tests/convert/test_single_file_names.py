"""The LDM names of full-size SD1.5 / SDXL UNets and the SD VAE, checked against diffusers' own converter.

No weights (the models are built on torch's meta device for their key lists): each LDM key jaxsd names gets a one-number tensor holding its index, diffusers'
`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` map them, and every diffusers key must come
back holding its own index (the tiny pipelines of test_single_file.py cannot show the block arithmetic of
two resnets per level, four levels, or SDXL's 10-deep transformers).
"""

from __future__ import annotations

import pytest

from jaxsd.convert.single_file.read import ref_for

SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8, "sample_size": 64,
}
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
}
SD_VAE = {
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512,
}


def _diffusers_keys(kind: str, config: dict) -> list[str]:
    """The state-dict keys of the diffusers model (built on the meta device: no memory, no init)."""
    import diffusers
    import torch

    cls = diffusers.UNet2DConditionModel if kind == "unet" else diffusers.AutoencoderKL
    with torch.device("meta"):
        return sorted(cls(**config).state_dict())


def _round_trip(kind: str, config: dict, prefix: str, convert) -> None:
    import torch

    keys = _diffusers_keys(kind, config)
    checkpoint = {}
    for i, key in enumerate(keys):
        ref = ref_for(kind, key, config)
        shape = (1, 1, 1, 1) if ref.layout == "conv1x1" else (1,)
        checkpoint[prefix + ref.key] = torch.full(shape, float(i))
    assert len(checkpoint) == len(keys)  # no two diffusers tensors share an LDM name
    theirs = convert(checkpoint)
    assert sorted(theirs) == keys
    for i, key in enumerate(keys):
        assert float(theirs[key].reshape(-1)[0]) == i, key


@pytest.mark.torch
@pytest.mark.parametrize("config", [SD15_UNET, SDXL_UNET], ids=["sd15", "sdxl"])
def test_full_size_unet_names_are_diffusers_ldm_names(config):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _round_trip("unet", config, "model.diffusion_model.", lambda c: convert_ldm_unet_checkpoint(c, config))


@pytest.mark.torch
def test_full_size_vae_names_are_diffusers_ldm_names():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _round_trip("vae", SD_VAE, "first_stage_model.", lambda c: convert_ldm_vae_checkpoint(c, SD_VAE))
