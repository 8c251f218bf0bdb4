"""Sampler names (jax-free): our names, A1111 display names, and `auto` from a folder's scheduler config.

Each name is one diffusers scheduler class plus the config overrides it implies
(`Scheduler.from_config(folder_config, **overrides)`), so the folder keeps its
betas, spacing and offsets and the name only picks the algorithm. `auto` is the
folder's own `scheduler_config.json`: its `_class_name` and options mapped back
to the one name whose overrides they agree with.
"""

from __future__ import annotations

from typing import Any

from jaxsd.errors import InputError

_NO_KARRAS = {"use_karras_sigmas": False}
_KARRAS = {"use_karras_sigmas": True}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint"}

# name -> (diffusers class, from_config overrides). Order = the order `--help` lists them in.
DIFFUSERS_EQUIVALENT: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", _NO_KARRAS),
    "lms_karras": ("LMSDiscreteScheduler", _KARRAS),
    "heun": ("HeunDiscreteScheduler", _NO_KARRAS),
    "heun_karras": ("HeunDiscreteScheduler", _KARRAS),
    "euler": ("EulerDiscreteScheduler", _NO_KARRAS),
    "euler_karras": ("EulerDiscreteScheduler", _KARRAS),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, **_NO_KARRAS}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, **_KARRAS}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {**_DPMPP_SDE, "solver_order": 2, **_NO_KARRAS}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {**_DPMPP_SDE, "solver_order": 2, **_KARRAS}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {**_DPMPP_SDE, "solver_order": 3, **_NO_KARRAS}),
    "dpmpp_3m_sde_karras": ("DPMSolverMultistepScheduler", {**_DPMPP_SDE, "solver_order": 3, **_KARRAS}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", _NO_KARRAS),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", _KARRAS),
    "unipc": ("UniPCMultistepScheduler", _NO_KARRAS),
    "unipc_karras": ("UniPCMultistepScheduler", _KARRAS),
    "lcm": ("LCMScheduler", {}),
}

SAMPLER_NAMES: tuple[str, ...] = tuple(DIFFUSERS_EQUIVALENT)
AUTO = "auto"
SCHEDULER_CHOICES: tuple[str, ...] = (AUTO,) + SAMPLER_NAMES  # what --scheduler accepts

# A1111 display names that do not normalise to our names by themselves
_ALIASES = {"plms": "pndm", "euler_ancestral": "euler_a"}

# diffusers' defaults of the options the overrides above set (what a config without the key means)
_CLASS_DEFAULTS: dict[str, Any] = {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++",
                                   "solver_type": "midpoint", "solver_order": 2, "skip_prk_steps": False}


def _normalise(name: str) -> str:
    """'DPM++ 2M SDE Karras' -> 'dpmpp_2m_sde_karras'; 'Euler a' -> 'euler_a'."""
    key = "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())
    key = _ALIASES.get(key, key)
    return key.replace("++", "pp")


def canonical_sampler_name(name: str, *, allow_auto: bool = True) -> str:
    """Our name for `name` (ours or an A1111 display name, any case); InputError listing the choices otherwise."""
    key = _normalise(name)
    if key in SAMPLER_NAMES or (allow_auto and key == AUTO):
        return key
    valid = SCHEDULER_CHOICES if allow_auto else SAMPLER_NAMES
    raise InputError(f"unknown sampler {name!r}; valid samplers: {', '.join(valid)} (or their A1111 display "
                     "names, e.g. 'DPM++ 2M SDE Karras', 'Euler a')")


def auto_sampler_name(config: dict[str, Any]) -> str:
    """The sampler a folder's scheduler config describes (`--scheduler auto`).

    The config's `_class_name` picks the diffusers class; among our names for it, the one whose
    overrides all agree with the config (diffusers' defaults where a key is absent). A class or an
    option combination we do not implement is an InputError naming it and the valid choices.
    """
    cls = config.get("_class_name")
    if not cls:
        raise InputError("--scheduler auto: the folder's scheduler_config.json has no _class_name; pass "
                         f"--scheduler explicitly, one of: {', '.join(SAMPLER_NAMES)}")
    same_class = [n for n, (c, _) in DIFFUSERS_EQUIVALENT.items() if c == cls]
    defaults = _CLASS_DEFAULTS
    for name in same_class:
        overrides = DIFFUSERS_EQUIVALENT[name][1]
        if all(_value(config, key, defaults) == value for key, value in overrides.items()):
            return name
    if same_class:
        options = sorted({k for n in same_class for k in DIFFUSERS_EQUIVALENT[n][1]})
        found = ", ".join(f"{k}={_value(config, k, defaults)!r}" for k in options)
        raise InputError(f"--scheduler auto: the folder's {cls} has {found}, which no jaxsd sampler reproduces "
                         f"({', '.join(same_class)} need other values); pass --scheduler explicitly, one of: "
                         f"{', '.join(SAMPLER_NAMES)}")
    raise InputError(f"--scheduler auto: the folder's scheduler class {cls} is not implemented in jaxsd; pass "
                     f"--scheduler explicitly, one of: {', '.join(SAMPLER_NAMES)}")


def _value(config: dict[str, Any], key: str, defaults: dict[str, Any]) -> Any:
    value = config.get(key)
    return defaults.get(key) if value is None else value
