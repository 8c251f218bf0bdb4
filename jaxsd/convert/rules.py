"""Name and layout rules between PyTorch state dicts and Flax param trees.

One mechanism for every model (UNet, VAE, CLIP, T5, projections). Flax module
names mirror the PyTorch ones, so the mapping is a few generic rules:

* a list index `.N` in PyTorch is `_N` on the preceding name in Flax
  (`down_blocks.0.resnets.1` ⇔ `down_blocks_0/resnets_1`). Going back, `name_N`
  splits only for names that are PyTorch module lists (`LIST_CONTAINERS`), so
  `time_embedding.linear_1` stays `linear_1`;
* `weight` ⇔ `kernel` (convs OIHW ⇔ HWIO, linears `.T`), `scale` (norms) or
  `embedding` (embeddings), whichever the Flax tree has at that module;
* a 1×1 conv weight loads into a linear kernel (legacy VAE attention checkpoints);
* `bias` ⇔ `bias`; any other leaf name passes through unchanged.

Model-specific exceptions (renames of legacy keys, buffers to ignore, tied
weights) live in a `ConversionSpec` next to each model. Every tensor is
accounted for: missing, unexpected and mis-shaped names raise one error.
The target layout comes from `jax.eval_shape` of the model — nothing random is
ever allocated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jax
import numpy as np
from einops import rearrange
from flax import traverse_util

from jaxsd.errors import InputError
from jaxsd.models.names import (
    LIST_CONTAINERS,  # noqa: F401  (re-exported: the rule lives with the models)
    flax_module_path,
    torch_module_name,
)

Path = tuple[str, ...]


@dataclass(frozen=True)
class ConversionSpec:
    """Model-specific exceptions to the generic rules.

    rename: (regex, replacement) applied in order to each PyTorch key on load.
    ignore: regexes of PyTorch keys that are buffers/derived and not parameters.
    tied:   PyTorch key -> key it duplicates; on load the duplicate is checked
            and dropped, on save it is written again (e.g. T5 `encoder.embed_tokens`).
    """

    rename: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    tied: Mapping[str, str] = field(default_factory=dict)


class ConversionError(InputError):
    """A checkpoint that does not fit the model: every offending name is listed."""


def _module_path(torch_key: str) -> tuple[Path, str]:
    module, _, leaf = torch_key.rpartition(".")
    return (flax_module_path(module) if module else ()), leaf


def torch_key(flax_path: Path) -> str:
    """Flax param path (module path + leaf) -> PyTorch state-dict key."""
    leaf = flax_path[-1]
    leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    module = torch_module_name(flax_path[:-1])
    return f"{module}.{leaf}" if module else leaf


def _to_flax_layout(arr: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    if leaf != "kernel":
        return arr
    if arr.ndim == 4 and target_ndim == 4:
        return rearrange(arr, "o i h w -> h w i o")
    if arr.ndim == 4 and target_ndim == 2 and arr.shape[2:] == (1, 1):  # 1x1 conv -> linear
        return arr[:, :, 0, 0].T
    if arr.ndim == 2:
        return arr.T
    return arr


def to_torch_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
    """Flax leaf array -> PyTorch layout (inverse of the load transform)."""
    if leaf != "kernel":
        return arr
    if arr.ndim == 4:
        return rearrange(arr, "h w i o -> o i h w")
    if arr.ndim == 2:
        return arr.T
    return arr


def abstract_tree(tree) -> dict[Path, jax.ShapeDtypeStruct]:
    """Flatten an (unboxed) abstract param tree to {path: ShapeDtypeStruct}."""
    return traverse_util.flatten_dict(tree)


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    abstract: Mapping,
    *,
    dtype=None,
    spec: ConversionSpec = ConversionSpec(),
    to_device: Callable[[Path, np.ndarray], object] | None = None,
    source: str = "checkpoint",
) -> dict:
    """Map a PyTorch state dict onto the Flax param tree described by `abstract`.

    Args:
      state: name -> array (may be lazy, read from the file when indexed; each is read once).
      abstract: unboxed param tree of `jax.ShapeDtypeStruct` from `jax.eval_shape`.
      dtype: dtype to store params in (None: the abstract tree's dtypes). Each
        tensor is cast on its own, so a bf16 load never holds an fp32 model.
      to_device: optional (path, np array) -> array placer (e.g. sharded
        `jax.device_put`); default: `jax.device_put` to the default device (a copy).
      source: the file or folder, named in errors.
    Returns: nested dict of arrays with exactly the abstract tree's structure.
    """
    targets = abstract_tree(abstract)
    by_module: dict[Path, dict[str, Path]] = {}
    for path in targets:
        by_module.setdefault(path[:-1], {})[path[-1]] = path
    renames = [(re.compile(p), r) for p, r in spec.rename]
    ignores = [re.compile(p) for p in spec.ignore]
    # device_put, not jnp.asarray: asarray compiles an identity program per distinct shape (79 for a
    # SD UNet, ~0.1 GB of executables kept in jit's cache); may_alias=False: our own buffer, not a
    # view of the file's memory map
    place = to_device or (lambda _p, a: jax.device_put(a, may_alias=False))

    out: dict[Path, object] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key in state:
        name = key
        for pat, rep in renames:
            name = pat.sub(rep, name)
        if any(p.fullmatch(name) for p in ignores):
            continue
        if name in spec.tied:
            continue  # a duplicate of another tensor; loaded through that one
        module, leaf = _module_path(name)
        leaves = by_module.get(module, {})
        candidates = ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
        target = next((leaves[c] for c in candidates if c in leaves), None)
        if target is None:
            unexpected.append(key)
            continue
        want = targets[target]
        arr = _to_flax_layout(state[key], target[-1], len(want.shape))
        if tuple(arr.shape) != tuple(want.shape):
            out[target] = None  # reported as a mismatch, not also as missing
            mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(want.shape)} (as {'/'.join(target)})")
            continue
        out[target] = place(target, np.asarray(arr, dtype=dtype or want.dtype))
    missing = [torch_key(p) for p in targets if p not in out]
    out = {p: v for p, v in out.items() if v is not None}
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model:"]
        for title, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if names:
                lines.append(f"  {title} ({len(names)}): " + ", ".join(sorted(names)[:40]) + (" ..." if len(names) > 40 else ""))
        lines.append("  Check that the model config matches the checkpoint (block types, channels, heads, cross_attention_dim).")
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping, *, spec: ConversionSpec = ConversionSpec(), dtype=None) -> dict[str, np.ndarray]:
    """Flax param tree -> PyTorch state dict of numpy arrays (same dtype unless `dtype`)."""
    state: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        state[torch_key(path)] = np.asarray(to_torch_layout(arr, path[-1]), order="C")  # keeps 0-d tensors 0-d
    for dup, orig in spec.tied.items():
        if orig in state:
            state[dup] = state[orig]
    return state


def check_fits(abstract: Mapping, params: Mapping, what: str) -> None:
    """Refuse `params` whose tree or shapes differ from `abstract` (before anything is written)."""
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
    have = {k: tuple(getattr(v, "shape", ())) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    if want != have:
        missing = sorted("/".join(k) for k in want.keys() - have.keys())
        unexpected = sorted("/".join(k) for k in have.keys() - want.keys())
        shapes = sorted(f"{'/'.join(k)}: {have[k]} vs config {want[k]}" for k in want.keys() & have.keys()
                        if want[k] != have[k])
        raise ConversionError(f"{what} params do not match the config: missing {missing[:20]}, "
                              f"unexpected {unexpected[:20]}, shape mismatches {shapes[:20]}")


def check_tied(state: Mapping[str, np.ndarray], spec: ConversionSpec, source: str) -> None:
    """Refuse a checkpoint whose tied duplicates differ from their originals."""
    bad = [d for d, o in spec.tied.items() if d in state and o in state
           and not np.array_equal(np.asarray(state[d]), np.asarray(state[o]))]
    if bad:
        raise ConversionError(f"{source}: tied tensors differ from their originals: {', '.join(bad)}")
