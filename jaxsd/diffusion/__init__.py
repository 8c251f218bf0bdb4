"""Noise schedules (training) and samplers (generation); model-agnostic math.

The sampler names (`SAMPLER_NAMES`, `--scheduler`'s `SCHEDULER_CHOICES`, A1111 display
names, `auto`) live in `names.py`, free of JAX imports, so the CLI can list them
without loading JAX (`jaxsd sample --help`).
"""

from jaxsd.diffusion.names import SAMPLER_NAMES, SCHEDULER_CHOICES

__all__ = ["SAMPLER_NAMES", "SCHEDULER_CHOICES"]
