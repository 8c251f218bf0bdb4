"""Tiny random diffusers pipelines (SD1-style and SDXL), built with torch and saved to disk.

Weights are seeded and then scaled up where a random init would make the test
blind: the UNet's output conv (so eps predictions are O(1) and a wrong guidance or
sampler moves the image) and the VAE decoder's output conv (so images span most of
[0, 255] instead of sitting at mid-grey).
"""

from __future__ import annotations

from pathlib import Path

from tests.text.tiny import BOS, EOS, clip_vocab_and_merges, write_clip_tokenizer

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "set_alpha_to_one": False}


def _clip(torch, transformers, vocab, *, hidden=32, projection=None, act="quick_gelu"):
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act=act, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                                      pad_token_id=vocab[EOS], projection_dim=projection or hidden)
    model = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)
    return model.eval()


def _vae(torch, diffusers, scaling_factor):
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=32,
                                  scaling_factor=scaling_factor)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(6.0)
    return vae.eval()


def _scale_unet(torch, unet, factor):
    with torch.no_grad():
        unet.conv_out.weight.mul_(factor)
        unet.conv_out.bias.mul_(0.0)
    return unet.eval()


def _sd_unet(torch, diffusers):
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    return _scale_unet(torch, unet, 4.0)


def build_sd(folder: Path, *, prediction_type: str = "epsilon") -> Path:
    """A StableDiffusionPipeline (CLIP 32-wide, UNet 2 blocks, VAE factor 2) saved at `folder`."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    vocab, _ = clip_vocab_and_merges()
    unet = _sd_unet(torch, diffusers)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(torch, diffusers, 0.18215), text_encoder=_clip(torch, transformers, vocab),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok")),
        unet=unet,
        scheduler=diffusers.PNDMScheduler(**SCHEDULER, skip_prk_steps=True, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_sdxl(folder: Path) -> Path:
    """A StableDiffusionXLPipeline: two CLIPs (32 + 64 wide, the second with projection), text_time UNet."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(1)
    vocab, _ = clip_vocab_and_merges()
    te1 = _clip(torch, transformers, vocab, hidden=32)
    te2 = _clip(torch, transformers, vocab, hidden=64, projection=32, act="gelu")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=96, attention_head_dim=(2, 4), norm_num_groups=8, transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(torch, diffusers, 0.13025), text_encoder=te1, text_encoder_2=te2,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok")),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok2", pad_token="!")),
        unet=_scale_unet(torch, unet, 4.0),
        scheduler=diffusers.EulerDiscreteScheduler(
            **{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"}, timestep_spacing="leading"),
        add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


def build_hybrid(folder: Path) -> Path:
    """The SD1.5 + T5 hybrid: the SD UNet/VAE of `build_sd` (same configs, other weights), a tiny T5
    encoder + sentencepiece tokenizer (77 tokens) and a `text_projection/` (16 → 32) component."""
    import json

    import diffusers
    import torch
    import transformers
    from safetensors.torch import save_file

    from tests.text.tiny import write_t5_tokenizer

    torch.manual_seed(2)
    tok_folder = write_t5_tokenizer(folder / "tokenizer", max_length=77)
    tokenizer = transformers.T5Tokenizer.from_pretrained(tok_folder)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    diffusers.StableDiffusionPipeline(
        vae=_vae(torch, diffusers, 0.18215), text_encoder=t5, tokenizer=tokenizer, unet=_sd_unet(torch, diffusers),
        scheduler=diffusers.PNDMScheduler(**SCHEDULER, skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    projection = torch.nn.Linear(16, 32)
    (folder / "text_projection").mkdir()
    (folder / "text_projection" / "config.json").write_text(json.dumps(
        {"_class_name": "TextProjection", "in_features": 16, "out_features": 32, "bias": True}))
    save_file({"linear.weight": projection.weight.detach() * 3, "linear.bias": projection.bias.detach()},
              str(folder / "text_projection" / "diffusion_pytorch_model.safetensors"))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_projection"] = ["jaxsd", "TextProjection"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
