"""Metrics that judge images: `image_quality.py` (PSNR, SSIM), `pairs.py` (same-named image pairs of two
folders, as `jaxsd eval --pairs` reads them), `clip_score.py` (image-prompt agreement, as torchmetrics'
CLIPScore), and FID — `inception.py` (pytorch-fid's InceptionV3), `fid_weights.py`, `fid_folder.py`
(features of a folder, `jaxsd eval --stats`), `fid.py` (statistics, distance)."""
