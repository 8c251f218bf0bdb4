"""Load a diffusers pipeline folder (`model_index.json` + component folders) into Flax params.

The folder is the model format: `jaxsd sample --model DIR` reads what
`DiffusionPipeline.save_pretrained` writes (a single-file checkpoint is read through its folder view,
jaxsd/convert/single_file/to_folder.py). The family is detected from the folder:

  sdxl    `_class_name` names an XL pipeline, or there is a `text_encoder_2`
  hybrid  the text encoder is a T5 — through the `text_projection/` component when the
          folder has one, else its states go to the UNet as they are (cross_attention_dim = d_model)
  sd2     a CLIP text encoder of OpenCLIP type (gelu, 1024 wide) or a 1024-wide UNet context
  sd1     any other CLIP + UNet pipeline

Every required component must be present; a missing one is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxsd.convert.folder import read_config
from jaxsd.convert.single_file.to_folder import model_folder
from jaxsd.convert.unet import abstract_unet_params, load_unet, read_unet_config
from jaxsd.convert.vae import load_vae, read_vae_config
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError
from jaxsd.models.params import abstract_params
from jaxsd.models.unet import UNetConfig
from jaxsd.models.vae import AutoencoderKL, VAEConfig, example_inputs
from jaxsd.text.prompts import PromptEncoder

logger = logging.getLogger(__name__)
FAMILIES = ("sd1", "sd2", "sdxl", "hybrid")
# jaxsd.text.prompts kind of each family's conditioning
PROMPT_KIND = {"sd1": "clip", "sd2": "clip", "sdxl": "sdxl", "hybrid": "t5_projected"}  # hybrid: or "t5"
_REQUIRED = {
    "sd1": ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
    "sd2": ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
    "sdxl": ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "hybrid": ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
}


class PipelineFolderError(InputError):
    """A pipeline folder that cannot be used (missing model_index.json or component)."""


@dataclasses.dataclass
class LoadedPipeline:
    """Everything a generation pipeline needs, as plain configs + param pytrees.

    text: the family's prompt encoder (jaxsd.text.prompts; text encoders, tokenizers, projection).
    options: pipeline-level config from model_index.json (e.g. force_zeros_for_empty_prompt).
    unet_params, vae_params: trees of `jax.ShapeDtypeStruct` until `load_weights` when loaded with
      `load_pipeline(weights=False)` (the generation program can be compiled from them first).
    """

    folder: Path
    family: str
    unet_config: UNetConfig
    unet_params: Any
    vae_config: VAEConfig
    vae_params: Any
    text: PromptEncoder
    schedule: NoiseSchedule
    options: dict = dataclasses.field(default_factory=dict)
    weights_loader: Callable[[], tuple[Any, Any]] | None = None

    @property
    def weights_loaded(self) -> bool:
        return self.weights_loader is None

    def load_weights(self) -> None:
        """Read the UNet's and VAE's weights (after `load_pipeline(weights=False)`; else nothing to do)."""
        if self.weights_loader is not None:
            self.unet_params, self.vae_params = self.weights_loader()
            self.weights_loader = None


def _abstract(tree: Any, dtype) -> Any:
    """A tree of ShapeDtypeStructs as the loaders store it: every leaf in `dtype` (None: as it is)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype), tree)


def read_model_index(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "model_index.json"
    if not Path(folder).is_dir():
        raise PipelineFolderError(f"{folder}: no such directory (expected a diffusers pipeline folder)")
    if not path.is_file():
        raise PipelineFolderError(f"{folder}: no model_index.json — not a diffusers pipeline folder. Point --model "
                                  "at the folder `DiffusionPipeline.save_pretrained` wrote (it holds model_index.json, "
                                  "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    with open(path) as fh:
        return json.load(fh)


def _present(index: dict, folder: Path, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and entry[0] is not None and (folder / name).is_dir()


def detect_family(folder: str | os.PathLike, index: dict | None = None) -> str:
    """"sd1" | "sd2" | "sdxl" | "hybrid" from model_index.json and the component configs."""
    folder = Path(folder)
    index = read_model_index(folder) if index is None else index
    cls = str(index.get("_class_name", ""))
    if "XL" in cls or _present(index, folder, "text_encoder_2"):
        return "sdxl"
    if not (folder / "text_encoder").is_dir():
        raise PipelineFolderError(f"{folder}: component 'text_encoder' is missing (no text_encoder/ folder)")
    te = read_config(folder / "text_encoder")
    if te.get("model_type") == "t5" or "T5" in str(te.get("architectures", "")) or "text_projection" in index:
        return "hybrid"
    unet = read_config(folder / "unet") if (folder / "unet").is_dir() else {}
    if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024 or unet.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def load_scheduler_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise PipelineFolderError(f"{folder}: component 'scheduler' is missing (no scheduler/scheduler_config.json)")
    with open(path) as fh:
        return json.load(fh)


def _replacement_vae_config(vae_folder: Path, unet_config: UNetConfig) -> VAEConfig:
    """`--vae DIR`'s config, checked against the pipeline's UNet."""
    if not (vae_folder / "config.json").is_file():
        hint = " (it holds a vae/ folder: point at that)" if (vae_folder / "vae" / "config.json").is_file() else ""
        raise PipelineFolderError(f"--vae {vae_folder}: no config.json — expected a diffusers AutoencoderKL folder "
                                  f"(config.json + diffusion_pytorch_model.safetensors){hint}")
    config = read_vae_config(vae_folder)
    if config.latent_channels != unet_config.out_channels:
        raise PipelineFolderError(f"--vae {vae_folder}: its latents have {config.latent_channels} channels but the "
                                  f"UNet predicts {unet_config.out_channels}; use a VAE of this model family")
    return config


def load_replacement_vae(vae_folder: str | os.PathLike, unet_config: UNetConfig, dtype) -> tuple[VAEConfig, Any]:
    """A separate AutoencoderKL folder for a pipeline (`--vae DIR`), checked against its UNet."""
    _replacement_vae_config(Path(vae_folder), unet_config)
    return load_vae(vae_folder, dtype=dtype)


def load_pipeline(folder: str | os.PathLike, *, dtype=None, compute_dtype=None, variant: str | None = None,
                  attention_impl: str = "auto", unet: tuple[UNetConfig, Any] | None = None,
                  scheduler_overrides: dict | None = None, text_max_length: int | None = None,
                  config_dir: str | os.PathLike | None = None,
                  vae_folder: str | os.PathLike | None = None, weights: bool = True) -> LoadedPipeline:
    """Read a diffusers pipeline folder: detect the family, load every component.

    dtype: storage dtype of all params (None: fp32). compute_dtype: the text encoders' compute dtype
    (None: fp32). variant: weights variant (e.g. "fp16").
    config_dir: for a single-file checkpoint `folder` (jaxsd/convert/single_file), a pipeline folder of its
      family giving its configs, tokenizers and scheduler.
    text_max_length: tokens prompts are padded to (the trainer's cache length); None: the length the
      folder records (jaxsd/pipelines/text_length.py). CLIP families accept only their fixed 77.
    unet: (config, params) to use instead of the folder's unet/ (which then need not exist) — the
      trainer's sample grids. scheduler_overrides: keys that replace the folder's scheduler config
      (the trainer's betas and prediction type); with them a missing scheduler/ is allowed.
    vae_folder: a diffusers AutoencoderKL folder (config.json + weights) used instead of the pipeline's vae/
      (e.g. SDXL's fp16-fix VAE); its latent channels must be the UNet's.
    weights: False reads only the UNet's and VAE's configs: their params are ShapeDtypeStructs until
      `LoadedPipeline.load_weights()` (text encoders are loaded either way). So the generation program
      compiles before the weights exist, and the process's peak memory is the larger of compiling and
      generating rather than their sum.
    """
    source = Path(folder)
    folder = model_folder(source, config_dir=config_dir)
    index = read_model_index(folder)
    family = detect_family(folder, index)
    for name in _REQUIRED[family]:
        missing_ok = (name == "unet" and unet is not None) or (name == "scheduler" and scheduler_overrides)
        if not (folder / name).is_dir() and not missing_ok and folder != source:
            raise PipelineFolderError(f"{source}: a single-file checkpoint holds no {name}; give a diffusers "
                                      f"pipeline folder of its family ({family}) for it: --config PIPELINE_DIR")
        if not (folder / name).is_dir() and not missing_ok:
            raise PipelineFolderError(f"{folder}: component {name!r} is missing (no {name}/ folder); a {family} "
                                      f"pipeline needs {', '.join(_REQUIRED[family])}")
    if index.get("requires_aesthetics_score"):
        raise PipelineFolderError(f"{folder}: an SDXL refiner (requires_aesthetics_score: aesthetic-score time ids) "
                                  "is not supported by jaxsd sample; use a base SDXL pipeline folder")
    kind = PROMPT_KIND[family]
    if family == "hybrid" and not (folder / "text_projection").is_dir():
        if "text_projection" in index:
            raise PipelineFolderError(f"{folder}: component 'text_projection' is missing (model_index.json "
                                      "lists it, but there is no text_projection/ folder)")
        kind = "t5"

    def load_components() -> tuple[UNetConfig, Any, VAEConfig, Any]:
        unet_config, unet_params = unet if unet is not None else load_unet(folder / "unet", dtype=dtype,
                                                                            variant=variant)
        vae_config, vae_params = load_replacement_vae(vae_folder, unet_config, dtype) if vae_folder else \
            load_vae(folder / "vae", dtype=dtype, variant=variant)
        return unet_config, unet_params, vae_config, vae_params

    weights_loader = None
    if weights:
        unet_config, unet_params, vae_config, vae_params = load_components()
    else:
        unet_config, vae_config = _component_configs(folder, unet, vae_folder)
        unet_params = _abstract(abstract_unet_params(unet_config), dtype) if unet is None else unet[1]
        vae_params = _abstract(abstract_params(AutoencoderKL(vae_config), *example_inputs(vae_config))[0], dtype)

        def weights_loader() -> tuple[Any, Any]:
            _, unet_weights, _, vae_weights = load_components()
            return unet_weights, vae_weights
    if vae_config.latents_mean is not None and family != "sdxl":
        logger.warning("%s/vae: latents_mean/latents_std are applied (as the cache and diffusers' SDXL pipelines "
                       "do); diffusers' StableDiffusionPipeline ignores them, so it decodes this %s folder "
                       "differently", folder, family)
    text = PromptEncoder.from_pipeline(folder, kind, dtype=compute_dtype or jnp.float32, param_dtype=dtype,
                                       variant=variant, attention_impl=attention_impl,
                                       max_length=text_max_length if family == "hybrid" else None)
    if text_max_length is not None and text.text_length != text_max_length:
        raise PipelineFolderError(f"{folder}: its {family} tokenizer pads prompts to a fixed {text.text_length} "
                                  f"tokens; they cannot be encoded at {text_max_length}")
    scheduler = load_scheduler_config(folder) if (folder / "scheduler").is_dir() or not scheduler_overrides else {}
    schedule = NoiseSchedule.from_config({**scheduler, **(scheduler_overrides or {})})
    options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}
    return LoadedPipeline(folder, family, unet_config, unet_params, vae_config, vae_params, text, schedule, options,
                          weights_loader)


def _component_configs(folder: Path, unet: tuple[UNetConfig, Any] | None,
                       vae_folder: str | os.PathLike | None) -> tuple[UNetConfig, VAEConfig]:
    """The UNet's and VAE's configs as `load_unet` / `load_replacement_vae` / `load_vae` read them, without
    their weights."""
    unet_config = unet[0] if unet is not None else read_unet_config(folder / "unet")
    vae_config = _replacement_vae_config(Path(vae_folder), unet_config) if vae_folder else \
        read_vae_config(folder / "vae")
    return unet_config, vae_config
