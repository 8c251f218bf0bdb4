"""The FID InceptionV3's weights: pytorch-fid's `.pth` (a pickle: read only with --allow-pickle) or the
`.safetensors` jaxsd writes of it.

    jaxsd eval --stats REAL_DIR --out real_stats.npz --fid-weights pt_inception-2015-12-05-6726825d.pth --allow-pickle

The state-dict layout is pytorch-fid's `fid_inception_v3()` model (torchvision Inception3 names); its
1008-class `fc` head and BatchNorm `num_batches_tracked` counters are not needed for pool features and
are skipped. `save_fid_weights` writes the same names as safetensors, which loads without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxsd.convert.folder import PICKLE_SUFFIXES
from jaxsd.convert.rules import ConversionSpec, flax_to_torch, torch_to_flax
from jaxsd.convert.safetensors_io import save_file
from jaxsd.errors import InputError, InputNotFoundError
from jaxsd.losses.weights import read_state
from jaxsd.metrics.inception import FIDInceptionV3, example_inputs
from jaxsd.models.params import abstract_params

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
FID_SPEC = ConversionSpec(ignore=(r"fc\.(weight|bias)", r".*\.num_batches_tracked"))
SAFETENSORS_HOW = "convert once with `jaxsd eval --fid-weights X.pth --allow-pickle --save-fid-weights X.safetensors`"


def where_to_get() -> str:
    """The hint every missing-weights error ends with."""
    return (f"FID needs pytorch-fid's InceptionV3 weights {FID_WEIGHTS_FILE} (download it once from "
            f"{FID_WEIGHTS_URL}) and pass its path with --fid-weights; the .pth is a pickle, read with "
            "torch.load(weights_only=True) only with --allow-pickle, or pass the .safetensors copy "
            "`jaxsd eval --fid-weights X.pth --allow-pickle --save-fid-weights X.safetensors` writes")


def load_fid_weights(path: str | os.PathLike | None, *, allow_pickle: bool = False) -> dict:
    """Flax params of `FIDInceptionV3` from a `.safetensors` copy, or pytorch-fid's `.pth` (allow_pickle; needs
    torch) — the same opt-in as every other pickle jaxsd reads."""
    if path is None:
        raise InputNotFoundError(f"no --fid-weights given. {where_to_get()}")
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file. {where_to_get()}")
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise InputError(f"{path}: expected a .pth (pytorch-fid) or .safetensors file. {where_to_get()}")
    try:
        state = read_state(path, allow_pickle=allow_pickle, what="--fid-weights", opt_in="--allow-pickle",
                           convert=SAFETENSORS_HOW)
    except ImportError:
        raise InputError(f"{path}: reading a PyTorch pickle needs torch installed; convert it once where torch "
                         f"is: {SAFETENSORS_HOW}") from None
    abstract, _ = abstract_params(FIDInceptionV3(), *example_inputs())
    return torch_to_flax(state, abstract, spec=FID_SPEC, source=str(path))


def save_fid_weights(params: dict, path: str | os.PathLike) -> None:
    """Write `params` as safetensors under pytorch-fid's state-dict names (fp32)."""
    if Path(path).suffix != ".safetensors":
        raise InputError(f"--save-fid-weights {path}: the copy is a .safetensors file")
    save_file(flax_to_torch(params, spec=FID_SPEC), path, metadata={"format": "pt", "source": FID_WEIGHTS_FILE})
