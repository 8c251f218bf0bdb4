"""The demo's settings → the UNet config `jaxsd train` reads (no compile: pure dict building)."""

import dataclasses

import pytest

from jaxsd.demo.run import unet_config
from jaxsd.demo.settings import DemoSettings


def test_cross_attention_per_level_sets_the_block_types():
    cfg = unet_config(dataclasses.replace(DemoSettings(), unet_cross_attention=(False, True)))
    # up blocks run deepest first, so their order is the reverse of the down blocks'
    assert cfg["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert cfg["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    cfg = unet_config(dataclasses.replace(DemoSettings(), unet_cross_attention=(True, True)))
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 2 and cfg["up_block_types"] == ["CrossAttnUpBlock2D"] * 2


def test_cross_attention_needs_one_entry_per_level():
    with pytest.raises(ValueError, match="one entry per UNet level"):
        unet_config(dataclasses.replace(DemoSettings(), unet_cross_attention=(True,)))
