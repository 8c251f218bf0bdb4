"""PyTorch side of the UNet benchmarks: diffusers' `UNet2DConditionModel` + torch optimizer.

Imported only inside torch-side child processes. The train step mirrors
`bench/jaxsd_unet.py`: fp32 master weights, bf16 via `torch.autocast` when asked
(what a diffusers user does for mixed precision), MSE loss in fp32, then the
optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bench.presets import LEARNING_RATE, WEIGHT_DECAY

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def save_random_unet(cfg: dict, folder: str, seed: int = 0) -> int:
    """Write a randomly initialised diffusers UNet folder (config.json + safetensors); returns #params."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def load_unet(folder: str | None, cfg: dict, seed: int = 0):
    """diffusers UNet from `folder` (the shared weights), or randomly initialised when folder is None."""
    from diffusers import UNet2DConditionModel

    if folder:
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # PEFT's names of jaxsd's `attn` preset


def add_lora(model, rank: int) -> None:
    """diffusers + PEFT LoRA as diffusers' train_text_to_image_lora does it: the UNet frozen, then
    adapters of rank `rank` (alpha = rank; PEFT's default init: A kaiming-uniform, B zeros) on
    every attention's to_q/to_k/to_v/to_out.0 — the only params left with requires_grad."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=LEARNING_RATE)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("torch 8-bit AdamW needs bitsandbytes (not installed); "
                               "run the torch side with --optimizer adamw") from None
        return bnb.optim.AdamW8bit(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    raise ValueError(f"unknown optimizer {name!r}")


def torch_batch(np_batch: dict) -> dict:
    """The jaxsd batch (NHWC) as torch tensors (NCHW for images)."""
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    out = {"sample": nchw(np_batch["sample"]), "target": nchw(np_batch["target"]),
           "timesteps": torch.from_numpy(np_batch["timesteps"].astype(np.int64)),
           "encoder_hidden_states": torch.from_numpy(np_batch["encoder_hidden_states"])}
    if "text_embeds" in np_batch:
        out["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(np_batch["text_embeds"]),
                                    "time_ids": torch.from_numpy(np_batch["time_ids"])}
    return out


def make_train_step(model, opt: torch.optim.Optimizer, dtype: str, kind: str = "simple",
                    clip: float = 1.0) -> Callable[[dict], float]:
    """batch -> loss: forward (autocast for bf16), fp32 MSE, backward, optimizer step.

    kind "simple": the batch's pre-noised sample and fixed target.
    kind "grad": as "simple" but forward + backward only (no optimizer step).
    kind "train": what diffusers' train_text_to_image does per step — fresh noise and
    timesteps, DDPMScheduler.add_noise on the latents, epsilon target, grad-norm clip at
    `clip` (0 = none) over the params that train (all, or a LoRA's adapters).
    """
    from diffusers import DDPMScheduler

    model.train()
    autocast = dtype != "float32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(0)
    trained = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict) -> float:
        if kind == "train":
            latents = batch["sample"]
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
            sample, target = scheduler.add_noise(latents, noise, t), noise
        else:
            sample, t, target = batch["sample"], batch["timesteps"], batch["target"]
        with torch.autocast(device, dtype=DTYPES[dtype], enabled=autocast):
            pred = model(sample, t, batch["encoder_hidden_states"],
                         added_cond_kwargs=batch.get("added_cond_kwargs"), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        if kind == "train" and clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        if kind != "grad":
            opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step
