"""Read a single-file checkpoint (original LDM layout) as diffusers components, lazily.

`SingleFile(path)` reads the safetensors header only: it finds the family and the components the file
holds (`layout.py`), each component's config (from `config_dir`, a pipeline folder of the same
family; else the `jaxsd.config.*` metadata jaxsd writes; else the tensors' shapes, `infer.py`), and
maps every diffusers key to its tensor (`names.py`). Everything is checked before a byte of weights
is read: missing, unknown and mis-shaped tensors are one error that names the family assumed.

`state(component)` is a mapping of diffusers keys to arrays computed on access from the
memory-mapped file (a reshape, transpose or slice of one tensor), so a loader that casts each
tensor on its own never holds a float32 copy of the file.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxsd.convert.safetensors_io import SafetensorsFile
from jaxsd.convert.single_file import infer, layout
from jaxsd.convert.single_file.names import Ref, clip_ref, open_clip_ref, unet_ref, vae_ref
from jaxsd.errors import InputError

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
           "text_encoder": "model", "text_encoder_2": "model"}
META = "jaxsd.config."  # + component: its config.json, in files jaxsd writes


class SingleFileError(InputError):
    """A single-file checkpoint that does not fit what it was read as."""


@dataclass
class Component:
    """One diffusers component inside a single file."""

    name: str
    prefix: str
    kind: str  # unet | vae | clip | open_clip
    config: dict
    refs: dict[str, Ref] = field(default_factory=dict)  # diffusers key -> tensor in the file (after prefix)


def expected_keys(kind: str, config: Mapping) -> dict[str, tuple[int, ...]]:
    """diffusers key -> PyTorch shape of every parameter a component of `config` has (no weights made)."""
    from flax import traverse_util

    from jaxsd.convert.rules import torch_key
    from jaxsd.models.params import abstract_params

    if kind == "unet":
        from jaxsd.convert.unet import abstract_unet_params
        from jaxsd.models.unet import UNetConfig
        abstract = abstract_unet_params(UNetConfig.from_diffusers(config))
    elif kind == "vae":
        from jaxsd.models.vae import AutoencoderKL, VAEConfig, example_inputs
        vc = VAEConfig.from_diffusers(config)
        abstract, _ = abstract_params(AutoencoderKL(vc), *example_inputs(vc))
    else:
        from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel, example_inputs
        cc = CLIPTextConfig.from_transformers(config)
        abstract, _ = abstract_params(CLIPTextModel(cc), *example_inputs(cc))
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":  # Flax HWIO / (in, out) -> PyTorch OIHW / (out, in)
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        out[torch_key(path)] = shape
    return out


def ref_for(kind: str, key: str, config: Mapping) -> Ref:
    if kind == "unet":
        layers = config.get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise SingleFileError(f"UNet layers_per_block={layers}: the single-file layout numbers blocks for one "
                                  "layers_per_block for all blocks")
        up_attention = tuple("CrossAttn" in t for t in config["up_block_types"])
        return unet_ref(key, layers, up_attention)
    if kind == "vae":
        return vae_ref(key, len(config["block_out_channels"]))
    return clip_ref(key) if kind == "clip" else open_clip_ref(key)


def _file_shape(ref: Ref, want: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the file's tensor must have for a diffusers tensor of shape `want`."""
    if ref.layout == "conv1x1":
        return (*want, 1, 1)
    if ref.layout == "T":
        return want[::-1]
    if ref.layout.startswith("qkv"):
        return (3 * want[0], *want[1:])
    return want


def from_file_layout(arr: np.ndarray, ref: Ref) -> np.ndarray:
    """The diffusers tensor from the file's (a view where it can be: nothing is copied but transposes)."""
    if ref.layout == "conv1x1":
        return arr[:, :, 0, 0] if arr.ndim == 4 else arr
    if ref.layout == "T":
        return np.ascontiguousarray(arr.T)
    if ref.layout.startswith("qkv"):
        third = arr.shape[0] // 3
        i = int(ref.layout[-1])
        return arr[i * third:(i + 1) * third]
    return arr


class ComponentState(Mapping[str, np.ndarray]):
    """A component's diffusers state dict over the memory-mapped file: each tensor computed on access."""

    def __init__(self, file: SafetensorsFile, sources: dict[str, tuple[str, Ref]]):
        self._file, self._sources = file, sources

    def __getitem__(self, key: str) -> np.ndarray:
        source, ref = self._sources[key]
        return from_file_layout(self._file[source], ref)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


class SingleFile:
    """A single-file checkpoint seen as diffusers components (see the module doc).

    family: "sd1" | "sd2" | "sdxl" to override what the names say (refused when they say otherwise);
    config_dir: a diffusers pipeline folder whose component configs describe this file;
    ema: the UNet from the file's `model_ema.*` copy.
    notes: what was inferred and from where, one line each, for the command to print.
    """

    def __init__(self, path: str | os.PathLike, *, family: str | None = None,
                 config_dir: str | os.PathLike | None = None, ema: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise SingleFileError(f"{self.path}: no such file")
        if self.path.suffix != ".safetensors":
            raise SingleFileError(f"{self.path}: jaxsd reads single-file checkpoints as .safetensors only "
                                  "(a .ckpt is a pickle, and unpickling can run code)")
        self.file = SafetensorsFile(self.path)
        self.metadata = dict(self.file.metadata)
        self.config_dir = Path(config_dir) if config_dir else None
        self.ema = ema
        self.notes: list[str] = []
        shapes = {k: self.file.shape(k) for k in self.file}
        self.family = self._family(shapes, family)
        self.components = self._components(shapes)
        self.sources, self.extras = self._resolve(shapes)

    # -- what the file is ---------------------------------------------------------------------

    def _family(self, shapes, given: str | None) -> str | None:
        found, why = layout.detect_family(shapes, shapes, str(self.path))
        if given is not None and given not in layout.FAMILIES:
            raise SingleFileError(f"--family {given!r}: choose one of {', '.join(layout.FAMILIES)}")
        if found and given and found != given:
            raise SingleFileError(f"{self.path}: --family {given} but the file is {found} ({why})")
        if found:
            self.notes.append(f"family {found}: {why}")
            return found
        for other, source in ((given, "--family"), (self.metadata.get("jaxsd.family"), "the file's metadata"),
                              (self.config_dir and layout.folder_family(self.config_dir), "--config")):
            if other:
                self.notes.append(f"family {other}: from {source} ({why})")
                return other
        return None

    def _config(self, name: str, kind: str, shapes, prefix: str) -> dict:
        if self.config_dir is not None:
            path = self.config_dir / name / "config.json"
            if not path.is_file():
                raise SingleFileError(f"--config {self.config_dir}: no {name}/config.json, but {self.path} has a "
                                      f"{name}; give a pipeline folder of the same family")
            self.notes.append(f"{name} config: {path}")
            return json.loads(path.read_text())
        if META + name in self.metadata:
            self.notes.append(f"{name} config: the file's metadata ({META}{name})")
            return json.loads(self.metadata[META + name])
        family = self.family
        if family is None and kind == "vae":
            family = "sd1"
            self.notes.append("VAE alone: read as an SD1/SD2 VAE (scaling factor 0.18215); an SDXL VAE needs "
                              "--family sdxl")
        elif family is None:
            raise SingleFileError(f"{self.path}: cannot tell the model family from its tensors (it holds {name}); "
                                  "give --family sd1|sd2|sdxl or --config PIPELINE_DIR")
        sub = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        if kind == "unet":
            pooled = shapes.get(layout.TEXT_ENCODERS["sdxl"]["text_encoder_2"][0] + "text_projection")
            config, assumed = infer.unet_config(sub, family, pooled[1] if pooled else None)
        elif kind == "vae":
            config, assumed = infer.vae_config(sub, family)
        else:
            config, assumed = infer.text_config(sub, kind, family, with_projection=name == "text_encoder_2")
        self.notes.append(f"{name} config: from the tensors' shapes; assumed {'; '.join(assumed)}")
        return config

    def _components(self, shapes) -> dict[str, Component]:
        keys = list(shapes)
        found: list[tuple[str, str, str]] = []
        if any(k.startswith(layout.UNET_PREFIX) for k in keys):
            found.append(("unet", layout.UNET_PREFIX, "unet"))
        vae_prefix = layout.vae_prefix(keys)
        if vae_prefix or any(k.startswith("encoder.down.") for k in keys):
            found.append(("vae", vae_prefix, "vae"))
        for name, (prefix, kind) in layout.TEXT_ENCODERS.get(self.family or "", {}).items():
            if any(k.startswith(prefix) for k in keys):
                found.append((name, prefix, kind))
        comps = {}
        for name, prefix, kind in found:
            config = self._config(name, kind, shapes, prefix)
            comps[name] = Component(name, prefix, kind, config)
        return comps

    # -- every tensor accounted for ------------------------------------------------------------

    def _resolve(self, shapes) -> tuple[dict[str, dict[str, tuple[str, Ref]]], list[str]]:
        claimed: set[str] = set()
        missing, mismatched, sources = [], [], {}
        ema_used = 0
        for comp in self.components.values():
            sources[comp.name] = {}
            for key, want in expected_keys(comp.kind, comp.config).items():
                ref = ref_for(comp.kind, key, comp.config)
                comp.refs[key] = ref
                source = comp.prefix + ref.key
                if comp.name == "unet" and self.ema:
                    source = layout.ema_key(source)
                    ema_used += 1
                claimed.add(source)
                if source not in shapes:
                    missing.append(source)
                    continue
                have, need = shapes[source], _file_shape(ref, want)
                if have != need and not (ref.layout == "conv1x1" and have == want):
                    mismatched.append(f"{source}: file {have} vs config {need}")
                sources[comp.name][key] = (source, ref)
        leftover = [k for k in shapes if k not in claimed]
        extras = [k for k in leftover if layout.is_extra(k) or self._dropped(k) or
                  (self.ema and k.startswith(layout.UNET_PREFIX))]
        unknown = sorted(set(leftover) - set(extras))
        if self.ema and missing and all(m.startswith(layout.EMA_PREFIX) for m in missing):
            raise SingleFileError(f"{self.path}: --ema, but the file has no EMA copy of {len(missing)} of the UNet's "
                                  f"{ema_used} tensors (e.g. {missing[0]}); convert without --ema")
        if missing or unknown or mismatched:
            head = (f"{self.path} does not fit a {self.family or 'unknown-family'} checkpoint with components "
                    f"{', '.join(self.components) or 'none'}:")
            lines = [head]
            for title, names in (("missing keys", missing), ("unknown keys", unknown),
                                 ("shape mismatches", mismatched)):
                if names:
                    lines.append(f"  {title} ({len(names)}): " + ", ".join(sorted(names)[:12]) +
                                 (" ..." if len(names) > 12 else ""))
            lines.append("  A truncated or foreign file, or another family: check --family / --config")
            raise SingleFileError("\n".join(lines))
        n_ema = sum(k.startswith(layout.EMA_PREFIX) for k in shapes)
        if self.ema:
            self.notes.append(f"EMA: the UNet from the file's model_ema.* copy ({ema_used} tensors)")
        elif n_ema > 2:
            self.notes.append(f"EMA: the file's {n_ema} model_ema.* tensors are not used (--ema uses them)")
        return sources, extras

    def _dropped(self, key: str) -> bool:
        """OpenCLIP tensors a diffusers text encoder does not have: SD2's unused projection and the layers
        past its config (SD2 conditions on the penultimate layer)."""
        for comp in self.components.values():
            if comp.kind != "open_clip" or not key.startswith(comp.prefix):
                continue
            rest = key[len(comp.prefix):]
            if rest == "text_projection":
                return True
            parts = rest.split(".")
            if rest.startswith("transformer.resblocks.") and int(parts[2]) >= comp.config["num_hidden_layers"]:
                return True
        return False

    # -- reading -------------------------------------------------------------------------------

    def state(self, name: str) -> ComponentState:
        """Component `name`'s diffusers state dict, lazily over the file."""
        if name not in self.components:
            raise SingleFileError(f"{self.path} has no {name} (it holds {', '.join(self.components)})")
        return ComponentState(self.file, self.sources[name])


@functools.lru_cache(maxsize=4)
def _cached(path: str, stamp: tuple[int, int], family: str | None, config_dir: str | None, ema: bool) -> SingleFile:
    return SingleFile(path, family=family, config_dir=config_dir, ema=ema)


def open_single_file(path: str | os.PathLike, *, family: str | None = None,
                     config_dir: str | os.PathLike | None = None, ema: bool = False) -> SingleFile:
    """`SingleFile(...)`, read once per process while the file is unchanged (loaders open each component)."""
    st = Path(path).stat()
    return _cached(str(Path(path).resolve()), (st.st_mtime_ns, st.st_size), family,
                   str(config_dir) if config_dir else None, ema)


__all__ = ["META", "WEIGHTS", "Component", "ComponentState", "SingleFile", "SingleFileError", "open_single_file"]
