"""Module names: Flax module paths ⇔ the PyTorch (diffusers/transformers) dotted names.

Flax module names mirror the PyTorch ones, except that a PyTorch module-list index
`.N` is `_N` on the preceding name (`down_blocks.0.resnets.1` ⇔ `down_blocks_0/
resnets_1`). Going back, `name_N` splits only for names that are PyTorch module
lists (`LIST_CONTAINERS`), so `time_embedding.linear_1` stays `linear_1`.

Here (not in `jaxsd.convert`) because models use the names too: LoRA targets are
regexes over the diffusers module names (`jaxsd.models.lora`).
"""

from __future__ import annotations

import re

# PyTorch attribute names that hold nn.ModuleList / nn.Sequential children.
LIST_CONTAINERS = frozenset({
    # diffusers UNet / VAE
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net",
    # transformers CLIP / T5
    "layers", "block", "layer",
})

ModulePath = tuple[str, ...]

_INDEXED = re.compile(r"^(.+)_(\d+)$")


def torch_module_name(path: ModulePath) -> str:
    """Flax module path -> PyTorch dotted module name: ("attn1", "to_out_0") -> "attn1.to_out.0"."""
    parts: list[str] = []
    for seg in path:
        m = _INDEXED.match(seg)
        if m and m.group(1) in LIST_CONTAINERS:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(seg)
    return ".".join(parts)


def flax_module_path(name: str) -> ModulePath:
    """PyTorch dotted module name -> Flax module path (inverse of `torch_module_name`)."""
    out: list[str] = []
    for p in name.split("."):
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out)
