"""Where LPIPS's and the style loss's weights come from: local files only, never a download.

Two files make LPIPS:
  * the VGG16 backbone: a torchvision state dict (`vgg16-397923af.pth`, which torchvision's
    `vgg16(weights="IMAGENET1K_V1")` saves in ~/.cache/torch/hub/checkpoints/), as `.pth` (a pickle:
    read only with allow_pickle=True, through `torch.load(weights_only=True)`) or `.safetensors`
    with the same keys (`features.N.weight/bias`; `classifier.*` is ignored);
  * the LPIPS v0.1 linear heads: the `lpips` package's `weights/v0.1/vgg.pth`
    (`lin0.model.1.weight` … `lin4.model.1.weight`), found in the installed package when there is one.

`save_lpips_safetensors` writes both as one `.safetensors` that loads without pickle:
`load_lpips(that_file)` then needs no heads path.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxsd.convert.folder import PICKLE_SUFFIXES, read_pickle_state
from jaxsd.convert.rules import ConversionSpec, torch_to_flax
from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.errors import InputError, InputNotFoundError
from jaxsd.losses.lpips import LPIPS
from jaxsd.losses.vgg import VGG16Features
from jaxsd.models.params import abstract_params

VGG_HINT = ("the VGG16 backbone is torchvision's ImageNet state dict `vgg16-397923af.pth` (torchvision's "
            "`vgg16(weights=\"IMAGENET1K_V1\")` saves it in ~/.cache/torch/hub/checkpoints/)")
HEADS_HINT = ("the LPIPS v0.1 linear heads are the `lpips` package's `weights/v0.1/vgg.pth` "
              "(`pip install lpips`, or github.com/richzhang/PerceptualSimilarity)")

VGG_SPEC = ConversionSpec(ignore=(r"classifier\..*", r"lin\d\.model\.1\.weight"))  # a combined file's heads
HEADS_SPEC = ConversionSpec(rename=((r"^lin(\d)\.model\.1\.", r"lin\1."),), ignore=(r"features\..*",))


def installed_heads() -> Path | None:
    """The installed `lpips` package's weights/v0.1/vgg.pth, or None (no package, or no file in it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


CONFIG_OPTIONS = {"weights": "loss.lpips.weights", "heads": "loss.lpips.heads",
                  "allow_pickle": "loss.lpips.allow_pickle=true"}  # what the errors tell the user to set


LPIPS_CONVERT = "convert once to .safetensors with jaxsd.losses.weights.save_lpips_safetensors"


def read_state(path: str | os.PathLike, *, allow_pickle: bool, what: str,
               opt_in: str = CONFIG_OPTIONS["allow_pickle"], convert: str = LPIPS_CONVERT) -> Mapping[str, np.ndarray]:
    """A state dict file (.safetensors, or a pickle with allow_pickle) as name -> array.
    opt_in: how the user allows pickles where this is read (a config key or a flag); convert: how to make a
    .safetensors copy instead; both for the refusal's message."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what}: {path} does not exist")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InputError(f"{what}: {path} is a pickle, and unpickling a file can run arbitrary code. Opt in with "
                             f"allow_pickle ({opt_in}; read with torch.load(weights_only=True)), or {convert}")
        return read_pickle_state(path)
    raise InputError(f"{what}: {path} is neither .safetensors nor a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})")


def _has_heads(state: Mapping[str, np.ndarray]) -> bool:
    return all(f"lin{i}.model.1.weight" in state for i in range(5))


def lpips_states(weights: str | os.PathLike | None, heads: str | os.PathLike | None = None, *,
                 allow_pickle: bool = False,
                 options: Mapping[str, str] = CONFIG_OPTIONS) -> tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]:
    """(backbone state, heads state) from the two paths; heads: `heads`, else the backbone file itself when
    it holds them (a `save_lpips_safetensors` file), else the installed `lpips` package's file.
    options: the names the user sets these by (CONFIG_OPTIONS, or a command's flags), for the errors."""
    if weights is None:
        found = installed_heads()
        raise InputNotFoundError(
            f"LPIPS needs two local files and none is downloaded: {options['weights']} (not set) — " + VGG_HINT
            + f"; {options['heads']} (" + (f"found in the installed lpips package: {found}" if found else "not set")
            + ") — " + HEADS_HINT + ".")
    backbone = read_state(weights, allow_pickle=allow_pickle, what=f"{options['weights']} (VGG16 backbone)",
                          opt_in=options["allow_pickle"])
    if heads is None and _has_heads(backbone):
        return backbone, backbone
    heads = heads if heads is not None else installed_heads()
    if heads is None:
        raise InputNotFoundError(f"LPIPS heads missing: {weights} has no lin0..lin4 weights, {options['heads']} is "
                                 f"not set and no lpips package is installed — {HEADS_HINT}. Set {options['heads']}.")
    return backbone, read_state(heads, allow_pickle=allow_pickle, what=f"{options['heads']} (LPIPS linear heads)",
                                opt_in=options["allow_pickle"])


def load_vgg16(state: Mapping[str, np.ndarray], *, source: str = "VGG16 weights") -> dict:
    """VGG16Features params from a torchvision-layout state dict (classifier and LPIPS heads ignored)."""
    abstract, _ = abstract_params(VGG16Features(), np.zeros((1, 32, 32, 3), np.float32))
    return torch_to_flax(state, abstract, spec=VGG_SPEC, source=source)


def lpips_params(backbone: Mapping[str, np.ndarray], head_state: Mapping[str, np.ndarray], *,
                 source: str = "LPIPS weights") -> dict:
    """LPIPS params {"vgg": ..., "lin0".."lin4": {"kernel": [C, 1]}} from the two state dicts."""
    abstract, _ = abstract_params(LPIPS(), *(np.zeros((1, 32, 32, 3), np.float32),) * 2)
    params = torch_to_flax(head_state, {k: v for k, v in abstract.items() if k != "vgg"}, spec=HEADS_SPEC,
                           source=f"{source} (LPIPS heads)")
    params["vgg"] = load_vgg16(backbone, source=f"{source} (VGG16 backbone)")
    return params


def load_lpips(weights: str | os.PathLike | None, heads: str | os.PathLike | None = None, *,
               allow_pickle: bool = False, options: Mapping[str, str] = CONFIG_OPTIONS) -> dict:
    """LPIPS params from local files: `weights` the VGG16 backbone, `heads` the linear heads (see module doc);
    options: as `lpips_states`."""
    backbone, head_state = lpips_states(weights, heads, allow_pickle=allow_pickle, options=options)
    return lpips_params(backbone, head_state, source=f"{weights} + {heads or 'its heads'}")


def save_lpips_safetensors(weights: str | os.PathLike, heads: str | os.PathLike | None, out: str | os.PathLike, *,
                           allow_pickle: bool = False) -> Path:
    """Write the VGG16 features and the LPIPS heads as one `.safetensors` (torch key layout, fp32): a file
    `load_lpips(out)` reads without pickle or a heads path. The classifier is left out (528 MB of 553).

    Both are checked against the model first, so a wrong file is refused before anything is written."""
    backbone, head_state = lpips_states(weights, heads, allow_pickle=allow_pickle)
    lpips_params(backbone, head_state, source=f"{weights} + {heads or 'its heads'}")
    state = {k: np.asarray(backbone[k], np.float32) for k in backbone if k.startswith("features.")}
    state.update({k: np.asarray(head_state[k], np.float32) for k in head_state if k.startswith("lin")})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out, {"format": "pt", "jaxsd": "lpips-vgg16-v0.1"})
    return out
