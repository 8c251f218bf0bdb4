"""VGG16's convolutional trunk (torchvision's `vgg16().features`) in Flax, NHWC.

Params are named as torchvision's state dict, so the generic conversion rules load it:
`features.0.weight` ⇔ `features_0/kernel` (OIHW ⇔ HWIO). The classifier (fully connected
layers, 124M of VGG16's 138M params) is never built: perceptual losses use the features only.

The taps are the ReLU outputs LPIPS and style losses read, named as in the `lpips` package:
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. Inputs are what torchvision's VGG expects after its
own normalisation; LPIPS applies its ScalingLayer first (`jaxsd.losses.lpips`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.losses.taps import TAPS, check_taps
from jaxsd.models.layers import Conv

# torchvision's configuration "D": channels of each 3x3 conv, "M" a 2x2 max pool. Each conv is
# followed by a ReLU, so torchvision's `features` index of a layer counts convs, ReLUs and pools.
VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Features(nn.Module):
    """VGG16 conv trunk. x [B, H, W, 3] → {tap: [B, H/2^k, W/2^k, C]} for the requested taps.

    Stops after the deepest requested tap (style over relu1_2..relu3_3 never runs the 512-wide layers).
    """

    taps: tuple[str, ...] = tuple(TAPS)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        check_taps(self.taps, "VGG16Features.taps")
        last = max(TAPS[t] for t in self.taps)
        wanted = {TAPS[t]: t for t in self.taps}
        out: dict[str, jax.Array] = {}
        index = 0
        h = x.astype(self.dtype)
        for layer in VGG16_LAYERS:
            if layer == "M":
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
                index += 1
            else:
                h = Conv(int(layer), kernel_size=3, padding=1, dtype=self.dtype, name=f"features_{index}")(h)
                h = nn.relu(h)
                if index + 1 in wanted:
                    out[wanted[index + 1]] = h
                index += 2
            if index > last:
                break
        return out
