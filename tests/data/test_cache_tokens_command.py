"""`jaxsd cache` with `data.cache.text: tokens` (the installed script, a tiny SD pipeline saved in the real
format): it writes token-id sidecars and a manifest naming the tokenizer; `jaxsd train` configured with
another tokenizer refuses the cache before doing any work."""

from __future__ import annotations

import shutil

import numpy as np

from jaxsd.data.manifest import fingerprint_folder, read_manifest
from jaxsd.data.records import read_sidecar
from jaxsd.data.store import EMPTY_CAPTION_KEY
from jaxsd.text.tokenizers import load_tokenizer
from tests.data.fakes import make_images
from tests.helpers import jaxsd_command
from tests.text.tiny import write_clip_tokenizer
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline


def test_cache_command_writes_token_ids_and_train_refuses_another_tokenizer(tmp_path):
    pipe = tiny_pipeline(tmp_path / "pipe")
    images = make_images(tmp_path / "images", 4)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"""
model: {{pretrained: {pipe}}}
train: {{run_dir: {tmp_path / 'run'}, steps: 2, batch_size: 2, data_source: cache}}
logging: {{progress_bar: false}}
data:
  roots: [{images}]
  image: {{resolution: {IMAGE_SIZE}}}
  cache: {{vae: {pipe}, text_encoder: {pipe}, text: tokens, dtype: float32, batch_size: 4}}
  loader: {{batch_size: 2, threads: 1, prefetch: 1}}
""")
    out = jaxsd_command("cache", yaml, "--no-progress").stdout
    assert "text 5 encoded / 0 reused" in out  # 4 captions + the empty one

    manifest = read_manifest(images)
    assert manifest["text"]["mode"] == "tokens" and manifest["text"]["suffix"] == "clip_ids"
    assert manifest["text"]["tokenizers"] == {"tokenizer": {"fingerprint": fingerprint_folder(pipe / "tokenizer"),
                                                            "max_length": 77}}
    assert set(manifest["entries"]) == {f"{i:03d}" for i in range(4)} and manifest["latents"]["suffix"] == "sd_vae"
    tok = load_tokenizer(pipe / "tokenizer")
    for key, caption in [("001", "caption 1"), (EMPTY_CAPTION_KEY, "")]:
        side = read_sidecar(images / f"{key}.clip_ids")
        ref = tok([caption])
        assert side.keys() == {"input_ids", "attention_mask"} and side["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(side["input_ids"], ref.input_ids[0])
        np.testing.assert_array_equal(side["attention_mask"], ref.attention_mask[0])

    # a trainer whose tokenizer pads with "!" (the same vocabulary otherwise): refused, exit 2, one message
    other = tmp_path / "other"
    write_clip_tokenizer(other / "tokenizer", pad_token="!")
    shutil.copytree(pipe / "text_encoder", other / "text_encoder")
    proc = jaxsd_command("train", yaml, f"data.cache.text_encoder={other}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "CacheMismatch" in proc.stderr and "tokenizers: cache has" in proc.stderr
    assert "--only text`" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
