"""AutoencoderKL: parity with diffusers PyTorch, tiling, round trip, config and posterior.

Tiny random VAEs shaped like each family are built in diffusers with a fixed
seed (weights perturbed so that no norm is the identity and no bias zero),
saved with `save_pretrained`, loaded by jaxsd and run on the same inputs.
Compilations dominate the run time, so each model is jitted once per input
shape (tiling reuses the parity test's compiled full-tile functions).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.convert.rules import ConversionError
from jaxsd.convert.safetensors_io import SafetensorsFile, save_file
from jaxsd.convert.vae import load_vae, save_vae
from jaxsd.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from jaxsd.models.vae_tiling import TileSettings, _jitted, tiled_decode, tiled_encode
from tests.helpers import rel_err

TOL = 1e-4
DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"

# Tiny configs shaped like the families (diffusers keys).
_TWO = {"block_out_channels": [8, 16], "down_block_types": [DOWN] * 2, "up_block_types": [UP] * 2,
        "layers_per_block": 1, "norm_num_groups": 4}
SD = {**_TWO, "latent_channels": 4, "sample_size": 16}
SDXL = {"block_out_channels": [8, 16, 16], "down_block_types": [DOWN] * 3, "up_block_types": [UP] * 3,
        "layers_per_block": 2, "norm_num_groups": 4, "latent_channels": 4, "sample_size": 32,
        "scaling_factor": 0.13025, "force_upcast": True}
SD3 = {**_TWO, "latent_channels": 8, "sample_size": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
       "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False,
       "force_upcast": False}


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def _torch_vae(config: dict, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(seed)
    vae = TorchVAE(**config).eval()
    with torch.no_grad():  # diffusers inits norms to 1/0; perturb so every tensor matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (torch vae, folder, jaxsd config, params, model)."""
    out = {}
    for name, cfg in (("sd", SD), ("sdxl", SDXL), ("sd3", SD3)):
        tv = _torch_vae(cfg)
        folder = tmp_path_factory.mktemp(f"vae_{name}")
        tv.save_pretrained(folder)
        config, params = load_vae(folder)
        # sd: 8×8 latents = 64 queries run in chunks of 24 (the last padded), proving chunking exact
        chunk = 24 if name == "sd" else None
        out[name] = (tv, folder, config, params, AutoencoderKL(config, attention_chunk_size=chunk))
    return out


@pytest.mark.torch
@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_encode_decode_match_diffusers(built, name):
    import torch

    tv, _, config, params, model = built[name]
    rng = np.random.default_rng(1)
    size = config.sample_size
    x = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    z = rng.standard_normal((1, size // config.downscale, size // config.downscale, config.latent_channels))
    z = z.astype(np.float32)
    with torch.no_grad():
        post = tv.encode(torch.from_numpy(_nchw(x))).latent_dist
        ref_dec = tv.decode(torch.from_numpy(_nchw(z))).sample.numpy()
    ours = tiled_encode(model, params, jnp.asarray(x))  # one tile: untiled, via the shared jitted function
    assert rel_err(ours.mean, _nhwc(post.mean)) <= TOL
    assert rel_err(ours.logvar, _nhwc(post.logvar)) <= TOL
    dec = _jitted(model, "decode")(params, jnp.asarray(z))
    assert rel_err(dec, _nhwc(ref_dec)) <= TOL


@pytest.mark.torch
def test_tiled_encode_and_decode_match_diffusers_tiling(built):
    import torch

    tv, _, config, params, model = built["sd3"]  # no quant convs: diffusers checks the config there too
    settings = TileSettings.for_config(config)  # 16 px / 8 latents, overlap 0.25 — diffusers' defaults
    assert (settings.sample_size, settings.latent_size, settings.overlap) == (16, 8, 0.25)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 24, 24, 3)).astype(np.float32)  # tiles 16,12 per axis, blended over 2 latents
    z = rng.standard_normal((1, 12, 12, 8)).astype(np.float32)  # tiles 8,6 per axis, blended over 4 pixels
    with torch.no_grad():
        untiled = tv.decode(torch.from_numpy(_nchw(z))).sample.numpy()
        tv.enable_tiling()
        try:
            post = tv.encode(torch.from_numpy(_nchw(x))).latent_dist
            ref_dec = tv.decode(torch.from_numpy(_nchw(z))).sample.numpy()
        finally:
            tv.disable_tiling()
    assert rel_err(ref_dec, untiled) > 1e-2  # the reference really tiled and blended
    ours = tiled_encode(model, params, jnp.asarray(x), settings)
    assert ours.mean.shape == _nhwc(post.mean).shape
    assert rel_err(ours.mean, _nhwc(post.mean)) <= TOL
    assert rel_err(ours.logvar, _nhwc(post.logvar)) <= TOL
    dec = tiled_decode(model, params, jnp.asarray(z), settings)
    assert dec.shape == _nhwc(ref_dec).shape
    assert rel_err(dec, _nhwc(ref_dec)) <= TOL


def test_tile_settings_errors():
    with pytest.raises(ValueError, match="overlap"):
        TileSettings(16, 8, 1.0)
    with pytest.raises(ValueError, match="positive"):
        TileSettings(0, 8)


@pytest.mark.torch
def test_round_trip_is_bit_identical_and_loads_cleanly_in_diffusers(built, tmp_path):
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    for name in ("sd", "sd3"):
        tv, _folder, config, params, _ = built[name]
        out = tmp_path / name
        save_vae(out, config, params)
        back, info = TorchVAE.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
        ref = tv.state_dict()
        got = back.state_dict()
        assert set(got) == set(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
        assert set(SafetensorsFile(out / "diffusion_pytorch_model.safetensors")) == set(ref)
        strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
        assert strip(back.config) == strip(tv.config)
        assert VAEConfig.from_diffusers(json.loads((out / "config.json").read_text())) == config
    # an fp16 variant, sharded: what diffusers' from_pretrained(variant="fp16") reads
    tv, _, config, params, _ = built["sd"]
    save_vae(tmp_path / "fp16", config, params, dtype=np.float16, variant="fp16", max_shard_bytes=20_000)
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    half, info = TorchVAE.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16,
                                          output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    for k, v in tv.state_dict().items():
        assert torch.equal(half.state_dict()[k], v.half()), k


@pytest.mark.torch
def test_legacy_attention_names_and_conv_shapes_load(built, tmp_path):
    """Pre-0.14 diffusers checkpoints: query/key/value/proj_attn, stored as 1×1 convs."""
    _, folder, _config, params, _ = built["sd"]
    state = dict(SafetensorsFile(folder / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                v = v.reshape(v.shape + (1, 1)) if v.ndim == 2 else v
        legacy[k] = np.asarray(v)
    assert any(".query.weight" in k for k in legacy) and any(".proj_attn.weight" in k for k in legacy)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    _, loaded = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_missing_key_is_one_error_naming_it(built, tmp_path):
    _, folder, _, _, _ = built["sd"]
    state = dict(SafetensorsFile(folder / "diffusion_pytorch_model.safetensors"))
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError, match=r"missing keys \(1\): decoder\.conv_out\.bias") as e:
        load_vae(tmp_path)
    assert "unexpected keys (1): decoder.extra.weight" in str(e.value)


def test_save_refuses_params_of_another_config(built, tmp_path):
    _, _, _, params, _ = built["sd"]
    with pytest.raises(ConversionError, match="do not match the config"):
        save_vae(tmp_path, VAEConfig(**{**SD, "latent_channels": 8}), params)


@pytest.mark.parametrize("key,value,match", [
    ("down_block_types", [DOWN, "AttnDownEncoderBlock2D"], "block type 'AttnDownEncoderBlock2D'"),
    ("up_block_types", [UP], "one entry per block"),
    ("act_fn", "gelu_tanh", "act_fn='gelu_tanh'"),
    ("norm_num_groups", 3, "norm_num_groups=3"),
    ("latents_mean", [0.0], "latents_mean"),
    ("norm_type", "spatial", "keys jaxsd does not know: \\['norm_type'\\]"),
])
def test_unsupported_config_values_name_key_and_value(key, value, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig.from_diffusers({**SD, key: value})


def test_config_round_trip_and_latent_scaling():
    sd3 = VAEConfig.from_diffusers({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", **SD3})
    assert VAEConfig.from_diffusers(sd3.to_diffusers()) == sd3
    assert sd3.to_diffusers()["block_out_channels"] == [8, 16]
    z = jnp.asarray([1.0, -2.0])
    np.testing.assert_allclose(sd3.scale_latents(z), (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(sd3.unscale_latents(sd3.scale_latents(z)), z, rtol=1e-6)
    sdxl = VAEConfig.from_diffusers(REAL["sdxl"])
    assert (sdxl.scaling_factor, sdxl.force_upcast, sdxl.sample_size) == (0.13025, True, 1024)
    assert VAEConfig.from_diffusers(sdxl.to_diffusers()) == sdxl
    sd = VAEConfig.from_diffusers(SD)
    assert sd.shift_factor is None and sd.scaling_factor == 0.18215
    np.testing.assert_allclose(sd.scale_latents(z), z * 0.18215, rtol=1e-6)


# Playground-v2.5-like statistics (its VAE config carries latents_mean/std), drawn per channel
STATS = {**SD, "scaling_factor": 0.5, "latents_mean": [-1.6, 0.8, 0.3, -0.4], "latents_std": [4.2, 2.1, 0.7, 1.3]}


def test_latents_mean_std_scale_as_diffusers():
    """Encode as diffusers' SDXL img2img `prepare_latents`, decode as `StableDiffusionXLPipeline`, per channel
    (NHWC: channels last); decode(encode(z)) == z; the log-variance follows the per-channel scale."""
    cfg = VAEConfig.from_diffusers(STATS)
    z = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)) * 3.0
    m, s = np.asarray(STATS["latents_mean"]), np.asarray(STATS["latents_std"])
    np.testing.assert_allclose(cfg.scale_latents(z), (np.asarray(z) - m) * 0.5 / s, rtol=1e-6)
    np.testing.assert_allclose(cfg.unscale_latents(z), np.asarray(z) * s / 0.5 + m, rtol=1e-6)
    np.testing.assert_allclose(cfg.unscale_latents(cfg.scale_latents(z)), z, rtol=1e-5, atol=1e-6)
    logvar = jnp.full((1, 2, 2, 4), -1.0)
    np.testing.assert_allclose(cfg.scale_logvar(logvar)[0, 0, 0], -1.0 + 2 * np.log(0.5 / s), rtol=1e-6)
    plain = VAEConfig.from_diffusers(SD)  # without statistics: scaling_factor alone, as before
    np.testing.assert_allclose(plain.scale_logvar(logvar), logvar + 2 * np.log(0.18215), rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    ({"latents_std": None}, "has latents_mean but no latents_std"),
    ({"latents_mean": None}, "has latents_std but no latents_mean"),
    ({"shift_factor": 0.1}, "both shift_factor=0.1 and latents_mean/latents_std"),
    ({"latents_std": [1.0, 0.0, 1.0, 1.0]}, "every value must be > 0"),
])
def test_ambiguous_latent_statistics_are_refused(change, match):
    from jaxsd.errors import InputError
    with pytest.raises(InputError, match=match):
        VAEConfig.from_diffusers({**STATS, **change})


@pytest.mark.torch
def test_posterior_matches_diffusers_distribution():
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(3)
    moments = rng.standard_normal((2, 3, 3, 8)).astype(np.float32) * 3
    moments[0, 0, 0, 4] = -50.0  # clipped to -30
    moments[1, 0, 0, 5] = 40.0  # clipped to 20
    other_m = rng.standard_normal((2, 3, 3, 8)).astype(np.float32)
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)

    @jax.jit  # one compilation instead of one per eager op
    def ours_fn(moments, other_m, x, key):
        post, other = DiagonalGaussian.from_moments(moments), DiagonalGaussian.from_moments(other_m)
        return {"mode": post.mode(), "logvar": post.logvar, "kl": post.kl(), "kl_other": post.kl(other),
                "nll": post.nll(x), "sample": post.sample(key),
                "expected_sample": post.mean + post.std * jax.random.normal(key, x.shape),
                "other_sample": post.sample(jax.random.key(1))}

    ours = ours_fn(moments, other_m, x, jax.random.key(0))
    ref = DiagonalGaussianDistribution(torch.from_numpy(_nchw(moments)))
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(_nchw(other_m)))
    assert float(ours["logvar"].min()) == -30.0 and float(ours["logvar"].max()) == 20.0
    np.testing.assert_array_equal(ours["mode"], _nhwc(ref.mode()))
    np.testing.assert_array_equal(ours["logvar"], _nhwc(ref.logvar))
    assert rel_err(ours["kl"], ref.kl().numpy()) <= 1e-5
    assert rel_err(ours["kl_other"], ref.kl(ref_other).numpy()) <= 1e-5
    assert rel_err(ours["nll"], ref.nll(torch.from_numpy(_nchw(x))).numpy()) <= 1e-5
    np.testing.assert_allclose(ours["sample"], ours["expected_sample"], rtol=1e-6)
    assert not np.allclose(ours["sample"], ours["other_sample"])


def test_force_upcast_and_bf16(built):
    _, _, config, params, model = built["sd"]  # SD config: force_upcast=True (the diffusers default)
    z = jnp.asarray(np.random.default_rng(4).standard_normal((1, 8, 8, 4)), jnp.float32)
    upcast = AutoencoderKL(config, dtype=jnp.float16)
    assert upcast.compute_dtype == jnp.float32
    assert AutoencoderKL(config, dtype=jnp.float16, force_upcast=False).compute_dtype == jnp.float16
    decode_dtype = lambda m: jax.eval_shape(
        lambda p, z: m.apply({"params": p}, z, method="decode"), params, z).dtype
    assert decode_dtype(upcast) == jnp.float32
    bf16 = AutoencoderKL(config, dtype=jnp.bfloat16)  # bf16 has fp32's range: not upcast
    assert bf16.compute_dtype == jnp.bfloat16
    ref = _jitted(model, "decode")(params, z)
    out = jax.jit(lambda p, z: bf16.apply({"params": p}, z, method="decode"))(params, z)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref) <= 2e-2


def test_bad_input_shape_is_a_clear_error(built):
    _, _, _config, params, model = built["sd"]
    with pytest.raises(ValueError, match=r"expected NHWC input \[B, H, W, 3\]"):
        model.apply({"params": params}, jnp.zeros((1, 3, 16, 16)), method="encode")


# Real configs of the families' VAEs (as in their config.json files).
_BLOCKS = {"block_out_channels": [128, 256, 512, 512], "down_block_types": [DOWN] * 4,
           "up_block_types": [UP] * 4, "in_channels": 3, "out_channels": 3, "act_fn": "silu",
           "layers_per_block": 2, "norm_num_groups": 32}
REAL = {
    "sd15": dict(_BLOCKS, _class_name="AutoencoderKL", _diffusers_version="0.6.0", latent_channels=4,
                 sample_size=512),
    "sdxl": dict(_BLOCKS, _class_name="AutoencoderKL", _diffusers_version="0.20.0.dev0", latent_channels=4,
                 sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "sd3": dict(_BLOCKS, _class_name="AutoencoderKL", _diffusers_version="0.29.0.dev0", latent_channels=16,
                sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True, latents_mean=None,
                latents_std=None, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", ["sd15", "sd3"])  # sdxl's tensors are sd15's
def test_real_configs_give_diffusers_param_shapes(name):
    """Full-size configs: every tensor of diffusers' model (built on the meta device) has our shape."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from jaxsd.convert.rules import flax_to_torch
    from jaxsd.models.params import abstract_params
    from jaxsd.models.vae import example_inputs

    config = VAEConfig.from_diffusers(REAL[name])
    assert VAEConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in TorchVAE.from_config(REAL[name]).state_dict().items()}
    abstract, _ = abstract_params(AutoencoderKL(config), *example_inputs(config))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.int8), abstract)  # 84M int8: ~0.1 s
    ours = {k: v.shape for k, v in flax_to_torch(zeros).items()}
    assert ours == ref
    if name == "sd15":
        assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863


@pytest.mark.slow  # two gradient compilations (~20 s on a busy 2-core machine)
def test_remat_gives_the_same_gradients():
    from jaxsd.models.params import init_params

    config = VAEConfig(block_out_channels=(8,), norm_num_groups=4)
    x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (1, 4, 4, 3)), jnp.float32)
    params = init_params(AutoencoderKL(config), jax.random.key(0), x)

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)

    plain, remat = grads(AutoencoderKL(config)), grads(AutoencoderKL(config, remat_policy="nothing_saveable"))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        assert rel_err(b, a) <= 1e-6
    with pytest.raises(ValueError, match="remat_policy 'nope'"):
        AutoencoderKL(config, remat_policy="nope").init(jax.random.key(0), x)


def test_query_chunking_refuses_masks():
    from jaxsd.models.attention import attention

    q = jnp.zeros((1, 8, 1, 4))
    with pytest.raises(ValueError, match="query_chunk_size works only without mask"):
        attention(q, q, q, mask=jnp.ones((1, 1, 8, 8), bool), query_chunk_size=4)
