"""Fixtures of the sampler parity tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def replay_noise(monkeypatch):
    """diffusers' schedulers that draw their own noise get the test's (tests.diffusion.parity.QUEUE)."""
    from diffusers.schedulers import (
        scheduling_ddpm,
        scheduling_euler_ancestral_discrete,
        scheduling_lcm,
    )

    from tests.diffusion.parity import replay_randn_tensor
    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm):
        monkeypatch.setattr(module, "randn_tensor", replay_randn_tensor)
