"""LoRA / LoCon adapters: a second Flax variable collection, "lora", beside "params".

    model.apply({"params": base, "lora": adapters}, ...)

`adapters` mirrors the paths of the layers it adapts; each adapted Dense or Conv holds

    {"down": [in, r]          (Conv: [kh, kw, in, r] — the base conv's kernel, stride, padding)
     "up":   [r, out]         (Conv: [1, 1, r, out])
     "scale": f32 [r]}        user_scale · alpha / rank, per rank column

and computes y = base(x) + ((x @ down) · scale) @ up, unmerged (`jaxsd.models.layers`).
Keeping `scale` per rank column lets several LoRAs apply at once (concatenate along the
rank axis, `concat_adapters`) and makes a new scale new array values, never a new program.
Only `down` and `up` are trained (`TRAINED_LEAVES`); `scale` is a constant.

Training with dropout on the adapter input (PEFT's lora_dropout) adds a third collection,
"lora_dropout", with the same module paths: {"keys": uint32 [B, 2] (one PRNG key per sample),
"rate": f32 []} (`dropout_variables`; the masks: `dropout_mask`, applied in `jaxsd.models.layers`).

Targets are regexes (`re.search`) over the diffusers/transformers dotted module names
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`), or a preset name:

  attn        to_q, to_k, to_v, to_out.0 of attn1/attn2 (kohya's and diffusers' default)
  attn_ff     attn + ff.net.0.proj, ff.net.2, proj_in, proj_out
  all_linear  every Dense of the UNet (and SD1's 1x1-conv proj_in/proj_out, linear elsewhere)
  text_encoder  CLIP's self_attn q/k/v/out_proj and mlp fc1/fc2

The `targets` (rank, alpha) select Dense layers and 1x1 convs only. `conv_rank > 0` adds
LoCon (conv_rank, conv_alpha) on the UNet's resnet conv1/conv2/conv_shortcut and the
down/upsampler convs (`CONV_TARGETS`); a layer in both sets takes the conv rank.
alpha 0 means alpha = rank (scale 1), as kohya.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec

from jaxsd.errors import InputError
from jaxsd.models.names import ModulePath, torch_module_name

_ATTN = (r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$",)
PRESETS: dict[str, tuple[str, ...]] = {
    "attn": _ATTN,
    "attn_ff": _ATTN + (r"(^|\.)ff\.net\.0\.proj$", r"(^|\.)ff\.net\.2$", r"(^|\.)proj_in$", r"(^|\.)proj_out$"),
    # 1x1 convs are in the linear set; the resnets' conv_shortcut is the only one that is not a
    # Dense elsewhere (SD1's proj_in/proj_out are Linear in SD2/SDXL)
    "all_linear": (r".*(?<!conv_shortcut)$",),
    "text_encoder": (r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|out_proj)$", r"(^|\.)mlp\.(fc1|fc2)$"),
}
CONV_TARGETS: tuple[str, ...] = (r"(^|\.)resnets\.\d+\.(conv1|conv2|conv_shortcut)$",
                                 r"(^|\.)(downsamplers|upsamplers)\.0\.conv$")
INITS = ("peft", "gaussian")
TRAINED_LEAVES = ("down", "up")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapted layer: its rank and alpha (scale = alpha / rank) and the base kernel's shape."""

    rank: int
    alpha: float
    kernel_shape: tuple[int, ...]

    @property
    def is_conv(self) -> bool:
        return len(self.kernel_shape) == 4

    def down_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[:-1] + (self.rank,)

    def up_shape(self) -> tuple[int, ...]:
        return ((1, 1) if self.is_conv else ()) + (self.rank, self.kernel_shape[-1])


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name or a list of regexes -> the regexes (checked to compile)."""
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise InputError(f"LoRA targets {targets!r}: not a preset; choose one of {sorted(PRESETS)} or give a "
                             "list of regexes over module names (e.g. 'attn2\\.to_(k|v)$')")
        return PRESETS[targets]
    for pattern in targets:
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"LoRA targets: bad regex {pattern!r}: {e}") from None
    return tuple(targets)


def plan_adapters(param_shapes: Mapping, targets: str | Sequence[str], rank: int, alpha: float, *,
                  conv_rank: int = 0, conv_alpha: float = 0) -> dict[ModulePath, AdapterSpec]:
    """Which layers of `param_shapes` (a params tree of arrays or ShapeDtypeStructs) get adapters.

    Returns {flax module path: AdapterSpec}, sorted by path. rank 0 (or conv_rank 0) turns a set off.
    """
    patterns = resolve_targets(targets)
    conv_patterns = CONV_TARGETS if conv_rank > 0 else ()
    plan: dict[ModulePath, AdapterSpec] = {}
    names = []
    for path, leaf in sorted(traverse_util.flatten_dict(dict(param_shapes)).items()):
        if path[-1] != "kernel":
            continue
        module, shape = path[:-1], tuple(leaf.shape)
        name = torch_module_name(module)
        names.append(name)
        if len(shape) == 4 and any(re.search(p, name) for p in conv_patterns):
            plan[module] = AdapterSpec(conv_rank, float(conv_alpha or conv_rank), shape)
        elif rank > 0 and (len(shape) == 2 or shape[:2] == (1, 1)) and any(re.search(p, name) for p in patterns):
            plan[module] = AdapterSpec(rank, float(alpha or rank), shape)
    if not plan:
        raise InputError(f"LoRA targets {list(patterns)} (rank {rank}, conv_rank {conv_rank}) match none of the "
                         f"{len(names)} layers; names look like {names[len(names) // 2] if names else '?'!r}")
    return plan


def init_adapters(param_shapes: Mapping, targets: str | Sequence[str], rank: int, alpha: float, key: jax.Array, *,
                  conv_rank: int = 0, conv_alpha: float = 0, init: str = "peft", dtype=jnp.float32) -> dict:
    """A fresh "lora" tree for the model whose params have `param_shapes` (shapes only; the base is
    not touched or re-initialised).

    up = 0, so step 0 computes exactly the base model. down: "peft" = kaiming-uniform as PEFT's
    `init_lora_weights=True` (U(±1/sqrt(fan_in)), fan_in = in·kh·kw); "gaussian" = N(0, (1/rank)²)
    as PEFT's "gaussian". scale = alpha / rank (f32). Traceable: jit it with `key` as the argument
    to create sharded adapters directly.
    """
    if init not in INITS:
        raise InputError(f"LoRA init {init!r} unknown; choose one of {INITS}")
    plan = plan_adapters(param_shapes, targets, rank, alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    sizes = [math.prod(spec.down_shape()) for spec in plan.values()]
    # one draw for all layers, cut into pieces: one random op instead of one per layer keeps the
    # compiled init small (hundreds of layers on SDXL)
    if init == "peft":
        draws = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    else:
        draws = jax.random.normal(key, (sum(sizes),), jnp.float32)
    flat, offset = {}, 0
    for size, (module, spec) in zip(sizes, plan.items()):
        shape = spec.down_shape()
        piece = draws[offset:offset + size].reshape(shape)
        offset += size
        factor = 1.0 / math.sqrt(math.prod(shape[:-1])) if init == "peft" else 1.0 / spec.rank
        flat[module + ("down",)] = (piece * factor).astype(dtype)
        flat[module + ("up",)] = jnp.zeros(spec.up_shape(), dtype)
        flat[module + ("scale",)] = jnp.full((spec.rank,), spec.alpha / spec.rank, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def adapter_logical_axes(param_specs: Mapping, adapters: Mapping) -> dict:
    """Logical PartitionSpecs for `adapters`, from the base kernels' (`abstract_params`' second tree):
    down (in_axis, None), up (None, out_axis), scale (None,) — conv: the spatial axes unsharded."""
    specs = traverse_util.flatten_dict(dict(param_specs))
    out = {}
    for path in traverse_util.flatten_dict(dict(adapters)):
        module, leaf = path[:-1], path[-1]
        kernel = tuple(specs[module + ("kernel",)])
        if leaf == "scale":
            out[path] = PartitionSpec(None)
        elif leaf == "down":
            out[path] = PartitionSpec(*(None,) * (len(kernel) - 2), kernel[-2], None)
        else:
            out[path] = PartitionSpec(*(None,) * (len(kernel) - 1), kernel[-1])
    return traverse_util.unflatten_dict(out)


def scale_adapters(adapters: Mapping, factor) -> dict:
    """The same adapters with every `scale` multiplied by `factor` (a float or a traced scalar)."""
    return traverse_util.unflatten_dict({
        p: (v * jnp.float32(factor) if p[-1] == "scale" else v)
        for p, v in traverse_util.flatten_dict(dict(adapters)).items()})


def concat_adapters(trees: Sequence[Mapping]) -> dict:
    """Several "lora" trees for one model as one: a layer adapted by several gets their ranks
    concatenated (down along its last axis, up along its rank axis, scale along its only one)."""
    by_module: dict[ModulePath, list[Mapping]] = {}
    for tree in trees:
        for module, adapter in _by_module(tree).items():
            by_module.setdefault(module, []).append(adapter)
    flat = {}
    for module, parts in by_module.items():
        for leaf, axis in (("down", -1), ("up", -2), ("scale", 0)):
            values = [p[leaf] for p in parts]
            flat[module + (leaf,)] = values[0] if len(values) == 1 else jnp.concatenate(values, axis=axis)
    return traverse_util.unflatten_dict(flat)


def _by_module(adapters: Mapping) -> dict[ModulePath, Mapping]:
    """{module path: {"down", "up", "scale"}} of a "lora" tree."""
    return traverse_util.flatten_dict(dict(adapters), is_leaf=lambda _, v: "down" in v)


def fold_adapters(params: Mapping, adapters: Mapping) -> dict:
    """params with the adapters merged into the kernels: W + down · diag(scale) · up (conv:
    the down kernel composed with the 1x1 up). Jittable; for export, not for sampling."""
    flat = traverse_util.flatten_dict(dict(params))
    for module, ad in _by_module(adapters).items():
        kernel = flat[module + ("kernel",)]
        down = ad["down"].astype(jnp.float32) * ad["scale"].astype(jnp.float32)
        up = ad["up"].astype(jnp.float32).reshape(ad["up"].shape[-2:])
        delta = jnp.einsum("...r,ro->...o", down, up)
        flat[module + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def dropout_mask(keys: jax.Array, rate: jax.Array, layer: str, shape: tuple[int, ...]) -> jax.Array:
    """bool [B, *shape]: which adapter-input values of the layer named `layer` survive dropout `rate`.

    keys: uint32 [B, 2], one PRNG key per sample (`dropout_keys`, from the train step's key).
    Sample i's mask is drawn from keys[i] folded with the layer's name: independent per layer and
    per sample, and not dependent on the other samples of the call, so gradient accumulation's
    micro-batches (rows of the batch) and any sharding of the batch see exactly the whole batch's masks.
    """
    layer_id = zlib.crc32(layer.encode())

    def uniform(key_data: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), layer_id)
        # drawn flat: XLA:CPU compiles a multi-dimensional threefry draw several times slower
        return jax.random.uniform(key, (math.prod(shape),))

    return (jax.vmap(uniform)(keys) >= rate).reshape((keys.shape[0], *shape))


def dropout_keys(key: jax.Array, batch: int) -> jax.Array:
    """uint32 [batch, 2]: one PRNG key (as its raw data) per sample, for `dropout_variables`."""
    return jax.random.key_data(jax.random.split(key, batch))


def fold_dropout_keys(keys: jax.Array, data: int) -> jax.Array:
    """`dropout_keys` folded with `data`: per-sample keys of another model (its layers may be named as
    another's: SDXL's two text encoders)."""
    return jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), data))(keys))


def dropout_variables(modules: Sequence[ModulePath], keys: jax.Array, rate: float) -> dict:
    """The "lora_dropout" collection: dropout `rate` on the input of the adapters of `modules`, with
    per-sample masks drawn from `keys` (`dropout_keys`) folded with each layer's path."""
    rate = jnp.asarray(rate, jnp.float32)
    return traverse_util.unflatten_dict({m + (leaf,): value for m in modules
                                         for leaf, value in (("keys", keys), ("rate", rate))})


def adapted_modules(adapters: Mapping) -> list[ModulePath]:
    """The module paths a "lora" tree adapts, sorted."""
    return sorted(_by_module(adapters))


__all__ = ["CONV_TARGETS", "INITS", "PRESETS", "TRAINED_LEAVES", "AdapterSpec", "adapted_modules",
           "adapter_logical_axes", "concat_adapters", "dropout_keys", "dropout_mask", "dropout_variables",
           "fold_adapters", "fold_dropout_keys", "init_adapters", "plan_adapters", "resolve_targets", "scale_adapters"]
