"""`build_cache` over the generated dataset: sidecars, manifest, resume, correctness, refusal, packing."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from jaxsd.data.buckets import target_size
from jaxsd.data.cache import EMPTY_CAPTION_KEY, build_cache
from jaxsd.data.config import BucketConfig, CacheConfig, DataConfig, ImageConfig, LoaderConfig
from jaxsd.data.images import decode, prepare, read_bytes, to_rgb
from jaxsd.data.manifest import MANIFEST, CacheMismatch, read_manifest, verify_manifest
from jaxsd.data.pack import pack_cache
from jaxsd.data.records import read_sidecar
from tests.data.dataset import make_dataset
from tests.data.fakes import (
    fake_text,
    fake_text_apply,
    fake_vae,
    fake_vae_apply,
    save_fake_text,
    save_fake_vae,
)
from tests.data.test_validate import rel, simulate_root_permissions


def data_config(root, **cache):
    return DataConfig(roots=(str(root),),
                      image=ImageConfig(resolution=64, random_flip=True, buckets=BucketConfig(True, 32, 128, 16)),
                      cache=CacheConfig(dtype="float32", batch_size=4, caption_blocklist=("forbidden",), **cache),
                      loader=LoaderConfig(batch_size=2, threads=2))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    simulate_root_permissions(mp)
    base = tmp_path_factory.mktemp("cache")
    expect = make_dataset(base / "ds")
    cfg = data_config(base / "ds")
    vae = fake_vae(save_fake_vae(base / "vae", 0), cfg)
    te = fake_text(save_fake_text(base / "te", 0), cfg)
    result = build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    yield base, cfg, vae, te, expect, result
    mp.undo()


def test_cache_writes_sidecars_manifest_and_report(cached):
    base, cfg, vae, te, expect, result = cached
    root = base / "ds"
    kept = expect["kept_good"] | expect["altered"]
    assert rel(root, result.report.files("skipped")) == expect["skipped"]
    assert rel(root, result.report.files("dropped")) == expect["dropped"]
    assert result.encoded == {"latents": len(kept), "text": len(kept) + 1}  # + the empty caption
    report = json.loads((root / "jaxsd_validation.json").read_text())
    assert {os.path.relpath(f["path"], root) for f in report["files"] if f["action"] != "altered"} == \
        expect["skipped"] | expect["dropped"]
    manifest = read_manifest(root)
    assert manifest["latents"] == json.loads(json.dumps(vae.spec)) and manifest["text"]["suffix"] == "fake_te"
    keys = {os.path.splitext(k)[0] for k in kept}
    assert set(manifest["entries"]) == keys
    for key in keys:
        assert (root / f"{key}.{vae.suffix}").is_file() and (root / f"{key}.fake_te").is_file()
    assert (root / f"{EMPTY_CAPTION_KEY}.fake_te").is_file()
    # the bucket recorded is the one the image's (EXIF-rotated) size maps to
    assert manifest["entries"]["exif_rotated"]["bucket"] == list(target_size(96, 64, cfg.image)) == [80, 48]
    assert manifest["entries"]["good_03"]["bucket"] == [48, 80]  # 128x64 landscape


def test_cached_values_match_direct_encoding(cached):
    base, cfg, vae, te, _, _ = cached
    root = base / "ds"
    rgb, _ = to_rgb(decode(read_bytes(root / "good_05.png")))  # 80x80 -> bucket 64x64, center crop
    side = read_sidecar(root / f"good_05.{vae.suffix}")
    for flip, tag in ((False, ""), (True, "_flipped")):
        p = prepare(rgb, 64, 64, crop="center", flip=flip)
        ref = fake_vae_apply(vae.params, {"pixels": p.pixels[None]})
        np.testing.assert_allclose(side["latent_mean" + tag], ref["latent_mean"][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(side["latent_logvar" + tag], ref["latent_logvar"][0], rtol=1e-5)
        np.testing.assert_array_equal(side["time_ids" + tag], p.time_ids)
    text = read_sidecar(root / "good_05.fake_te")
    ref = fake_text_apply(te.params, te.prepare(["a picture number 5"]))
    np.testing.assert_allclose(text["encoder_hidden_states"], ref["encoder_hidden_states"][0], rtol=1e-6)
    assert text["pooled"].shape == (16,)


def test_resume_skips_current_and_redoes_changed(cached, tmp_path):
    base, cfg, vae, te, _, _ = cached
    ds = tmp_path / "ds"
    shutil.copytree(base / "ds", ds)
    os.chmod(ds / "noperm.png", 0)
    cfg2 = dataclasses.replace(cfg, roots=(str(ds),))
    vae2, te2 = fake_vae(base / "vae", cfg2), fake_text(base / "te", cfg2)
    quiet = dict(progress=False, log=lambda s: None)
    mp = pytest.MonkeyPatch()
    simulate_root_permissions(mp)
    try:
        again = build_cache(cfg2, vae=vae2, text=te2, **quiet)
        assert again.encoded == {"latents": 0, "text": 0}
        (ds / "good_01.txt").write_text("a new caption")
        os.utime(ds / "good_02.webp", ns=(1, 1))  # image "changed"
        os.remove(ds / f"good_03.{vae.suffix}")     # a sidecar lost mid-run
        (ds / "good_04.fake_te").write_bytes(b"\x00" * 5)  # a truncated sidecar
        only_text = build_cache(cfg2, vae=vae2, text=te2, only="text", **quiet)
        assert only_text.encoded == {"latents": 0, "text": 2}
        # latents of good_02/good_03 are stale: those two are left out of the manifest until rebuilt
        assert {"good_02", "good_03"}.isdisjoint(read_manifest(ds)["entries"])
        only_latents = build_cache(cfg2, vae=vae2, text=te2, only="latents", **quiet)
        assert only_latents.encoded == {"latents": 2, "text": 0}
        assert {"good_02", "good_03"} <= set(read_manifest(ds)["entries"])
    finally:
        mp.undo()


def test_trainer_refuses_cache_from_another_vae(cached, tmp_path):
    base, cfg, vae, te, _, _ = cached
    other = fake_vae(save_fake_vae(tmp_path / "other_vae", 1), cfg)
    assert other.spec["vae_fingerprint"] != vae.spec["vae_fingerprint"]
    verify_manifest(base / "ds", latents=vae.spec, text=te.spec)  # the right one passes
    with pytest.raises(CacheMismatch) as e:
        verify_manifest(base / "ds", latents=other.spec, text=te.spec, rebuild="jaxsd cache run.yaml")
    msg = str(e.value)
    assert "vae_fingerprint" in msg and "jaxsd cache run.yaml --only latents" in msg and "text" not in msg.split(";")[0]
    scaled = dict(vae.spec, scaling_factor=0.13025)
    with pytest.raises(CacheMismatch, match=r"scaling_factor: cache has 0.5, this run expects 0.13025"):
        verify_manifest(base / "ds", latents=scaled)
    with pytest.raises(CacheMismatch, match="max_length"):
        verify_manifest(base / "ds", text=dict(te.spec, max_length=77))
    with pytest.raises(CacheMismatch, match="no cache"):
        verify_manifest(tmp_path, latents=vae.spec)


def test_pack_holds_the_same_samples(cached, tmp_path):
    base, cfg, vae, te, _, _ = cached
    from jaxsd.data.store import open_store

    out = pack_cache(cfg, tmp_path / "packed", records_per_shard=10)
    manifest = read_manifest(out)
    assert len(manifest["shards"]) == 4 and (out / MANIFEST).is_file()
    packed = open_store(dataclasses.replace(cfg, packed=(str(out),)), latents=vae.spec, text=te.spec)
    sidecars = open_store(cfg, latents=vae.spec, text=te.spec)
    assert len(packed) == len(sidecars) and list(packed.bucket_ids()) == list(sidecars.bucket_ids())
    empty_a, empty_b = packed.empty_text(), sidecars.empty_text()  # "" travels with the pack
    assert empty_a.keys() == empty_b.keys() == {"encoder_hidden_states", "pooled"}
    np.testing.assert_array_equal(empty_a["encoder_hidden_states"], empty_b["encoder_hidden_states"])
    for i in (0, 7, len(packed) - 1):
        for flip in (False, True):
            a, b = packed.read(i, flip), sidecars.read(i, flip)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_the_cached_dataset_loads(cached):
    from jaxsd.data.loader import Loader

    base, cfg, vae, te, expect, _ = cached
    loader = Loader(cfg, latents=vae.spec, text=te.spec)
    ids = loader.store.bucket_ids()
    seen = []
    for _ in range(loader.steps_per_epoch):
        b = next(loader)
        assert len(set(ids[b["index"]])) == 1 and b["latent_mean"].dtype == np.float32
        seen += list(b["index"])
    assert len(seen) == len(set(seen)) >= len(loader.store) - len(loader.store.bucket_list)  # remainders only


def test_interrupted_rebuild_never_leaves_a_mixed_cache(tmp_path):
    """Re-caching with another VAE drops the old latents from the manifest before overwriting any
    sidecar; a run killed halfway is refused as "no cached latents", and a sidecar that does not
    match its manifest is refused at read time."""
    import jaxsd.data.cache as cache_mod
    from jaxsd.data.records import SidecarMismatch, write_sidecar
    from jaxsd.data.store import open_store
    from tests.data.fakes import make_images, small_config

    cfg = small_config(make_images(tmp_path / "ds", 12))
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, latent_suffix="fake_vae"))
    vae, te = fake_vae(save_fake_vae(tmp_path / "vae", 0), cfg), fake_text(save_fake_text(tmp_path / "te", 0), cfg)
    build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    other = fake_vae(save_fake_vae(tmp_path / "other_vae", 1), cfg)
    assert other.suffix == vae.suffix  # same family: the same sidecar names get overwritten
    written = []

    def dies_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(args[0])
        write_sidecar(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(cache_mod, "write_sidecar", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, vae=other, text=te, only="latents", progress=False, log=lambda s: None)
    mp.undo()
    with pytest.raises(CacheMismatch, match="no cached latents"):
        verify_manifest(cfg.roots[0], latents=vae.spec, text=te.spec)
    # a sidecar from another producer under a manifest that names the first one
    build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)
    store = open_store(cfg, latents=vae.spec, text=te.spec)
    _, key, _, _ = store.entries[0]
    write_sidecar(written[0].with_name(f"{key}.{vae.suffix}"), read_sidecar(written[0]), spec=other.spec, source="x")
    with pytest.raises(SidecarMismatch, match="not made by the producer"):
        store.read(0)
