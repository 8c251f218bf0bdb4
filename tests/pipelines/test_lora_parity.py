"""LoRA files against diffusers + PEFT, the reference, on the tiny SD1 and SDXL pipelines.

Both directions, UNet output and every text encoder's outputs within 1e-4 relative (fp32):
  * files jaxsd writes (PEFT and kohya layouts; attn_ff rank 4 alpha 8 + LoCon rank 2 alpha 1 on
    the UNet, rank 4 alpha 2 on the text encoders) loaded with `pipe.load_lora_weights`;
  * files diffusers writes (`save_lora_weights` from a PEFT-adapted pipeline) and, for SD1, a
    kohya file built by kohya's naming rules, loaded in jaxsd — and written back bit-exactly.
All up/B matrices are random and non-zero; each test also checks that without the LoRA the
outputs miss by far. Every file has the same layers as the first, so jaxsd compiles one UNet
program per family for the whole module.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxsd.convert.lora import LoraInfo, lora_variables, read_lora, write_lora
from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.models.names import torch_module_name
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.pipelines.lora import TEXT_COMPONENTS, lora_model
from jaxsd.pipelines.pipeline import StableDiffusion
from tests.convert.lora_tiny import lora_plans, random_lora
from tests.helpers import rel_err
from tests.pipelines.conftest import lora_loaded

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPT = "a photo of a cat"



@partial(jax.jit, static_argnums=0)
def _text_forward(model, params, extra, ids):
    """The text encoder's outputs (all hidden states) with optional extra variable collections."""
    return model.apply({"params": params, **extra}, ids, None)

class Env:
    """One family: the jaxsd pipeline and jitted forwards, the diffusers pipeline, fixed inputs."""

    def __init__(self, family, folder, jaxsd_pipe, torch, ref=None):
        import diffusers
        self.family, self.folder, self.torch = family, folder, torch
        self.lp = jaxsd_pipe.pipe
        self.model = lora_model(self.lp)
        self.plans = lora_plans(self.model)
        cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
        self.ref = ref or cls.from_pretrained(folder)  # LoRAs are loaded into it and unloaded again
        rng = np.random.default_rng(0)
        cfg = self.lp.unet_config
        self.x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        self.t = np.array([10, 700], np.float32)
        self.ctx = rng.standard_normal((2, 7, cfg.context_dim)).astype(np.float32)
        self.added = None
        if cfg.addition_embed_type == "text_time":
            self.added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
                          "time_ids": rng.uniform(0, 64, (2, 6)).astype(np.float32)}
        unet = UNet2DConditionModel(cfg)
        self._unet = jax.jit(lambda p, lora, x, t, c, a: unet.apply({"params": p, "lora": lora}, x, t, c, a))
        self.text = dict(zip(TEXT_COMPONENTS, self.lp.text.components))
        self.ids = np.asarray(self.text["text_encoder"].tokenizer([PROMPT]).input_ids)
        self.base = self.torch_outputs()

    def jaxsd_outputs(self, variables: dict) -> dict:
        unet = self._unet(self.lp.unet_params, variables["unet"], jnp.asarray(self.x.transpose(0, 2, 3, 1)),
                          jnp.asarray(self.t), jnp.asarray(self.ctx),
                          None if self.added is None else {k: jnp.asarray(v) for k, v in self.added.items()})
        out = {"unet": np.asarray(unet).transpose(0, 3, 1, 2)}
        for name, comp in self.text.items():
            lora = variables[name]
            o = _text_forward(comp.model, comp.params, {} if lora is None else {"lora": lora}, jnp.asarray(self.ids))
            out[f"{name}.last"], out[f"{name}.penultimate"] = o.last_hidden_state, o.hidden_states[-2]
            if o.text_embeds is not None:
                out[f"{name}.embeds"] = o.text_embeds
        return out

    def torch_outputs(self, pipe=None) -> dict:
        pipe, torch = pipe or self.ref, self.torch
        added = None if self.added is None else {k: torch.from_numpy(v) for k, v in self.added.items()}
        with torch.no_grad():
            out = {"unet": pipe.unet(torch.from_numpy(self.x), torch.from_numpy(self.t), torch.from_numpy(self.ctx),
                                     added_cond_kwargs=added).sample.numpy()}
            for name in self.text:
                o = getattr(pipe, name)(torch.from_numpy(self.ids).long(), output_hidden_states=True)
                out[f"{name}.last"], out[f"{name}.penultimate"] = o.last_hidden_state, o.hidden_states[-2]
                if getattr(o, "text_embeds", None) is not None:
                    out[f"{name}.embeds"] = o.text_embeds
        return {k: np.asarray(v) for k, v in out.items()}

    def check(self, variables: dict, ref: dict) -> None:
        """jaxsd with `variables` equals `ref` (1e-4), and without the LoRA (up = 0: the same program)
        it equals diffusers' base model but misses `ref` by far."""
        ours = self.jaxsd_outputs(variables)
        assert set(ours) == set(ref)
        errors = {k: rel_err(ours[k], ref[k]) for k in ref}
        assert max(errors.values()) <= 1e-4, errors
        zero_up = {c: traverse_util.unflatten_dict({p: (jnp.zeros_like(v) if p[-1] == "up" else v)
                                                    for p, v in traverse_util.flatten_dict(tree).items()})
                   for c, tree in variables.items()}
        base = self.jaxsd_outputs(zero_up)
        assert max(rel_err(base[k], self.base[k]) for k in ref) <= 1e-4
        assert min(rel_err(base[k], ref[k]) for k in ref) > 0.02, "the LoRA changes every output"


@pytest.fixture(scope="module")
def sd_env(sd_folder, sd_pipe, torch_single_thread):
    # a diffusers pipeline of its own: with transformers 5 and peft < 0.22, unloading a LoRA that was
    # used with cross_attention_kwargs={"scale": ...} does not restore the shared session pipeline's
    # text encoder exactly (tests/pipelines/test_lora_sample.py runs one before)
    return Env("sd1", sd_folder, sd_pipe, torch_single_thread)


@pytest.fixture(scope="module")
def sdxl_env(sdxl_folder, torch_single_thread):
    return Env("sdxl", sdxl_folder, StableDiffusion.from_folder(sdxl_folder), torch_single_thread)


def _jaxsd_files_load_in_diffusers(env, layout, tmp_path):
    lora = random_lora(env.model, seed=1)
    path = tmp_path / f"{layout}.safetensors"
    write_lora(path, lora, env.model, layout=layout, info=LoraInfo(env.family, rank=4, alpha=8, conv_rank=2,
                                                                   conv_alpha=1, targets="attn_ff"))
    with lora_loaded(env.ref, path) as pipe:
        ref = env.torch_outputs(pipe)
    env.check(lora_variables(read_lora(path, env.model)), ref)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_sd1_jaxsd_files_give_diffusers_outputs(sd_env, layout, tmp_path):
    _jaxsd_files_load_in_diffusers(sd_env, layout, tmp_path)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_sdxl_jaxsd_files_give_diffusers_outputs(sdxl_env, layout, tmp_path):
    """SDXL kohya files use the SGM UNet names, which diffusers maps back with its kohya converter."""
    _jaxsd_files_load_in_diffusers(sdxl_env, layout, tmp_path)


def _peft_adapted(env, seed):
    """A fresh diffusers pipeline with PEFT adapters on the layers of our plans (same ranks/alphas),
    A and B random; and the LoraConfigs used."""
    from peft import LoraConfig, inject_adapter_in_model
    torch = env.torch
    pipe = type(env.ref).from_pretrained(env.folder)
    configs = {}
    for component, plan in env.plans.items():
        names = {torch_module_name(p).removeprefix("text_model."): s for p, s in plan.items()}
        conv = {n: s for n, s in names.items() if s.rank == 2}
        config = LoraConfig(r=4, lora_alpha=8 if component == "unet" else 2, target_modules=sorted(names),
                            rank_pattern={n: 2 for n in conv}, alpha_pattern={n: 1 for n in conv})
        if component == "unet":
            pipe.unet.add_adapter(config)
        else:  # transformers' add_adapter wants peft >= 0.22; PEFT's own injection is what it calls
            inject_adapter_in_model(config, getattr(pipe, component))
        configs[component] = config
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for component in configs:
            for name, p in getattr(pipe, component).named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    scale = p.shape[1] ** -0.5 if "lora_A" in name else 0.3  # as tests.convert.lora_tiny
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return pipe, configs


def _save_like_diffusers(env, pipe, configs, folder):
    """As diffusers' training scripts save a LoRA: PEFT state dicts + LoraConfig.to_dict() metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    kwargs = {}
    for component, config in configs.items():
        module = getattr(pipe, component)
        if component == "unet":
            state = get_peft_model_state_dict(module)
        else:  # PEFT's state-dict names for an injected (not PeftModel-wrapped) adapter
            state = {k.replace(".default.", "."): v for k, v in module.state_dict().items() if "lora_" in k}
        kwargs[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(state)
        kwargs[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(folder, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def _kohya_rules_file(pipe, configs, path):
    """The same adapters as kohya names them for SD1 (lora_unet_/lora_te_ + the module name with
    underscores, lora_down/lora_up, a 0-d alpha per layer), from the PEFT-adapted torch modules."""
    import torch
    state = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    for component in configs:
        for name, module in getattr(pipe, component).named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            full = ("text_model." + name) if component != "unet" and not name.startswith("text_model.") else name
            key = prefixes[component] + full.replace(".", "_")
            state[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().clone()
            state[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().clone()
            state[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha["default"]))
    save_file({k: v.numpy() for k, v in state.items()}, path)
    return path


def _diffusers_file_loads_and_round_trips(env, seed, tmp_path):
    """A PEFT-adapted diffusers pipeline saved by diffusers loads in jaxsd into its outputs, and
    PEFT -> jaxsd -> PEFT gives the same tensors, bit for bit. Returns (pipe, configs, its outputs)."""
    pipe, configs = _peft_adapted(env, seed)
    ref = env.torch_outputs(pipe)
    peft_file = _save_like_diffusers(env, pipe, configs, tmp_path / "peft")
    lora = read_lora(peft_file, env.model)
    env.check(lora_variables(lora), ref)
    out = tmp_path / "again.safetensors"
    write_lora(out, lora, env.model, layout="peft")
    assert _tensors(out) == _tensors(peft_file)
    return pipe, configs, ref


def test_sd1_files_from_diffusers_and_kohya_rules_give_the_same_outputs_and_round_trip(sd_env, tmp_path):
    pipe, configs, ref = _diffusers_file_loads_and_round_trips(sd_env, 2, tmp_path)
    kohya_file = _kohya_rules_file(pipe, configs, tmp_path / "kohya.safetensors")
    with lora_loaded(sd_env.ref, kohya_file) as reloaded:  # diffusers' kohya converter agrees with our file
        assert max(rel_err(reloaded_out, ref[k]) for k, reloaded_out in sd_env.torch_outputs(reloaded).items()) <= 1e-5
    kohya = read_lora(kohya_file, sd_env.model)
    sd_env.check(lora_variables(kohya), ref)
    out = tmp_path / "kohya_again.safetensors"
    write_lora(out, kohya, sd_env.model, layout="kohya")
    assert _tensors(out) == _tensors(kohya_file)


def test_sdxl_file_from_diffusers_gives_the_same_outputs_and_round_trips(sdxl_env, tmp_path):
    _diffusers_file_loads_and_round_trips(sdxl_env, 3, tmp_path)


def _tensors(path) -> dict:
    f = SafetensorsFile(path)
    return {k: (f.dtype(k), f.shape(k), np.asarray(f[k]).tobytes()) for k in f}
