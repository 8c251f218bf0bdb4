"""The UNet's perceptual terms (jaxsd/train/perceptual.py, `loss.perceptual`): the step's term equals a direct
computation — decode both latents with the VAE, `LPIPS` on the pair, Gram matrices against the references' — with
the timestep mask and `every`; the x0 prediction inverts the noising for each prediction type; config errors.

The whole run through `jaxsd cache` → `jaxsd train` is tests/train/test_perceptual_cli.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.config import Config, ConfigError, LossConfig, load_config
from jaxsd.config_losses import LPIPSLossConfig, PerceptualLossConfig, StyleLossConfig
from jaxsd.data.config import CacheConfig, DataConfig, ImageConfig
from jaxsd.data.images import decode, prepare, read_bytes, to_rgb
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.errors import InputError
from jaxsd.losses.lpips import LPIPS, scale_input
from jaxsd.losses.vgg import VGG16Features
from jaxsd.losses.weights import load_lpips
from jaxsd.models.vae import AutoencoderKL
from jaxsd.train.perceptual import load_perceptual, step_perceptual
from jaxsd.train.sharding import make_mesh
from tests.data.test_cache_command import TINY, save_tiny_vae
from tests.helpers import rel_err
from tests.train.perceptual_files import save_random_lpips, save_style_images

RESOLUTION = 16
LAYERS = ["relu1_2", "relu2_2", "relu3_3"]
LAYER_WEIGHTS = [1.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("perceptual")
    _, vae_params = save_tiny_vae(base / "vae", 0)
    return base, vae_params, save_random_lpips(base / "lpips.safetensors"), save_style_images(base / "style")


def _config(files, **perceptual) -> Config:
    base, _, lpips, style = files
    return Config(loss=LossConfig(lpips=LPIPSLossConfig(weights=str(lpips)),
                                  style=StyleLossConfig(layers=LAYERS, layer_weights=LAYER_WEIGHTS,
                                                        references=[str(style)]),
                                  perceptual=PerceptualLossConfig(**perceptual)),
                  data=DataConfig(cache=CacheConfig(vae=str(base / "vae")), image=ImageConfig(resolution=RESOLUTION)))


@pytest.fixture(scope="module")
def term_setup(files):
    cfg = _config(files, lpips_weight=0.5, style_weight=3.0, every=2, max_timestep=500)
    perceptual = step_perceptual(cfg)
    params = load_perceptual(cfg, perceptual, jnp.float32, perceptual.shardings(make_mesh(cfg.sharding), cfg.sharding.rules))
    rng = np.random.default_rng(0)
    x0, x0_pred = (jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32) for _ in range(2))
    term = jax.jit(lambda p, x, y, step, t: perceptual.term({"perceptual": p}, x, y,
                                                            {"perceptual": perceptual.mask(step, t)}))
    return cfg, perceptual, params, x0, x0_pred, term


def _direct(files, x0, x0_pred) -> tuple[np.ndarray, np.ndarray]:
    """(LPIPS [B], style loss [B]) computed plainly: the whole VAE's decode, the LPIPS module, NumPy Gram losses."""
    _, vae_params, lpips_file, style = files
    lpips_params = load_lpips(lpips_file)
    vae, vgg = AutoencoderKL(TINY), VGG16Features(taps=tuple(LAYERS))
    refs = jnp.asarray(np.stack([prepare(to_rgb(decode(read_bytes(p)))[0], RESOLUTION, RESOLUTION).pixels
                                 for p in sorted(style.iterdir())]))

    @jax.jit  # one program (op by op, the convolutions take half a minute on a busy CPU)
    def run(x0, x0_pred, refs):
        image, target = (vae.apply({"params": vae_params}, TINY.unscale_latents(z), method="decode") for z in (x0_pred, x0))
        feats = vgg.apply({"params": lpips_params["vgg"]}, scale_input(jnp.concatenate([image, refs])))
        return LPIPS().apply({"params": lpips_params}, image, target), feats

    lpips, feats = jax.device_get(run(x0, x0_pred, refs))
    image_feats = {k: v[:len(x0)] for k, v in feats.items()}
    ref_feats = {k: v[len(x0):] for k, v in feats.items()}

    def grams(f):  # [B, H, W, C] -> [B, C, C] = FᵀF / (C·H·W), in float64
        b, h, w, c = f.shape
        f = np.asarray(f, np.float64).reshape(b, h * w, c)
        return np.einsum("bnc,bnd->bcd", f, f) / (c * h * w)

    style_loss = sum(w * np.mean((grams(image_feats[k]) - grams(ref_feats[k]).mean(axis=0)) ** 2, axis=(1, 2))
                     for k, w in zip(LAYERS, LAYER_WEIGHTS))
    return np.asarray(lpips), style_loss


# slow: ~25 s of VGG16 / VAE compiles; the default run keeps the CLI run (tests/train/test_perceptual_cli.py)
@pytest.mark.slow
def test_term_equals_decode_then_lpips_and_style_with_the_timestep_mask(files, term_setup):
    _, _, params, x0, x0_pred, term = term_setup
    lpips, style = _direct(files, x0, x0_pred)
    t = jnp.asarray([100, 700, 500], jnp.int32)  # the second sample is above max_timestep=500
    total, metrics = term(params, x0, x0_pred, jnp.asarray(4, jnp.int32), t)
    kept = np.array([0, 2])
    assert float(metrics["perceptual_samples"]) == 2.0
    assert rel_err(metrics["loss_lpips"], lpips[kept].mean()) <= 1e-4
    assert rel_err(metrics["loss_style"], style[kept].mean()) <= 1e-4
    assert rel_err(total, 0.5 * lpips[kept].mean() + 3.0 * style[kept].mean()) <= 1e-4
    assert float(metrics["loss_lpips"]) > 0 and float(metrics["loss_style"]) > 0


@pytest.mark.slow  # shares the compiled term of the test above
def test_term_is_zero_off_the_every_grid_and_when_no_sample_qualifies(term_setup):
    _, _, params, x0, x0_pred, term = term_setup
    low = jnp.asarray([0, 10, 20], jnp.int32)
    for step, t in ((3, low), (4, jnp.asarray([501, 900, 999], jnp.int32))):  # every=2: step 3 is off
        total, metrics = term(params, x0, x0_pred, jnp.asarray(step, jnp.int32), t)
        assert float(total) == 0.0 and float(metrics["loss_lpips"]) == 0.0 and float(metrics["loss_style"]) == 0.0
        assert float(metrics["perceptual_samples"]) == 0.0


@pytest.mark.slow  # compiles VGG16's and the VAE decoder's backward (~20 s)
def test_gradient_reaches_only_the_masked_in_predictions(term_setup):
    _, perceptual, params, x0, x0_pred, _ = term_setup
    t = jnp.asarray([100, 700, 500], jnp.int32)
    grad = jax.jit(jax.grad(lambda y: perceptual.term({"perceptual": params}, x0, y,
                                                      {"perceptual": perceptual.mask(jnp.asarray(0), t)})[0]))(x0_pred)
    norms = np.sqrt(np.sum(np.square(np.asarray(grad)), axis=(1, 2, 3)))
    assert norms[1] == 0.0 and norms[0] > 0 and norms[2] > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_inverts_the_noising(prediction_type):
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    schedule = NoiseSchedule.from_config(config, prediction_type=prediction_type)
    rng = np.random.default_rng(1)
    x0, noise = (jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32) for _ in range(2))
    t = jnp.asarray([0, 400, 900], jnp.int32)
    noisy = schedule.add_noise(x0, noise, t)
    x0_hat = schedule.predict_x0(noisy, schedule.target(x0, noise, t), t)
    assert np.max(np.abs(np.asarray(x0_hat - x0))) <= 1e-4
    # a zero-terminal-SNR schedule's last step: finite values and gradients (ε says nothing of x0 there)
    zero_snr = NoiseSchedule.from_config({**config, "rescale_betas_zero_snr": True}, prediction_type=prediction_type)
    last = jnp.full((3,), 999, jnp.int32)
    value, grad = jax.value_and_grad(lambda y: jnp.sum(zero_snr.predict_x0(noisy, y, last)))(noise)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("overrides, message", [
    (["loss.perceptual.lpips_weight=1"], "needs the VGG16 backbone: set loss.lpips.weights"),
    (["loss.perceptual.every=0"], "loss.perceptual.every=0 must be >= 1"),
    (["loss.perceptual.max_timestep=1000"], "must be within 0...999"),
    (["loss.perceptual.style_weight=-1"], "must be >= 0"),
    (["loss.perceptual.lpips_weight=1", "loss.lpips.weights=x.safetensors"], "data.cache.vae"),
    (["loss.perceptual.style_weight=1", "loss.lpips.weights=x.safetensors", "data.cache.vae=v"],
     "set loss.style.references"),
    (["loss.perceptual.style_weight=1", "loss.lpips.weights=x.safetensors", "data.cache.vae=v",
      "loss.style.references=[/nonexistent/style.png]"], "/nonexistent/style.png does not exist"),
    (["loss.perceptual.lpips_weight=1", "loss.perceptual.max_timestep=999", "diffusion.rescale_betas_zero_snr=true"],
     "zero-terminal-SNR schedule"),
])
def test_config_errors_name_what_is_missing(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert message in str(e.value)


def test_unreadable_style_reference_is_named(files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    cfg = _config(files, style_weight=1.0)
    cfg = Config(loss=LossConfig(lpips=cfg.loss.lpips, perceptual=cfg.loss.perceptual,
                                 style=StyleLossConfig(references=[str(bad)])), data=cfg.data)
    perceptual = step_perceptual(cfg)
    with pytest.raises(InputError, match="cannot read .*broken.png as an image"):
        load_perceptual(cfg, perceptual, jnp.float32, perceptual.shardings(make_mesh(cfg.sharding), cfg.sharding.rules))
