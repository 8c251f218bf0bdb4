"""The cache manifest: what produced a root's cached latents and text embeddings.

Trainers in the wild have silently trained on latents from another VAE, or at
another scale; here the metadata travels with the data. Each dataset root has a
`jaxsd_cache.json`:

    {"format": "jaxsd-cache", "version": 1,
     "latents": {"suffix", "vae_fingerprint", "scaling_factor", "shift_factor", "latent_channels",
                 "latents_mean", "latents_std", "mode", "dtype", "resolution", "buckets", "crop", "flip"},
     "text":    {"suffix", "encoder_fingerprint", "max_length", "dtype", ...producer details}
                or, for token ids, {"suffix", "mode": "tokens", "tokenizers": {name: {"fingerprint",
                "max_length"}}, "max_length", "dtype": "int32"},
     "entries": {key: {"bucket": [h, w], "image": sig, "caption": sig}}}

`verify_manifest` compares a root's manifest with the spec of the model being
trained and refuses a mismatch, naming the field and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxsd.convert.folder import ShardedState, open_weights
from jaxsd.convert.safetensors_io import SafetensorsFile
from jaxsd.convert.single_file.read import WEIGHTS
from jaxsd.convert.single_file.to_folder import POINTER
from jaxsd.errors import InputError, InputNotFoundError

MANIFEST = "jaxsd_cache.json"
FORMAT_VERSION = 1
# config.json keys that change when a folder is re-saved by another library version, not the model.
_VOLATILE_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash")
_PICKLE = (".bin", ".ckpt", ".pt", ".pth")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_fingerprint_memo: dict[tuple, str] = {}


class CacheMismatch(InputError):
    """A cache made by a different model/settings than the run that wants to use it."""


def _hash_state(state: Mapping[str, np.ndarray], h) -> None:
    # Hash tensor names, dtypes, shapes and bytes (not the header text or the sharding), so
    # the same weights written by another tool, in another order or split differently
    # fingerprint the same (a single file's component too: its diffusers tensors are hashed).
    for name in sorted(state):
        arr = state[name]
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)


def _memo_file() -> Path:
    return Path(os.environ.get("JAXSD_CACHE_DIR") or Path.home() / ".cache" / "jaxsd") / "fingerprints.json"


def _load_memo() -> dict[str, str]:
    try:
        return json.loads(_memo_file().read_text())
    except (OSError, ValueError):
        return {}  # no memo yet (or unreadable): fingerprints are recomputed, never guessed


def _save_memo(key: str, digest: str) -> None:
    # Hashing a 10 GB T5 takes many seconds; remember (paths, sizes, mtimes) -> digest across runs,
    # like git's index. Writing is best effort: without the memo only speed is lost.
    path = _memo_file()
    try:
        memo = _load_memo()
        memo[key] = digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass


def fingerprint_folder(folder: str | os.PathLike) -> str:
    """sha256 over a component folder: its config.json (minus version keys), every safetensors
    file's tensors, and every other small file (tokenizer vocab/merges...). Memoized per
    (paths, sizes, mtimes), in this process and in `$JAXSD_CACHE_DIR/fingerprints.json`
    (default ~/.cache/jaxsd), so a big encoder is hashed once, not at every run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"cannot fingerprint {folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    key = (str(folder.resolve()),) + tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key in _fingerprint_memo:
        return _fingerprint_memo[key]
    disk_key = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    if disk_key in (memo := _load_memo()):
        _fingerprint_memo[key] = memo[disk_key]
        return memo[disk_key]
    h = hashlib.sha256()
    checkpoints: dict[str, list[Path]] = {}
    for p in files:
        if p.name == POINTER:  # a component of a single file (jaxsd/convert/single_file): its tensors below
            continue
        if p.suffix in _PICKLE and has_safetensors:
            continue  # a leftover pickle copy of the same weights is not what jaxsd loads
        if p.suffix == ".safetensors":
            # shards of one checkpoint hash as one (the same weights, however split)
            checkpoints.setdefault(_SHARD.sub("", p.name[: -len(".safetensors")]), []).append(p)
            continue
        if p.name.endswith(".index.json") or p.name.endswith(".safetensors.index.json"):
            continue  # shard layout, not content
        h.update(str(p.relative_to(folder)).encode())
        if p.name == "config.json":
            cfg = {k: v for k, v in json.loads(p.read_text()).items() if k not in _VOLATILE_KEYS}
            h.update(json.dumps(cfg, sort_keys=True).encode())
        else:
            h.update(p.read_bytes())
    if (folder / POINTER).is_file():
        checkpoints[WEIGHTS[json.loads((folder / POINTER).read_text())["component"]]] = []
    for stem, paths in sorted(checkpoints.items()):
        h.update(f"checkpoint:{stem}".encode())
        _hash_state(open_weights(folder, stem) if not paths else ShardedState([SafetensorsFile(p) for p in paths]), h)
    digest = h.hexdigest()
    _fingerprint_memo[key] = digest
    _save_memo(disk_key, digest)
    return digest


def combine_fingerprints(parts: list[str]) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def file_signature(path: str | os.PathLike) -> str:
    """Cheap change detector for a source image: size and modification time."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def text_signature(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The root's manifest, or None if it has none (not cached yet)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    with open(path) as fh:
        data = json.load(fh)
    if data.get("format") != "jaxsd-cache":
        raise CacheMismatch(f"{path} is not a jaxsd cache manifest")
    if data.get("version") != FORMAT_VERSION:
        raise CacheMismatch(f"{path}: cache format version {data.get('version')}, this jaxsd reads {FORMAT_VERSION}; "
                            "rebuild the cache with `jaxsd cache CONFIG`")
    return data


def write_manifest(root: str | os.PathLike, data: Mapping) -> None:
    """Write atomically (temp file + rename): a killed run never leaves a half manifest."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"format": "jaxsd-cache", "version": FORMAT_VERSION, **data}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def _normalize(value):
    return json.loads(json.dumps(value))  # tuples -> lists, so specs compare like their JSON


def spec_differences(stored: Mapping, expected: Mapping) -> list[tuple[str, object, object]]:
    """(field, cached value, expected value) for every field of `expected` the cache disagrees on."""
    diffs = []
    for k, v in expected.items():
        if _normalize(stored.get(k)) != _normalize(v):
            diffs.append((k, stored.get(k), v))
    return diffs


def _short(v) -> str:
    if isinstance(v, str) and len(v) > 24:  # a fingerprint: its first hex digits identify it
        return json.dumps(v[:16] + "…", ensure_ascii=False)
    return json.dumps(v)


_MODE_NAMES = {"embeddings": "embeddings", "tokens": "token ids"}


def _text_mode(spec: Mapping) -> str:
    """"tokens" for a token-id cache's text spec, else "embeddings" (specs before token ids had no mode)."""
    return "tokens" if spec.get("mode") == "tokens" else "embeddings"


def verify_manifest(root: str | os.PathLike, *, latents: Mapping | None = None, text: Mapping | None = None,
                    rebuild: str = "jaxsd cache CONFIG") -> dict:
    """Check that `root`'s cache was made by what this run expects; return the manifest.

    latents / text: the expected spec (`LatentSpec.to_dict()` / `TextSpec.to_dict()` of the
    model being trained), or None to not check that kind. Raises CacheMismatch naming every
    differing field and the command that rebuilds the cache.
    """
    manifest = read_manifest(root)
    if manifest is None:
        raise CacheMismatch(f"{root}: no cache ({MANIFEST} missing). Build it with `{rebuild}`.")
    problems = []
    for kind, expected in (("latents", latents), ("text", text)):
        if expected is None:
            continue
        stored = manifest.get(kind)
        if stored is None:
            problems.append(f"no cached {kind}; build them with `{rebuild} --only {kind}`")
            continue
        diffs = spec_differences(stored, expected)
        held, wanted = _text_mode(stored), _text_mode(expected)
        if kind == "text" and held != wanted:  # one sentence, not every field the two layouts do not share
            problems.append(f"the cache holds text {_MODE_NAMES[held]} but this run expects {_MODE_NAMES[wanted]} "
                            f"(data.cache.text_mode={wanted}); rebuild them with `{rebuild} --only text`, or set "
                            f"data.cache.text_mode={held}")
        elif diffs:
            fields = "; ".join(f"{k}: cache has {_short(a)}, this run expects {_short(b)}" for k, a, b in diffs)
            problems.append(f"cached {kind} do not match this run ({fields}); rebuild them with "
                            f"`{rebuild} --only {kind}`")
    if problems:
        raise CacheMismatch(f"{root}: " + "\n  ".join(problems))
    return manifest
