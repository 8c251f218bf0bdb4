"""Losses that are models: VGG16 features, LPIPS and Gram-matrix style losses (Flax, NHWC).

Weights are read only from local files (`jaxsd.losses.weights`); nothing is downloaded.
"""
