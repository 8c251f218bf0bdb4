"""Prompt encoding equals diffusers' `encode_prompt` (SDXL, SD) on tiny saved pipelines; the hybrid's
T5 + projection equals transformers + a torch Linear; the projection folder round-trips."""

import copy
import dataclasses

import numpy as np
import pytest

from tests.helpers import rel_err
from tests.text.tiny import write_clip_tokenizer, write_t5_tokenizer

PROMPTS = ["a photo of an astronaut riding a horse", "an oil painting of a castle, café!!!"]
NEGATIVE = ["blurry, low quality", ""]


def _perturb(model, scale=0.2):
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """A tiny SDXL pipeline saved by diffusers (tiny UNet/VAE only because the pipeline needs them)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    root = tmp_path_factory.mktemp("sdxl")
    tok1 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "src_tok1"))
    tok2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "src_tok2", pad_token="!"))
    torch.manual_seed(0)
    common = {"vocab_size": len(tok1), "bos_token_id": tok1.bos_token_id, "eos_token_id": 2, "pad_token_id": 1,
                  "max_position_embeddings": 77, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 3}
    te1 = _perturb(CLIPTextModel(CLIPTextConfig(hidden_size=32, hidden_act="quick_gelu", **common)))
    te2 = _perturb(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, hidden_act="gelu", projection_dim=40,
                                                              **common)))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=80, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 40)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    folder = root / "pipeline"
    pipe.save_pretrained(folder)  # ours reads the saved folder; the reference is the same weights in memory
    return folder, pipe


@pytest.fixture(scope="module")
def sdxl_encoder(sdxl_folder):
    from jaxsd.text.prompts import PromptEncoder

    return PromptEncoder.from_pipeline(sdxl_folder[0])


def _close(ours, ref):
    assert rel_err(np.asarray(ours), ref.numpy()) <= 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("case", ["negative", "zeros_for_absent_negative", "empty_prompt", "clip_skip",
                                  "no_force_zeros", "second_prompts"])
def test_sdxl_matches_diffusers_encode_prompt(sdxl_folder, sdxl_encoder, case):
    import torch

    _, pipe = sdxl_folder
    enc = sdxl_encoder
    assert enc.kind == "sdxl" and enc.force_zeros_for_empty_prompt
    if case == "no_force_zeros":  # the absent negative prompt is then encoded as ""
        pipe = copy.copy(pipe)
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
        enc = dataclasses.replace(enc, force_zeros_for_empty_prompt=False)
    prompts = ["", PROMPTS[0]] if case == "empty_prompt" else PROMPTS  # batch of 2: one compiled shape
    negative = NEGATIVE if case in ("negative", "clip_skip") else None
    clip_skip = 1 if case == "clip_skip" else None
    n = 2 if case == "negative" else 1
    # SDXL's encoder 2 may get its own prompts (diffusers' prompt_2 / negative_prompt_2).
    second = (["a watercolor sketch", "pixel art"], ["ugly", "jpeg artifacts"]) if case == "second_prompts" else (None,) * 2
    negative = NEGATIVE if case == "second_prompts" else negative
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(prompts, num_images_per_prompt=n, do_classifier_free_guidance=True,
                                                      negative_prompt=negative, clip_skip=clip_skip,
                                                      prompt_2=second[0], negative_prompt_2=second[1])
    cond, uncond = enc.encode_with_negative(prompts, negative, clip_skip=clip_skip, num_images_per_prompt=n,
                                            prompts_2=second[0], negative_prompts_2=second[1])
    assert cond.encoder_hidden_states.shape == (len(prompts) * n, 77, 32 + 48) and cond.pooled.shape[-1] == 40
    _close(cond.encoder_hidden_states, pe)
    _close(cond.pooled, pooled)
    if negative is None and enc.force_zeros_for_empty_prompt:
        assert not np.asarray(uncond.encoder_hidden_states).any() and not np.asarray(uncond.pooled).any()
        assert not npe.any() and not npooled.any()
    else:
        _close(uncond.encoder_hidden_states, npe)
        _close(uncond.pooled, npooled)


@pytest.fixture(scope="module")
def sd_pipelines(sdxl_folder):
    """SD 1.x-like (CLIP-L-like encoder 1) and SD 2.x-like (OpenCLIP-like gelu encoder, pad "!") pipelines
    built from the SDXL fixture's parts; the SD2 encoder is saved as a plain CLIPTextModel."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    folder, xl = sdxl_folder
    sd2_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder_2")
    sd2_encoder.save_pretrained(folder.parent / "sd2_text_encoder")
    parts = {"sd1": (xl.text_encoder, xl.tokenizer, folder / "text_encoder", folder / "tokenizer"),
             "sd2": (sd2_encoder, xl.tokenizer_2, folder.parent / "sd2_text_encoder", folder / "tokenizer_2")}
    return {name: (StableDiffusionPipeline(vae=xl.vae, text_encoder=te, tokenizer=tok, unet=xl.unet,
                                           scheduler=xl.scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False), te_folder, tok_folder)
            for name, (te, tok, te_folder, tok_folder) in parts.items()}


@pytest.mark.torch
@pytest.mark.parametrize("family,clip_skip", [("sd1", None), ("sd1", 1), ("sd2", None)])
def test_sd_matches_diffusers_encode_prompt(sd_pipelines, family, clip_skip):
    """SD 1.x/2.x path: one CLIP encoder, last hidden state (clip-skip: earlier layer through the final norm)."""
    import torch

    from jaxsd.convert.text_encoders import load_clip
    from jaxsd.models.clip import CLIPTextModel
    from jaxsd.text.prompts import PromptEncoder, TextComponent
    from jaxsd.text.tokenizers import load_tokenizer

    sd, te_folder, tok_folder = sd_pipelines[family]
    config, params = load_clip(te_folder)
    enc = PromptEncoder("clip", [TextComponent(load_tokenizer(tok_folder), CLIPTextModel(config), params)])
    with torch.no_grad():
        if clip_skip is None:
            pe, npe = sd.encode_prompt(PROMPTS, "cpu", 2, True, NEGATIVE)
        else:
            # diffusers 0.42's clip-skip branch reads `text_encoder.text_model.final_layer_norm`, which
            # transformers 5's CLIPTextModel no longer has; apply its formula to the same encoder directly.
            _, npe = sd.encode_prompt(PROMPTS, "cpu", 2, True, NEGATIVE)
            ids = sd.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            hidden = sd.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            pe = sd.text_encoder.final_layer_norm(hidden).repeat_interleave(2, dim=0)
    cond, uncond = enc.encode_with_negative(PROMPTS, NEGATIVE, clip_skip=clip_skip, num_images_per_prompt=2)
    assert cond.pooled is None
    _close(cond.encoder_hidden_states, pe)
    _close(uncond.encoder_hidden_states, npe)


@pytest.mark.torch
def test_hybrid_t5_projection_matches_torch_and_round_trips(tmp_path):
    import torch
    from transformers import T5Config, T5EncoderModel

    from jaxsd.convert.safetensors_io import SafetensorsFile
    from jaxsd.convert.text_encoders import load_text_projection, save_text_projection
    from jaxsd.models.text_projection import TextProjectionConfig
    from jaxsd.text.prompts import PromptEncoder

    torch.manual_seed(0)
    write_t5_tokenizer(tmp_path / "tokenizer")
    t5 = _perturb(T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                          feed_forward_proj="gated-gelu")).eval(), 0.05)
    t5.save_pretrained(tmp_path / "text_encoder")
    linear = torch.nn.Linear(32, 24)
    config = TextProjectionConfig(in_features=32, out_features=24)
    save_text_projection(tmp_path / "text_projection", config,
                         {"linear": {"kernel": linear.weight.detach().numpy().T, "bias": linear.bias.detach().numpy()}})
    # The documented torch side: an nn.Linear loads the file after dropping the `linear.` prefix.
    state = SafetensorsFile(tmp_path / "text_projection" / "diffusion_pytorch_model.safetensors")
    check = torch.nn.Linear(32, 24)
    check.load_state_dict({k.removeprefix("linear."): torch.from_numpy(np.array(v)) for k, v in state.items()})
    assert torch.equal(check.weight, linear.weight) and torch.equal(check.bias, linear.bias)

    enc = PromptEncoder.from_pipeline(tmp_path, max_length=20)
    assert enc.kind == "t5_projected"
    out = enc.encode(PROMPTS, num_images_per_prompt=2)
    ids_ref = np.asarray(enc.components[0].tokenizer(PROMPTS, 20).input_ids)
    mask = (ids_ref != 0).astype(np.int64)
    with torch.no_grad():
        ref = linear(t5(torch.from_numpy(ids_ref.astype(np.int64)), attention_mask=torch.from_numpy(mask))[0])
    ref = ref.repeat_interleave(2, dim=0)
    assert out.encoder_hidden_states.shape == (4, 20, 24)
    _close(out.encoder_hidden_states, ref)
    np.testing.assert_array_equal(out.attention_mask, np.repeat(mask, 2, axis=0))

    cfg2, params2 = load_text_projection(tmp_path / "text_projection")
    save_text_projection(tmp_path / "again", cfg2, params2)
    a = SafetensorsFile(tmp_path / "text_projection" / "diffusion_pytorch_model.safetensors")
    b = SafetensorsFile(tmp_path / "again" / "diffusion_pytorch_model.safetensors")
    assert cfg2 == config and sorted(a) == sorted(b) == ["linear.bias", "linear.weight"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bad_arguments_are_clear_errors(tmp_path):
    from jaxsd.text.prompts import PromptEmbeddings, PromptEncoder, TextComponent

    with pytest.raises(ValueError, match="kind 'sd3' unknown"):
        PromptEncoder("sd3", [])
    with pytest.raises(ValueError, match="needs 2 text encoder"):
        PromptEncoder("sdxl", [object()])
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        PromptEncoder.from_pipeline(tmp_path)
    with pytest.raises(ValueError, match="prompts_2 is for SDXL"):
        PromptEncoder("clip", [TextComponent(None, None, None)]).encode("a cat", prompts_2="a dog")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        PromptEmbeddings(np.zeros((1, 2, 3)), None, np.ones((1, 2))).repeat(0)
