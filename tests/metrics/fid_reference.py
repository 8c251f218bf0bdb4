"""pytorch-fid's InceptionV3 with random weights, as the FID tests' reference.

`fid_inception_v3()` downloads its weights with `load_state_dict_from_url`; here that call returns the
state dict of a randomly initialised model assembled exactly as `fid_inception_v3` assembles it, so
`InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)` is the real
reference code over random weights. The weights are drawn so activations stay O(1) through the 20-odd
conv layers (torchvision's default init shrinks them ~3× per layer, which would make a parity test of
the pool features compare near-zeros): He-normal convs, BatchNorm affine and running statistics
around the identity.
"""

from __future__ import annotations

import importlib

import numpy as np

from tests.reference_packages import reference_packages


def random_fid_state(seed: int = 0) -> dict:
    """A random state dict in the layout of pytorch-fid's `pt_inception-2015-12-05` file (torch tensors)."""
    import torch

    with reference_packages():
        inc = importlib.import_module("pytorch_fid.inception")
        model = inc._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        model.Mixed_5b = inc.FIDInceptionA(192, pool_features=32)
        model.Mixed_5c = inc.FIDInceptionA(256, pool_features=64)
        model.Mixed_5d = inc.FIDInceptionA(288, pool_features=64)
        model.Mixed_6b = inc.FIDInceptionC(768, channels_7x7=128)
        model.Mixed_6c = inc.FIDInceptionC(768, channels_7x7=160)
        model.Mixed_6d = inc.FIDInceptionC(768, channels_7x7=160)
        model.Mixed_6e = inc.FIDInceptionC(768, channels_7x7=192)
        model.Mixed_7b = inc.FIDInceptionE_1(1280)
        model.Mixed_7c = inc.FIDInceptionE_2(2048)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            value = 0.75 + 0.5 * torch.rand(value.shape, generator=gen)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * torch.randn(value.shape, generator=gen)
        state[key] = value
    return state


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
