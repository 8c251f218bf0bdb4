"""Metrics that judge images: `image_quality.py` (PSNR, SSIM) and `pairs.py` (same-named image pairs of two
folders, as `jaxsd eval --pairs` reads them), `clip_score.py` (image-prompt agreement, as torchmetrics' CLIPScore)."""
