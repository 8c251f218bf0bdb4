"""jaxsd side of the UNet benchmarks: model, inputs, optimizers, the "simple" step, compile helpers.

The simple train step is forward + backward + optimizer update of the MSE loss on
pre-noised latents with a fixed target — exactly what `bench/torch_unet.py` runs in
PyTorch for `--step simple`. `bench/jaxsd_steps.py` wraps it and jaxsd's real
training step behind one interface; `abstract_params` / `abstract_batch` let the
flops, scaling and optimizer-state suites compile without allocating a weight.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.presets import LEARNING_RATE, WEIGHT_DECAY, input_shapes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def build_model(cfg: dict, dtype: str = "float32", attention_impl: str = "auto", remat_policy=None,
                param_dtype: str = "float32", segmented_backward: bool = False):
    """jaxsd's `UNet2DConditionModel` for a diffusers config dict; `param_dtype` params (fp32 masters
    unless told), `dtype` compute; segmented_backward: the trainer's `model.segmented_backward` (a "train"
    kit's step applies it to the collection that trains)."""
    from jaxsd.models.unet import UNet2DConditionModel, UNetConfig

    return UNet2DConditionModel(UNetConfig.from_diffusers(cfg), dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype],
                                attention_impl=attention_impl, remat_policy=remat_policy,
                                segmented_backward="params" if segmented_backward else None)


def abstract_batch(cfg: dict, batch: int, latent: int) -> dict:
    shapes = input_shapes(cfg, batch, latent)
    out = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    out["timesteps"] = jax.ShapeDtypeStruct(shapes["timesteps"], jnp.int32)
    out["target"] = jax.ShapeDtypeStruct(shapes["sample"], jnp.float32)
    return out


def make_optimizer(name: str) -> optax.GradientTransformation:
    """The optimizer under test. 8-bit AdamW is jaxsd's own (jaxsd.train.optimizers)."""
    if name == "adamw":
        return optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
    if name == "adafactor":
        return optax.adafactor(LEARNING_RATE)
    if name == "adamw8bit":
        from jaxsd.train.fused_adamw import adamw_8bit

        return adamw_8bit(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _forward(model, params, batch):
    added = None
    if "text_embeds" in batch:
        added = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}
    return model.apply({"params": params}, batch["sample"], batch["timesteps"], batch["encoder_hidden_states"],
                       added_cond=added)


def make_loss_fn(model) -> Callable:
    """(params, batch) -> MSE of the prediction to the batch's fixed target, in fp32."""

    def loss_fn(params, batch):
        pred = _forward(model, params, batch)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - batch["target"]))

    return loss_fn


def make_train_step(model, tx: optax.GradientTransformation) -> Callable:
    """(params, opt_state, batch) -> (params, opt_state, loss): MSE to the noise target, fp32 loss."""
    loss_fn = make_loss_fn(model)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def abstract_params(model) -> dict:
    """Param shapes via `jax.eval_shape` (nothing allocated)."""
    from jaxsd.models.params import abstract_params as _abstract
    from jaxsd.models.unet import example_inputs

    params, _ = _abstract(model, *example_inputs(model.config))
    return params


def init_params(model, seed: int = 0) -> dict:
    """Randomly initialised fp32 params (jitted, so only the final arrays are materialised)."""
    from jaxsd.models.params import init_params as _init
    from jaxsd.models.unet import example_inputs

    return jax.jit(lambda k: _init(model, k, *example_inputs(model.config)))(jax.random.key(seed))


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def timed_compile(fn: Callable, *args, donate_argnums=(0, 1), compiler_options: dict | None = None, **jit_kw):
    """AOT-compile `fn` for `args` (arrays or ShapeDtypeStructs); returns (compiled, lower_s, compile_s)."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate_argnums, **jit_kw).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options or None)
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def flops_of(compiled) -> float | None:
    """XLA's cost-analysis FLOPs of a compiled executable (None when the backend gives none)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per partition
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def memory_figures(compiled) -> dict:
    """XLA's memory analysis of a compiled step, GB per device: arguments, outputs, the outputs that
    reuse donated argument buffers (alias), temporaries, and the total a device holds while it runs
    (arguments + outputs − alias + temporaries)."""
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("this backend gives no memory analysis of the compiled step")
    gb = {name: getattr(mem, f"{attr}_size_in_bytes") / 1e9 for name, attr in
          (("argument_gb", "argument"), ("output_gb", "output"), ("alias_gb", "alias"), ("temp_gb", "temp"))}
    gb["per_device_gb"] = gb["argument_gb"] + gb["output_gb"] - gb["alias_gb"] + gb["temp_gb"]
    return gb
