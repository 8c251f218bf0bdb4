"""The VGG16 layers perceptual losses read, by name (jax-free: config checks use it)."""

from __future__ import annotations

from collections.abc import Sequence

from jaxsd.errors import InputError

# tap name (as the `lpips` package names them) -> index in torchvision's `vgg16().features` of the
# ReLU whose output it is
TAPS: dict[str, int] = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}


def check_taps(taps: Sequence[str], where: str) -> None:
    """Refuse an empty list or names VGG16Features does not have, naming the valid ones."""
    unknown = [t for t in taps if t not in TAPS]
    if unknown or not taps:
        raise InputError(f"{where}: VGG16 layers {list(taps)!r} — "
                         f"{'unknown ' + repr(unknown) if unknown else 'none given'}; choose from {list(TAPS)}")
