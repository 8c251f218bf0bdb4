"""Loading a config: schema defaults <- YAML file (a path or a preset name) <- dotted overrides.

OmegaConf structured configs merge the three, so a YAML or override that names an unknown key, or gives
a value of the wrong type, fails with a `ConfigError` naming the full dotted key and the closest valid
key. Also the run directory's `config.yaml` round trip (`to_yaml`, `from_yaml_text`).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from jaxsd.config_checks import CHOICES, check_config
from jaxsd.config_schema import Config
from jaxsd.config_text import resolve_text_encoder
from jaxsd.data.config import spell_subset_kind
from jaxsd.errors import ConfigError, InputError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in configs/ (without .yaml)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(path_or_name: str) -> Path:
    """A path to a YAML file, or the name of a preset in configs/ ("tiny", "sd15.yaml")."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    q = PRESETS_DIR / (p.name if p.suffix == ".yaml" else p.name + ".yaml")
    if q.is_file() and len(p.parts) == 1:
        return q
    raise ConfigError(f"config file {path_or_name!r} not found; presets: {', '.join(list_presets())}")


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = prefix + f.name
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _all_keys(type(default), key + ".")
    return keys


def _nearest(key: str) -> str:
    candidates = _all_keys()
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return match[0] if match else ""


def _explain(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = str(getattr(e, "full_key", "") or getattr(e, "key", "") or "?")
    if isinstance(e, ConfigKeyError):
        # a key inside a free-form dict section (model.unet, sharding.rules) is never unknown,
        # so this is always a schema key.
        return ConfigError(f"{source}: unknown config key {key!r}; did you mean {_nearest(key)!r}?")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"{source}: wrong type for config key {key!r}: {msg}")
    return ConfigError(f"{source}: invalid config at {key!r}: {str(e).splitlines()[0]}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults ← YAML file (a path or a preset name) ← dotted `key.sub=value` overrides."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        p = resolve_preset(str(path))
        try:
            loaded = OmegaConf.load(p)
            if hasattr(loaded, "get") and loaded.get("data") is not None:
                spell_subset_kind(loaded.data)  # YAML subsets may say `class:` (a Python keyword)
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, str(p)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.steps=100)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override {item!r}") from None
    try:
        cfg = _unbool_on_off(OmegaConf.to_object(merged))
    except InputError as e:  # a section's own check (model.token_merging)
        raise ConfigError(f"{path or 'config'}: model.{e}") from None
    assert isinstance(cfg, Config)
    cfg = resolve_text_encoder(cfg)
    check_config(cfg)
    return cfg


def _unbool_on_off(cfg: Config) -> Config:
    """YAML 1.1 reads `on`/`off` as booleans (`sharding.distributed=on` arrives as "True"): for keys
    whose choices are on/off, give the words back."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if "on" in allowed and "off" in allowed and value in ("True", "False"):
            fixed = replace(getattr(cfg, section), **{name: "on" if value == "True" else "off"})
            cfg = replace(cfg, **{section: fixed})
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what is written to <run_dir>/config.yaml), sections and keys in the
    schema's order. Plain PyYAML: OmegaConf's structured round trip took ~0.5 CPU-s a call, and a run
    writes it at start, at every checkpoint and on resume."""
    return yaml.safe_dump(_plain(asdict(cfg)), sort_keys=False)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (what YAML and `from_yaml_text` read back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def from_yaml_text(text: str) -> Config:
    """Inverse of `to_yaml` (used when a checkpoint's stored config is read back)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    cfg = _unbool_on_off(OmegaConf.to_object(merged))
    assert isinstance(cfg, Config)
    return resolve_text_encoder(cfg)  # a config written before train.text_encoder existed reads as resolved
