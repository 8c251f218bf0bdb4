"""The configuration of `jaxsd train`: its public import path (`from jaxsd.config import ...`).

Three files with one job each stand behind it: the typed schema, frozen dataclasses
(`config_schema.py`; `configs/*.yaml` are presets that set some of their fields); loading, which merges
schema defaults <- YAML file <- `key.sub=value` overrides with OmegaConf structured configs, so a YAML or
override that names an unknown key, or gives a value of the wrong type, fails with a `ConfigError`
naming the full dotted key and the closest valid key (`config_loader.py`); and the checks of values and
combinations beyond their types, run when a config loads (`config_checks.py`). Sections with their own
schema and check: `config_losses.py`, `config_vae.py`, `config_text.py`, `jaxsd/data/config.py`.

    cfg = load_config("configs/tiny.yaml", ["optimizer.learning_rate=3e-4", "train.steps=50"])
    cfg.optimizer.learning_rate  # 0.0003
"""

from jaxsd.config_checks import CHOICES, check_config, sample_components_folder
from jaxsd.config_loader import (
    PRESETS_DIR,
    from_yaml_text,
    list_presets,
    load_config,
    resolve_preset,
    to_yaml,
)
from jaxsd.config_losses import LPIPSLossConfig, PerceptualLossConfig, StyleLossConfig
from jaxsd.config_schema import (
    CheckpointConfig,
    Config,
    DiffusionConfig,
    EMAConfig,
    LoggingConfig,
    LoRAConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ShardingConfig,
    SyntheticDataConfig,
    TrainConfig,
    ValidationLossConfig,
)
from jaxsd.config_vae import VAELossConfig
from jaxsd.data.config import DataConfig, DreamBoothConfig
from jaxsd.errors import ConfigError

__all__ = [
    "CHOICES",
    "PRESETS_DIR",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "DreamBoothConfig",
    "EMAConfig",
    "LPIPSLossConfig",
    "LoRAConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PerceptualLossConfig",
    "ShardingConfig",
    "StyleLossConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "VAELossConfig",
    "ValidationLossConfig",
    "check_config",
    "from_yaml_text",
    "list_presets",
    "load_config",
    "resolve_preset",
    "sample_components_folder",
    "to_yaml",
]
