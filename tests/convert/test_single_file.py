"""Single-file checkpoints (original LDM layout): `jaxsd convert` both ways, checked against diffusers' reader.

Per family (SD1; SD2 with v-prediction, linear projection, upcast attention; SDXL with two encoders) one tiny
pipeline folder and the single file `jaxsd convert DIR --single-file` writes from it. diffusers'
`from_single_file(FILE, config=DIR)` is the reference reader of that file; round trips are bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxsd.cli import main
from jaxsd.convert.folder import open_weights
from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from tests.convert.single_file_tiny import BUILDERS, original_file
from tests.helpers import jaxsd_command

FAMILIES = ("sd1", "sd2", "sdxl")
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
           "text_encoder_2": "model"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """family -> (pipeline folder, the single file jaxsd wrote from it, an "original" file made from that)."""
    pytest.importorskip("diffusers")
    import torch

    torch.set_num_threads(1)
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path, Path]:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            folder = BUILDERS[family](root / "pipe")
            file = root / "model.safetensors"
            assert main(["convert", str(folder), "--out", str(file), "--single-file"]) == 0  # in-process: cheaper
            original_file(file, root / "original.safetensors", family)
            cache[family] = folder, file, root / "original.safetensors"
        return cache[family]

    return get


def _state(folder: Path, component: str) -> dict[str, np.ndarray]:
    """A component folder's tensors; CLIP names with `text_model.` (transformers 5 saves CLIPTextModel without)."""
    state = open_weights(folder / component, WEIGHTS[component])
    fix = component.startswith("text_encoder")
    return {(f"text_model.{k}" if fix and not k.startswith(("text_model.", "text_projection")) else k): np.asarray(state[k])
            for k in state if not k.endswith("position_ids")}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: np.asarray(f[k]) for k in f}


def _convert(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.torch
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_reads_the_file_jaxsd_writes(made, family):
    import diffusers

    folder, file, _ = made(family)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    theirs = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    source = cls.from_pretrained(folder)
    for name in COMPONENTS[family]:
        got, want = getattr(theirs, name).state_dict(), getattr(source, name).state_dict()
        assert got.keys() == want.keys(), name
        for k in want:
            assert got[k].dtype == want[k].dtype and bool((got[k] == want[k]).all()), f"{name}.{k}"
    meta = SafetensorsFile(file).metadata
    assert meta["jaxsd.family"] == family
    assert meta["jaxsd.prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_to_file_to_folder_is_bit_exact(made, family, tmp_path, capsys):
    folder, file, _ = made(family)
    out = tmp_path / "back"
    if family == "sd2":  # the console script a user types, once; in-process for the others (no start-up)
        printed = jaxsd_command("convert", file, "--out", out, "--config", folder).stdout
    else:
        rc, printed, _ = _convert(capsys, file, "--out", out, "--config", folder)
        assert rc == 0
    assert f"family {family}" in printed and f"→ {out}: diffusers pipeline folder" in printed
    for name in COMPONENTS[family]:
        got, want = _state(out, name), _state(folder, name)
        assert got.keys() == want.keys(), name
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), f"{name}.{k}"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (out / "tokenizer").is_dir() and (out / "model_index.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_original_fp16_file_to_folder_to_file_is_bit_exact(made, family, tmp_path, capsys):
    folder, _, original = made(family)
    out = tmp_path / "folder"
    rc, printed, _ = _convert(capsys, original, "--out", out, "--config", folder)
    assert rc == 0 and "model_ema.* tensors are not used (--ema uses them)" in printed
    assert SafetensorsFile(out / "unet" / "diffusion_pytorch_model.safetensors").dtype(
        "conv_in.weight") == np.float16  # no --dtype: the file's own
    back = tmp_path / "back.safetensors"
    rc, printed, _ = _convert(capsys, out, "--out", back, "--single-file")
    assert rc == 0 and f"→ {back}: single file" in printed
    got, want = _tensors(back), _tensors(original)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


def test_ema_weights_when_asked(made, tmp_path, capsys):
    folder, _, original = made("sd1")
    rc, out, _ = _convert(capsys, original, "--out", tmp_path / "ema", "--config", folder, "--ema",
                          "--dtype", "float32")
    assert rc == 0 and "EMA: the UNet from the file's model_ema.* copy" in out
    unet = _state(tmp_path / "ema", "unet")
    want = _tensors(original)
    assert unet["conv_in.weight"].dtype == np.float32
    np.testing.assert_array_equal(unet["conv_in.weight"], want["model_ema.diffusion_modelinput_blocks00weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_and_configs_inferred_from_the_tensors(made, family):
    from jaxsd.convert.single_file.read import SingleFile

    folder, file, original = made(family)
    from_meta = SingleFile(file)  # jaxsd's own file: every config in its metadata
    assert from_meta.family == family and set(from_meta.components) == set(COMPONENTS[family])
    for name in COMPONENTS[family]:
        assert from_meta.components[name].config == json.loads((folder / name / "config.json").read_text())
    # tensors are memory maps of the file's own bytes, not copies
    tensor = from_meta.state("unet")["conv_in.weight"]
    assert isinstance(tensor, np.memmap) and Path(tensor.filename) == Path(from_meta.file.path).resolve()
    # an original file: the structure from the shapes (head counts are a convention of the real models)
    inferred = SingleFile(original)
    assert inferred.family == family and any(n.startswith(f"family {family}") for n in inferred.notes)
    unet = inferred.components["unet"].config
    want = json.loads((folder / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels"):
        assert unet[key] == want[key], key
    vae = inferred.components["vae"].config
    want = json.loads((folder / "vae" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert vae[key] == want[key], key
    text = inferred.components["text_encoder"].config
    want = json.loads((folder / "text_encoder" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "hidden_act", "intermediate_size"):
        assert text[key] == want[key], key


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, path)
    return path


def test_foreign_truncated_and_mismatched_files_are_refused(made, tmp_path, capsys):
    folder, file, original = made("sd1")
    lora = _write(tmp_path / "lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), np.float16)})
    rc, _, err = _convert(capsys, lora, "--out", tmp_path / "x")
    assert rc == 2 and "is a LoRA file" in err and "jaxsd sample --lora" in err

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    rc, _, err = _convert(capsys, cut, "--out", tmp_path / "y")
    assert rc == 2 and "truncated" in err

    tensors = _tensors(original)
    del tensors["model.diffusion_model.out.2.weight"]
    tensors["model.diffusion_model.not_a_layer.weight"] = np.zeros(3, np.float16)
    bad = _write(tmp_path / "bad.safetensors", tensors)
    rc, _, err = _convert(capsys, bad, "--out", tmp_path / "z", "--config", folder)
    assert rc == 2 and "does not fit a sd1 checkpoint" in err
    assert "missing keys (1): model.diffusion_model.out.2.weight" in err
    assert "unknown keys (1): model.diffusion_model.not_a_layer.weight" in err

    rc, _, err = _convert(capsys, original, "--out", tmp_path / "w", "--family", "sdxl")
    assert rc == 2 and "--family sdxl but the file is sd1" in err
    assert not any((tmp_path / n).exists() for n in "xyzw")  # nothing written on a refusal


def standard_vocab_file(made, family: str, out: Path) -> Path:
    """The family's original file with text encoders of the standard CLIP vocabulary (49408 token embeddings,
    as every real SD checkpoint has): the project's copies of the CLIP tokenizers fit it."""
    _, _, original = made(family)
    tensors = _tensors(original)
    rng = np.random.default_rng(5)
    for k in [k for k in tensors if k.endswith("token_embedding.weight")]:
        tensors[k] = (0.02 * rng.standard_normal((49408, tensors[k].shape[1]))).astype(np.float16)
    save_file(tensors, out, {"format": "pt"})
    return out


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_without_config_the_folder_gets_the_kept_clip_tokenizers(made, family, tmp_path, capsys):
    """No --config: tokenizer/ (and SDXL's tokenizer_2/) are the project's copies of the standard CLIP
    tokenizer, with the family's pad token; diffusers loads the folder and tokenizes with them."""
    import diffusers

    file = standard_vocab_file(made, family, tmp_path / "model.safetensors")
    rc, out, _ = _convert(capsys, file, "--out", tmp_path / "d")
    assert rc == 0
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"} if family == "sdxl" else {"tokenizer": "<|endoftext|>"}
    for tok, pad in pads.items():
        assert (f"{tok}: jaxsd's copy of the standard CLIP vocabulary (OpenAI CLIP BPE, 49408 tokens, pad {pad!r}; "
                "a single file holds no tokenizer)") in out
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(tmp_path / "d"), local_files_only=True)
    for tok, pad in pads.items():
        assert getattr(pipe, tok).pad_token == pad
        assert getattr(pipe, tok)("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenizers_from_config_or_none_when_the_vocabulary_is_not_clips(made, tmp_path, capsys):
    """The tiny file's text encoder has a tiny vocabulary: the standard tokenizer does not fit it, so the
    folder gets none and the message says why; with --config the config's tokenizer wins."""
    folder, file, _ = made("sd1")
    rc, out, _ = _convert(capsys, file, "--out", tmp_path / "d")
    assert rc == 0 and "unet config: the file's metadata" in out
    assert "tokenizer: none: the text encoder has" in out and "not the standard CLIP vocabulary's 49408" in out
    assert not (tmp_path / "d" / "tokenizer").exists()
    assert json.loads((tmp_path / "d" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    rc, out, _ = _convert(capsys, file, "--out", tmp_path / "c", "--config", folder)
    assert rc == 0 and f"tokenizer: {folder / 'tokenizer'}" in out
    assert {f.name: f.read_bytes() for f in (tmp_path / "c" / "tokenizer").iterdir()} == \
        {f.name: f.read_bytes() for f in (folder / "tokenizer").iterdir()}


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", [pytest.param("sd1", marks=pytest.mark.slow), "sd2",
                                    pytest.param("sdxl", marks=pytest.mark.slow)])
def test_sample_from_the_file_draws_what_diffusers_draws(made, family, tmp_path):
    """By default SD2 (v-prediction, OpenCLIP); SD1 and SDXL are `slow` (~40 s each: a sampling compile)."""
    import diffusers
    import torch
    from PIL import Image

    from jaxsd.diffusion.samplers import DIFFUSERS_EQUIVALENT
    from tests.pipelines.conftest import assert_images_close, to_uint8

    folder, file, _ = made(family)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    proc = jaxsd_command("sample", "--model", file, "--config", folder, "--prompt", "a cat", "--steps", "3",
                         "--scheduler", "ddim", "--latents", tmp_path / "latents.npy", "--out", tmp_path / "cat.png")
    assert f"({family}," in proc.stderr
    ours = np.asarray(Image.open(tmp_path / "cat.png"))[None]
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    ref = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    name, overrides = DIFFUSERS_EQUIVALENT["ddim"]
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **overrides)
    theirs = to_uint8(ref("a cat", num_inference_steps=3, guidance_scale=7.5, latents=torch.from_numpy(latents),
                          output_type="np").images)
    assert_images_close(ours, theirs)


def test_what_a_single_file_cannot_give_is_asked_for(made, tmp_path, capsys):
    """A file whose text encoder does not use the standard CLIP vocabulary (the tiny one) has no tokenizer
    jaxsd could supply: `jaxsd sample --model FILE` without --config asks for one."""
    _, file, _ = made("sd1")
    assert main(["sample", "--model", str(file), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "a single-file checkpoint holds no tokenizer; give a diffusers pipeline folder of its family (sd1)" in err
    assert "--config PIPELINE_DIR" in err


@pytest.mark.torch
def test_text_cache_encoder_from_a_file_is_the_converted_folders(made, tmp_path, capsys):
    """data.cache.text_encoder=FILE (no tokenizers in it): the file's text encoder with the kept CLIP tokenizer,
    the same encoder (fingerprint) and token ids as the folder `jaxsd convert FILE` writes."""
    from jaxsd.data.config import load_data_config
    from jaxsd.data.model_encoders import text_encoder

    file = standard_vocab_file(made, "sd1", tmp_path / "model.safetensors")
    assert _convert(capsys, file, "--out", tmp_path / "d")[0] == 0
    encoders = [text_encoder(load_data_config(overrides=[f"data.cache.text_encoder={source}", "data.cache.text=clip"]))
                for source in (file, tmp_path / "d")]
    assert encoders[0].spec == encoders[1].spec
    ids = [np.asarray(e.prepare(["a photo of a cat"])["input_ids"])[0, :8].tolist() for e in encoders]
    assert ids[0] == ids[1] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    hidden = [np.asarray(e.apply(e.params, e.prepare(["a photo of a cat"]))["encoder_hidden_states"]) for e in encoders]
    assert np.isfinite(hidden[0]).all()
    np.testing.assert_array_equal(hidden[0], hidden[1])


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sample_from_a_file_without_config_draws_what_diffusers_draws(made, tmp_path, capsys):
    """`jaxsd sample --model FILE`, no --config (slow: a sampling compile): the kept CLIP tokenizer and the
    family's default configs (the tiny model's size given by --height/--width); diffusers draws the same
    from the folder `jaxsd convert FILE` writes."""
    import diffusers
    import torch
    from PIL import Image

    from jaxsd.diffusion.samplers import DIFFUSERS_EQUIVALENT
    from tests.pipelines.conftest import assert_images_close, to_uint8

    file = standard_vocab_file(made, "sd1", tmp_path / "model.safetensors")
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    jaxsd_command("sample", "--model", file, "--prompt", "a photo of a cat", "--steps", "3", "--scheduler", "ddim",
                  "--height", "16", "--width", "16", "--latents", tmp_path / "latents.npy", "--out", tmp_path / "cat.png")
    ours = np.asarray(Image.open(tmp_path / "cat.png"))[None]
    assert _convert(capsys, file, "--out", tmp_path / "d", "--dtype", "float32")[0] == 0  # the file is fp16
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "d"), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    name, overrides = DIFFUSERS_EQUIVALENT["ddim"]
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **overrides)
    theirs = to_uint8(ref("a photo of a cat", num_inference_steps=3, guidance_scale=7.5, height=16, width=16,
                          latents=torch.from_numpy(latents), output_type="np").images)
    assert_images_close(ours, theirs)
