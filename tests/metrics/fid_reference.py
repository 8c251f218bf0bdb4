"""pytorch-fid's InceptionV3 with random weights, as the FID tests' reference.

`fid_inception_v3()` downloads its weights with `load_state_dict_from_url`; here that call returns the
state dict of a randomly initialised model assembled exactly as `fid_inception_v3` assembles it, so
`InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)` is the real
reference code over random weights (drawn as `bench.fid_reference` explains).
"""

from __future__ import annotations

import importlib

import numpy as np

from bench.fid_reference import random_fid_state as bench_fid_state
from tests.reference_packages import reference_packages, require_reference_packages


def random_fid_state(seed: int = 0) -> dict:
    """A random state dict in the layout of pytorch-fid's `pt_inception-2015-12-05` file (torch tensors)."""
    require_reference_packages()
    return bench_fid_state(seed)


def reference_inception(state: dict, monkeypatch):
    """pytorch-fid's `InceptionV3([3])` (FID blocks, resize, normalisation) loading `state`, in eval mode."""
    with reference_packages():
        inc = importlib.import_module("pytorch_fid.inception")
        monkeypatch.setattr(inc, "load_state_dict_from_url", lambda url, progress=True: state)
        model = inc.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    return model.eval()


def reference_fid_module():
    """pytorch_fid.fid_score (its `calculate_frechet_distance`, `calculate_activation_statistics`)."""
    with reference_packages():
        return importlib.import_module("pytorch_fid.fid_score")


def reference_features(model, images: np.ndarray) -> np.ndarray:
    """Pool features [N, 2048] of float images [N, H, W, 3] in [0, 1], as pytorch-fid's get_activations."""
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))[0]
    return pred.squeeze(3).squeeze(2).numpy()


def pytorch_fid_on_files(state: dict, monkeypatch, image_dir, stats_out, npz_a, npz_b) -> float:
    """pytorch-fid's own pipeline: `save_fid_stats` of a folder into `stats_out`, then
    `calculate_fid_given_paths` of two npz files (as `python -m pytorch_fid A.npz B.npz`)."""
    with reference_packages():
        inc = importlib.import_module("pytorch_fid.inception")
        fid_score = importlib.import_module("pytorch_fid.fid_score")
        monkeypatch.setattr(inc, "load_state_dict_from_url", lambda url, progress=True: state)
        fid_score.save_fid_stats([str(image_dir), str(stats_out)], 2, "cpu", 2048, num_workers=0)
        return float(fid_score.calculate_fid_given_paths([str(npz_a), str(npz_b)], 2, "cpu", 2048, num_workers=0))
