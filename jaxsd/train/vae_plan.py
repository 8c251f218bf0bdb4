"""VAE training's plan (`model.kind: vae`): the models, the two optimizers and the sharded abstract state.

The engine's entry points (`jaxsd.train.plan.plan_state` / `fresh_state` / `plan_train_step`,
`jaxsd.train.base.base_fingerprint` / `load_frozen`) hand a VAE config to the functions here, so the
loop, checkpoints, resume, logging and sharding run VAE training unchanged. The state's layout is in
jaxsd/train/vae_step.py. What is frozen (and so never checkpointed, but reloaded and fingerprinted):
with `loss.vae.train_encoder: false` the encoder and quant_conv, and the LPIPS network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsd.config import Config
from jaxsd.errors import ConfigError
from jaxsd.models.discriminator import NLayerDiscriminator, example_image, init_discriminator
from jaxsd.models.params import abstract_params
from jaxsd.models.vae import AutoencoderKL, example_inputs
from jaxsd.train.model import describe
from jaxsd.train.optimizers import make_optimizer
from jaxsd.train.sharding import param_shardings, state_shardings
from jaxsd.train.step import TrainState
from jaxsd.train.trainable import flatten, merge_params, split_params
from jaxsd.train.vae_model import build_vae, initial_vae_params, vae_config, vae_folder
from jaxsd.train.vae_step import LAST_LAYER, init_vae_state, keyed_optimizers, make_vae_train_step

log = logging.getLogger("jaxsd.train")
FROZEN_ENCODER = ("^encoder/", "^quant_conv/")  # loss.vae.train_encoder: false


@dataclasses.dataclass
class VAEPlan:
    """The autoencoder, discriminator, LPIPS and optimizers of one VAE config, and its abstract state.

    param_shapes / param_shardings: the autoencoder's (what `initial_vae_params` makes); the
    discriminator's are in the state's params["disc"]."""

    module: AutoencoderKL
    param_shapes: Any
    param_shardings: Any
    tx: Any
    lr_fn: Any
    abstract: TrainState
    state_shardings: TrainState
    disc: NLayerDiscriminator | None  # None: loss.vae.discriminator false (params["disc"] is then {})
    lpips: Any  # the LPIPS module, or None (loss.vae.lpips_weight 0)
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    base_dtype: Any = None
    adapters: None = None  # what the UNet's StatePlan has and a VAE run has not
    text: None = None
    projection: None = None

    def split(self, params: Any) -> tuple[Any, Any]:
        """The autoencoder's full params → (trained, frozen)."""
        return split_params(params, self.trainable, self.frozen)

    def merged(self, trainable: Any, frozen: Any) -> Any:
        """The full autoencoder params from the state's (params, frozen) trees (or their EMA as `trainable`)."""
        return merge_params(trainable["vae"] if "disc" in trainable else trainable, frozen["vae"])

    def describe_trainable(self) -> str:
        """The run log's "trainable: X of Y": the discriminator trains too, so it counts in both X and Y."""
        trained, disc = self.abstract.params, self.abstract.params["disc"]
        return (f"{describe(trained)} of {describe({'vae': self.param_shapes, 'disc': disc})} (autoencoder "
                f"{describe(trained['vae'])} of {describe(self.param_shapes)}, discriminator {describe(disc)})")


def _lpips_shapes() -> tuple[Any, Any]:
    from jaxsd.losses.lpips import LPIPS
    image = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return abstract_params(LPIPS(), image, image)


def plan_vae_state(cfg: Config, mesh) -> VAEPlan:
    """Models, optimizers and the sharded abstract TrainState of a VAE config on `mesh` (no allocation)."""
    v, rules = cfg.loss.vae, dict(cfg.sharding.rules)
    module = build_vae(cfg.model, vae_config(cfg.model))
    shapes, logical = abstract_params(module, *example_inputs(module.config))
    shardings = param_shardings(shapes, logical, mesh, rules)
    trainable = tuple(cfg.train.trainable)
    frozen = tuple(cfg.train.frozen) + (() if v.train_encoder else FROZEN_ENCODER)
    if "/".join(LAST_LAYER) not in flatten(split_params(shapes, trainable, frozen)[0]):
        raise ConfigError("VAE training needs the decoder's last layer (decoder/conv_out/kernel) to train: the "
                          "adaptive GAN weight is measured there. Leave it out of train.frozen")
    disc, d_shapes, d_logical = None, {}, {}  # loss.vae.discriminator false: an empty tree in its place
    if v.discriminator:
        disc = NLayerDiscriminator(v.disc_layers, v.disc_channels, dtype=jnp.dtype(cfg.model.dtype))
        d_shapes, d_logical = abstract_params(disc, example_image(v.disc_layers))
    lpips, l_shapes, l_shard = None, {}, {}
    if v.lpips_weight > 0:
        from jaxsd.losses.lpips import LPIPS
        lpips = LPIPS()
        l_shapes, l_logical = _lpips_shapes()
        l_shard = param_shardings(l_shapes, l_logical, mesh, rules)
    t_shapes, f_shapes = split_params(shapes, trainable, frozen)
    t_shard, f_shard = split_params(shardings, trainable, frozen)
    t_shapes = {"vae": t_shapes, "disc": d_shapes}
    t_shard = {"vae": t_shard, "disc": param_shardings(d_shapes, d_logical, mesh, rules)}
    f_shapes, f_shard = {"vae": f_shapes, "lpips": l_shapes}, {"vae": f_shard, "lpips": l_shard}
    tx_ae, lr_fn = make_optimizer(cfg.optimizer, cfg.train.steps)
    disc_lr = v.disc_learning_rate or cfg.optimizer.learning_rate
    tx_d, _ = make_optimizer(dataclasses.replace(cfg.optimizer, learning_rate=disc_lr), cfg.train.steps)
    tx = keyed_optimizers({"vae": tx_ae, "disc": tx_d})
    ema = cfg.train.ema.enabled
    abstract = jax.eval_shape(lambda t, f: init_vae_state(t["vae"], f["vae"], t["disc"], f["lpips"], tx,
                                                          cfg.train.seed, ema), t_shapes, f_shapes)
    rep = NamedSharding(mesh, P())
    state_sharding = abstract.replace(
        step=rep, params=t_shard, frozen=f_shard, rng=rep, nonfinite=rep, ema=t_shard["vae"] if ema else None,
        opt_state={k: state_shardings(abstract.opt_state[k], t_shard[k], mesh) for k in t_shard})
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    lpips_note = ", LPIPS on" if lpips is not None else ""
    if disc is None:
        log.info("VAE training: no discriminator (loss.vae.discriminator false)%s", lpips_note)
    else:
        log.info("VAE training: discriminator %d layers × %d channels%s", v.disc_layers, v.disc_channels, lpips_note)
    return VAEPlan(module, shapes, shardings, tx, lr_fn, abstract, state_sharding, disc, lpips, trainable, frozen,
                   jnp.dtype(cfg.model.param_dtype))


def _lpips_params(cfg: Config, plan: VAEPlan) -> Any:
    if plan.lpips is None:
        return {}
    from jaxsd.losses.weights import load_lpips
    lc = cfg.loss.lpips
    params = load_lpips(lc.weights, lc.heads, allow_pickle=lc.allow_pickle)
    return jax.device_put(params, plan.state_shardings.frozen["lpips"])


def fresh_vae_state(cfg: Config, plan: VAEPlan, params: Any) -> TrainState:
    """A new VAE train state from the autoencoder's full `params` (donated): the discriminator initialised
    from train.seed (taming's init), LPIPS read from its files, fresh optimizers, EMA = params."""
    trained, frozen = plan.split(params)
    disc = {}
    if plan.disc is not None:
        d_init = jax.jit(lambda k: init_discriminator(plan.disc, k), out_shardings=plan.state_shardings.params["disc"])
        disc = d_init(jax.random.fold_in(jax.random.key(cfg.train.seed), 1))
    init = jax.jit(lambda t, f, d, lp: init_vae_state(t, f, d, lp, plan.tx, cfg.train.seed, cfg.train.ema.enabled),
                   out_shardings=plan.state_shardings, donate_argnums=(0, 1))
    return init(trained, frozen, disc, _lpips_params(cfg, plan))


def load_vae_frozen(cfg: Config, plan: VAEPlan, *, lpips: bool = True) -> Any:
    """The frozen trees as at the start of the run: {"vae": encoder (decoder-only) or {}, "lpips": ...}.
    lpips=False: {} for it (what an export needs: the autoencoder alone)."""
    frozen = {}
    if jax.tree.leaves(plan.abstract.frozen["vae"]):
        params, _ = initial_vae_params(cfg.model, plan.module, cfg.train.seed, plan.param_shardings,
                                       dtype=plan.base_dtype)
        frozen = plan.split(params)[1]
    return {"vae": frozen, "lpips": _lpips_params(cfg, plan) if lpips else {}}


def vae_fingerprint(cfg: Config, folder_parts, file_digest) -> str:
    """What a VAE run's frozen params are made from: the VAE (folder files, or scratch config + seed) and the
    LPIPS files. folder_parts(folder, variant), file_digest(path): jaxsd.train.base's digests."""
    from jaxsd.losses.weights import installed_heads

    if cfg.model.pretrained:
        parts = folder_parts(vae_folder(cfg.model.pretrained), cfg.model.variant)
        base = "pretrained:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    else:
        arch = json.dumps(dict(cfg.model.vae), sort_keys=True)
        base = "scratch:" + hashlib.sha256(f"{arch}|seed={cfg.train.seed}".encode()).hexdigest()[:16]
    if cfg.loss.vae.lpips_weight <= 0:
        return base
    lc = cfg.loss.lpips
    files = [Path(p) for p in (lc.weights, lc.heads or installed_heads()) if p]
    return f"{base}+lpips:" + hashlib.sha256("\n".join(file_digest(p) for p in files).encode()).hexdigest()[:16]


def vae_train_step(cfg: Config, plan: VAEPlan) -> Any:
    """The pure step of `cfg` over `plan`'s state (jaxsd/train/vae_step.py)."""
    return make_vae_train_step(plan.module, plan.disc, plan.lpips, cfg.loss.vae, plan.tx, plan.lr_fn,
                               ema_cfg=cfg.train.ema)
