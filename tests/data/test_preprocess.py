"""Bucket assignment and SDXL crop metadata for known sizes."""

import numpy as np
import pytest
from PIL import Image

from jaxsd.data.buckets import closest_bucket, make_buckets, target_size
from jaxsd.data.config import BucketConfig, DataConfig, ImageConfig, check_data_config
from jaxsd.data.images import prepare, resize_cover


def test_buckets_equal_area_multiples_of_64():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (448, 576) in buckets and (576, 448) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.93 * 512 * 512 <= h * w <= 512 * 512, (h, w)
        assert (w, h) in buckets  # symmetric
    # the SDXL buckets everyone knows
    sdxl = make_buckets(1024, min_side=512, max_side=2048)
    assert {(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (1344, 768)} <= set(sdxl)


@pytest.mark.parametrize("hw,bucket", [((768, 1024), (448, 576)), ((1024, 1024), (512, 512)),
                                       ((1024, 768), (576, 448)), ((100, 1000), (256, 1024)),
                                       ((600, 1000), (384, 640)), ((350, 1000), (320, 768)), ((300, 1000), (256, 1024))])
def test_closest_bucket(hw, bucket):
    assert closest_bucket(*hw, make_buckets(512)) == bucket


def test_target_size_fixed_and_bucketed():
    assert target_size(300, 900, ImageConfig(resolution=512)) == (512, 512)
    cfg = ImageConfig(resolution=512, buckets=BucketConfig(enabled=True))
    assert target_size(768, 1024, cfg) == (448, 576)


def _image(w, h):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_center_crop_metadata_and_pixels():
    img = _image(100, 50)  # scale 64/50 = 1.28 -> 128x64, center crop 64x64 at left 32
    p = prepare(img, 64, 64, crop="center")
    np.testing.assert_array_equal(p.time_ids, [50, 100, 0, 32, 64, 64])
    ref = np.asarray(resize_cover(img, 64, 64))[:, 32:96].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(p.pixels, ref, atol=1e-6)
    assert p.pixels.shape == (64, 64, 3) and p.pixels.min() >= -1 and p.pixels.max() <= 1


def test_random_crop_and_flip_metadata():
    img = _image(64, 200)  # portrait: resized 64x200 (scale 1), spare height 136
    p = prepare(img, 64, 64, crop="random", rng=np.random.default_rng(3))
    top = int(p.time_ids[2])
    assert 0 <= top <= 136 and p.time_ids[3] == 0
    ref = np.asarray(img)[top:top + 64].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(p.pixels, ref, atol=1e-6)
    # flipped: pixels mirrored, crop-left mirrored within the resized width
    img2 = _image(100, 50)
    f = prepare(img2, 64, 48, crop="center", flip=True)  # resized 100x50? scale=max(64/50,48/100)=1.28 -> 128x64
    plain = prepare(img2, 64, 48, crop="center")
    np.testing.assert_allclose(f.pixels, plain.pixels[:, ::-1], atol=0)
    assert plain.time_ids[3] == 40 and f.time_ids[3] == 128 - 48 - 40
    np.testing.assert_array_equal(f.time_ids[[0, 1, 4, 5]], [50, 100, 64, 48])


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="data.image.crop='middle'"):
        check_data_config(DataConfig(image=ImageConfig(crop="middle")))
    with pytest.raises(ValueError, match="data.validation.too_small"):
        from jaxsd.data.config import ValidationConfig
        check_data_config(DataConfig(validation=ValidationConfig(too_small="grow")))
