"""The VAE train step (jaxsd/train/vae_step.py) against a direct computation with `jax.grad`.

One tiny pretrained VAE folder, a decoder-only fine-tune (`loss.vae.train_encoder: false`) with the
discriminator on from step 0: the step's adaptive weight, loss and gradient norm must be what
differentiating LDM's loss term by term gives, and the frozen encoder must stay bitwise as loaded.
`slow`: the same with LPIPS in the loss (a random VGG16 + heads file in torchvision's layout).
Without the discriminator (`loss.vae.discriminator: false`) the step is `jax.grad` of reconstruction + KL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import ShardingConfig, load_config
from jaxsd.train.model import initial_params
from jaxsd.train.plan import fresh_state, plan_state, plan_train_step
from jaxsd.train.sharding import make_mesh
from jaxsd.train.step import global_norm
from jaxsd.train.trainable import merge_params

# one block (no down/upsampling): the fewest ops, so the fastest compile, with every kind of layer the step meets
TINY_VAE = {"block_out_channels": [8], "down_block_types": ["DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D"], "norm_num_groups": 4, "latent_channels": 4}


def save_tiny_vae(folder) -> None:
    """A randomly initialised tiny AutoencoderKL saved as a diffusers folder."""
    from jaxsd.convert.vae import save_vae
    from jaxsd.models.params import init_params
    from jaxsd.models.vae import AutoencoderKL, VAEConfig, example_inputs

    config = VAEConfig.from_diffusers(TINY_VAE)
    save_vae(folder, config, init_params(AutoencoderKL(config), jax.random.key(3), *example_inputs(config)))


VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))


def save_random_lpips(path) -> None:
    """A random VGG16 `features` + LPIPS heads as one safetensors in torchvision's / lpips' key layout."""
    from jaxsd.convert.safetensors_io import save_file

    rng = np.random.default_rng(0)
    state = {}
    for i, cin, cout in VGG16_CONVS:
        state[f"features.{i}.weight"] = (rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        state[f"features.{i}.bias"] = np.zeros(cout, np.float32)
    for i, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{i}.model.1.weight"] = rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32)
    save_file(state, path, {"format": "pt"})


def _setup(base, lpips: bool, discriminator: bool = True):
    save_tiny_vae(base / "vae")
    extra = [] if discriminator else ["loss.vae.discriminator=false"]
    if lpips:
        save_random_lpips(base / "lpips.safetensors")
        extra += [f"loss.lpips.weights={base / 'lpips.safetensors'}", "loss.vae.lpips_weight=0.5"]
    cfg = load_config("vae_tiny", [f"model.pretrained={base / 'vae'}", "loss.vae.train_encoder=false",
                                   "loss.vae.disc_start=0", "loss.vae.kl_weight=0.01", f"data.roots=[{base}]",
                                   "optimizer.clip_grad_norm=null", "loss.vae.disc_layers=1", *extra])
    mesh = make_mesh(ShardingConfig(data=1), jax.devices()[:1])
    plan = plan_state(cfg, mesh)
    params, _ = initial_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings)
    loaded = jax.tree.map(lambda a: np.array(a, copy=True), params)  # fresh_state donates params
    state = fresh_state(cfg, plan, params)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    new_state, metrics = jax.jit(plan_train_step(cfg, plan, mesh))(state, {"pixels": x})
    return cfg, plan, state, new_state, metrics, x, loaded


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("vae_step"), lpips=False)


@pytest.fixture(scope="module")
def setup_lpips(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("vae_step_lpips"), lpips=True)


@pytest.mark.parametrize("which", ["setup", pytest.param("setup_lpips", marks=pytest.mark.slow)])
def test_step_matches_ldm_loss_differentiated_term_by_term(which, request):
    cfg, plan, state, _, metrics, x, _ = request.getfixturevalue(which)
    vae, disc, c = plan.module, plan.disc, cfg.loss.vae
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)

    def terms(decoder):
        p = {"params": merge_params(decoder, state.frozen["vae"])}
        posterior = vae.apply(p, x, method="encode")
        x_rec = vae.apply(p, posterior.sample(key), method="decode")
        nll = jnp.mean(jnp.abs(x - x_rec))
        if plan.lpips is not None:
            nll += c.lpips_weight * jnp.mean(plan.lpips.apply({"params": state.frozen["lpips"]}, x, x_rec))
        g = -jnp.mean(disc.apply({"params": state.params["disc"]}, x_rec))
        return nll, g, jnp.mean(posterior.kl()) / x[0].size

    trained = state.params["vae"]

    @jax.jit
    def last_layer_grads(p):
        last = lambda i: jax.grad(lambda q: terms(q)[i])(p)["decoder"]["conv_out"]["kernel"]
        return last(0), last(1)

    nll_grad, g_grad = last_layer_grads(trained)
    weight = min(float(jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)), 1e4) * 0.5

    @jax.jit
    def total(p, w):
        nll, g, kl = terms(p)
        return nll + c.kl_weight * kl + w * g

    loss, grads = jax.value_and_grad(total)(trained, weight)
    np.testing.assert_allclose(float(metrics["adaptive_weight"]), weight, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(global_norm(grads)), rtol=1e-4)
    assert float(metrics["disc_factor"]) == 1.0 and float(metrics["d_loss"]) > 0 and not int(metrics["skipped"])
    assert (float(metrics["lpips"]) > 0) == (plan.lpips is not None)


def test_decoder_only_keeps_the_encoder_bitwise(setup):
    _, _, _, new_state, _, _, loaded = setup
    assert set(new_state.params["vae"]) == {"decoder", "post_quant_conv"}
    frozen = jax.tree.map(np.asarray, new_state.frozen["vae"])
    assert set(frozen) == {"encoder", "quant_conv"}
    jax.tree.map(np.testing.assert_array_equal, frozen, {k: loaded[k] for k in frozen})
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.tree.map(np.asarray, new_state.params["vae"]),
                         {k: loaded[k] for k in ("decoder", "post_quant_conv")})
    assert all(jax.tree.leaves(moved))  # the decoder did train


def test_without_discriminator_the_step_is_the_gradient_of_reconstruction_and_kl(tmp_path):
    cfg, plan, state, new_state, metrics, x, _ = _setup(tmp_path, lpips=False, discriminator=False)
    assert plan.disc is None and state.params["disc"] == {} and new_state.params["disc"] == {}
    assert not {"g_loss", "d_loss", "adaptive_weight", "disc_grad_norm"} & set(metrics)
    vae, key = plan.module, jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)

    @jax.jit
    def total(p):
        q = {"params": merge_params(p, state.frozen["vae"])}
        posterior = vae.apply(q, x, method="encode")
        x_rec = vae.apply(q, posterior.sample(key), method="decode")
        return jnp.mean(jnp.abs(x - x_rec)) + cfg.loss.vae.kl_weight * jnp.mean(posterior.kl()) / x[0].size

    loss, grads = jax.value_and_grad(total)(state.params["vae"])
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(global_norm(grads)), rtol=1e-4)
    assert not int(metrics["skipped"])
