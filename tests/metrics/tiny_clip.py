"""A tiny random transformers CLIPModel folder, as `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained`
write it: the CLIP-score tests' reference and `jaxsd eval --clip`'s input."""

from __future__ import annotations

import json
from pathlib import Path

from tests.text.tiny import write_clip_tokenizer


def build_clip_folder(folder: Path, max_tokens: int = 16) -> Path:
    """CLIPModel (image 32, patch 8, projection 24) + CLIP tokenizer + PIL CLIPImageProcessor config at `folder`."""
    import torch
    import transformers

    write_clip_tokenizer(folder, max_length=max_tokens)
    vocab = len(json.loads((folder / "vocab.json").read_text()))
    config = transformers.CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": max_tokens,
                     "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
        projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # random class/position embeddings and norms, so no term is trivially zero or one
        for name, p in model.named_parameters():
            if "norm" in name or "embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    # The PIL processor is the reference (transformers 5 would pick a torchvision one if it were importable).
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
              image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]).save_pretrained(folder)
    return folder
