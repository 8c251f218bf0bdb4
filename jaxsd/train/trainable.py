"""Which params train — one of the two seams other training methods plug into.

Params are split into two nested dicts, `trainable` and `frozen`, by regexes over
slash-joined paths ("down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel").
The train step differentiates only with respect to `trainable`, so frozen params
get no gradient computation (beyond what backpropagating to earlier trainable
params needs) and the optimizer holds state only for `trainable`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flax import traverse_util

from jaxsd.errors import ConfigError


def flatten(params: dict) -> dict[str, Any]:
    """{"a/b/kernel": leaf} view of a nested params dict."""
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def is_trainable(path: str, trainable: Sequence[str], frozen: Sequence[str]) -> bool:
    """A param trains if some `trainable` regex matches its path (re.search) and no `frozen` one does."""
    return any(re.search(p, path) for p in trainable) and not any(re.search(p, path) for p in frozen)


def split_params(params: dict, trainable: Sequence[str] = (".*",), frozen: Sequence[str] = ()) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; together they hold every leaf of `params` exactly once."""
    flat = flatten(params)
    train = {k: v for k, v in flat.items() if is_trainable(k, trainable, frozen)}
    if not train:
        raise ConfigError(f"no parameter is trainable: train.trainable={list(trainable)} with "
                          f"train.frozen={list(frozen)} match none of the {len(flat)} params "
                          f"(paths look like {next(iter(flat), '?')!r})")
    return unflatten(train), unflatten({k: v for k, v in flat.items() if k not in train})


def merge_params(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split_params`."""
    both = flatten(frozen)
    both.update(flatten(trainable))
    return unflatten(both)
