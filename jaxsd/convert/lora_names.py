"""The names LoRA files give the layers of a model, per file layout.

Every adaptable layer (a Dense or Conv kernel in the component's param tree) gets:

  PEFT/diffusers  its diffusers/transformers dotted module name, under the component's
                  prefix: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
                  `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`
  kohya           `lora_unet_` / `lora_te_` (SD1/SD2) / `lora_te1_`, `lora_te2_` (SDXL) + the
                  module name with dots as underscores. kohya trains SD1/SD2 on UNets with
                  diffusers' module names, but SDXL on the original (SGM/LDM) UNet, so SDXL
                  UNet names are the SGM ones: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`.

Reading accepts what kohya and diffusers' kohya converter accept: SGM and diffusers-style
UNet names for any family, `lora_te_` or `lora_te1_` for the first text encoder, and text
encoder names with or without transformers' `text_model.` (transformers 5 drops it from
CLIPTextModel's state dict). Writing produces one spelling: what kohya writes for the family,
and PEFT names with `text_model.`, which diffusers loads into either class.
"""

from __future__ import annotations

from collections.abc import Mapping

from flax import traverse_util

from jaxsd.models.names import ModulePath, torch_module_name
from jaxsd.models.unet import UNetConfig

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


def adaptable_layers(abstract: Mapping) -> dict[ModulePath, tuple[int, ...]]:
    """{module path: kernel shape} of every Dense ([in, out]) and Conv ([kh, kw, in, out]) layer."""
    return {path[:-1]: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(dict(abstract)).items()
            if path[-1] == "kernel"}


def kohya_prefix(component: str, family: str) -> str:
    """The prefix kohya writes: lora_unet_, lora_te_ (SD1/SD2), lora_te1_/lora_te2_ (SDXL)."""
    if component == "text_encoder" and family == "sdxl":
        return "lora_te1_"
    return KOHYA_PREFIXES[component][0]


def _resnet_part(rest: list[str]) -> list[str]:
    renames = {"conv1": ["in_layers", "2"], "conv2": ["out_layers", "3"], "time_emb_proj": ["emb_layers", "1"],
               "conv_shortcut": ["skip_connection"], "norm1": ["in_layers", "0"], "norm2": ["out_layers", "0"]}
    return renames.get(rest[0], rest[:1]) + rest[1:]


def sgm_name(name: str, config: UNetConfig) -> str | None:
    """The original (SGM/LDM) UNet's name of a diffusers UNet module name, as kohya's SDXL UNet has
    it (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` for SDXL); None when the
    module has no SGM counterpart."""
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2"}
    if name in top:
        return top[name]
    parts = name.split(".")
    layers = config.per_block("layers_per_block")
    n = len(config.down_block_types)
    if parts[0] == "mid_block" and len(parts) > 3:
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets" and j < 2:
            return ".".join(["middle_block", str(2 * j)] + _resnet_part(rest))
        if kind == "attentions" and j == 0:
            return ".".join(["middle_block", "1"] + rest)
        return None
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5:
        return None
    b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        # each down block: its layers, then its downsampler as a block of its own (not after the last)
        start = 1 + sum(layers[i] + (1 if i < n - 1 else 0) for i in range(b))
        if kind == "downsamplers" and j == 0 and rest == ["conv"]:
            return f"input_blocks.{start + layers[b]}.0.op"
        return _sgm_layer("input_blocks", start + j, kind, rest)
    up_layers = [layers[n - 1 - i] + 1 for i in range(n)]
    start = sum(up_layers[:b])
    if kind == "upsamplers" and j == 0 and rest == ["conv"]:
        # the upsampler sits in the block's last layer, after its resnet (and attention, if any)
        has_attn = "CrossAttn" in config.up_block_types[b]
        return f"output_blocks.{start + up_layers[b] - 1}.{2 if has_attn else 1}.conv"
    return _sgm_layer("output_blocks", start + j, kind, rest)


def _sgm_layer(blocks: str, index: int, kind: str, rest: list[str]) -> str | None:
    """An SGM block layer holds its resnet at .0 and its transformer at .1."""
    if kind == "resnets":
        return ".".join([blocks, str(index), "0"] + _resnet_part(rest))
    if kind == "attentions":
        return ".".join([blocks, str(index), "1"] + rest)
    return None


class NameTable:
    """Names of one component's adaptable layers in both file layouts, both ways."""

    def __init__(self, component: str, family: str, abstract: Mapping, unet_config: UNetConfig | None = None):
        self.component = component
        self.family = family
        self.layers = adaptable_layers(abstract)
        self.peft: dict[ModulePath, str] = {p: torch_module_name(p) for p in self.layers}
        self.kohya: dict[ModulePath, str] = {}
        prefix = kohya_prefix(component, family)
        for path, name in self.peft.items():
            sgm = sgm_name(name, unet_config) if unet_config is not None and component == "unet" else None
            spelled = sgm if family == "sdxl" and sgm is not None else name
            self.kohya[path] = prefix + spelled.replace(".", "_")
        self._read: dict[str, ModulePath] = {}
        for path, name in self.peft.items():
            self._read[f"{component}.{name}"] = path
            if name.startswith("text_model."):
                self._read[f"{component}.{name.removeprefix('text_model.')}"] = path
            for pre in KOHYA_PREFIXES[component]:
                self._read[pre + name.replace(".", "_")] = path
                sgm = sgm_name(name, unet_config) if unet_config is not None and component == "unet" else None
                if sgm is not None:
                    self._read[pre + sgm.replace(".", "_")] = path

    def lookup(self, file_name: str) -> ModulePath | None:
        """The module path a file's module name (PEFT `unet.<name>` or kohya `lora_unet_<name>`) means."""
        return self._read.get(file_name)

    def module_name(self, path: ModulePath) -> str:
        """PEFT dotted module name (no component prefix)."""
        return self.peft[path]
