"""`jaxsd cache --pack DIR`: copy a sidecar cache into ArrayRecord shards for pods and object stores.

Millions of small sidecar files are slow to list and read from object storage;
a few large ArrayRecord shards with random access are not. The pack directory
has the same manifest format (`jaxsd_cache.json`, with a "shards" list and each
entry's global "record" number), so the loader and `verify_manifest` treat it
like any cache root (`data.packed=[DIR]`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from jaxsd.data.config import DataConfig
from jaxsd.data.manifest import text_signature, write_manifest
from jaxsd.data.records import encode_record, read_sidecar, sidecar_path, write_sidecar
from jaxsd.data.store import EMPTY_CAPTION_KEY, SidecarStore, open_store


def pack_cache(cfg: DataConfig, out_dir: str | os.PathLike, *, records_per_shard: int = 4096) -> Path:
    """Write every cached sample of `cfg`'s sources into `out_dir` as ArrayRecord shards + manifest."""
    from array_record.python.array_record_module import ArrayRecordWriter

    store = open_store(dataclasses.replace(cfg, packed=()))
    assert isinstance(store, SidecarStore)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(store)
    shards = [f"data-{s:05d}-of-{-(-n // records_per_shard):05d}.array_record"
              for s in range(-(-n // records_per_shard))]
    entries = {}
    writer = None
    for i, (loc, key, bucket, entry) in enumerate(store.entries):
        if i % records_per_shard == 0:
            if writer is not None:
                writer.close()
            # group_size:1 makes every record individually addressable (random access)
            writer = ArrayRecordWriter(str(out / shards[i // records_per_shard]), "group_size:1")
        arrays = {}
        for spec in (store.latents, store.text):
            if spec is not None:
                arrays.update(read_sidecar(sidecar_path(store.roots[loc], key, spec["suffix"]), spec))
        name = f"{loc}/{key}"
        writer.write(encode_record(arrays, {"key": name}))
        entries[name] = {"bucket": list(bucket), "record": i, **({"text": entry["text"]} if "text" in entry else {})}
    if writer is not None:
        writer.close()
    empty = store.empty_text()
    if empty is not None:  # the empty caption travels with the pack (conditioning dropout)
        write_sidecar(sidecar_path(out, EMPTY_CAPTION_KEY, store.text["suffix"]), empty, spec=store.text,
                      source=text_signature(""))
    write_manifest(out, {"latents": store.latents, "text": store.text, "shards": shards,
                         "roots": store.roots, "entries": entries})
    return out
