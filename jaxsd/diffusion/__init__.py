"""Noise schedules (training) and samplers (generation); model-agnostic math.

`SAMPLER_NAMES` lives here, free of JAX imports, so the CLI can list the samplers
without loading JAX (`jaxsd sample --help`).
"""

SAMPLER_NAMES = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
