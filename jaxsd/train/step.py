"""The train state and the pure train step (jitted by the loop with explicit shardings and donated state).

    state, metrics = train_step(state, batch)

One step: draw the batch's randomness from (state.rng, step) → loss and gradient
w.r.t. the trainable params only, accumulated over `grad_accum_steps`
micro-batches with a scan → optimizer update → EMA. A NaN/inf loss or gradient
leaves params, optimizer state and EMA untouched and counts a skip instead.

Streamed updates (`streamed=True`, for optimizers without global-norm clipping): no
quantity that needs every gradient gates the update, so XLA can update each param as
soon as its gradient exists and free that gradient, instead of holding all of them
(SD1.5 fp32: 3.4 GB). The skip is then decided by the loss alone, and the gradient
norm and `qk_grads_av` leave the step as per-param partial sums (`reduce_metrics`
finishes them): one in-graph sum over all gradients would again keep every gradient
alive until the end of the step (measured: XLA temporaries 2.0 → 3.6 GB on SD1.5).

Fused updates (`fused_update`, `train.fused_update`): each segmented UNet block's AdamW update runs inside
its own backward pass (`jaxsd.train.fused_update`); streamed, and with `params_finite` in place of the
gradient statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxsd.config import EMAConfig, LossConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train.compile import shared_reduction_below
from jaxsd.train.ema import update_ema
from jaxsd.train.fused_update import AdamWSegmentUpdate, fused_update_step, params_finite
from jaxsd.train.loss import ApplyFn, diffusion_loss, draw_randomness
from jaxsd.train.optimizers import applied_updates
from jaxsd.train.rounding import apply_updates, needs_stochastic_rounding
from jaxsd.train.trainable import flatten, merge_params


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and goes into a checkpoint).

    step: int32 [] optimizer steps done.  params: trainable params (fp32 masters).
    frozen: params that do not train.  opt_state: optax state of `params` only.
    ema: EMA of `params`, or None.  rng: uint32 [2] raw key data (the run's base key).
    nonfinite: int32 [] consecutive skipped (NaN/inf) steps.
    """

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    ema: Any
    rng: jax.Array
    nonfinite: jax.Array


def init_state(params: Any, frozen: Any, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)), nonfinite=jnp.zeros([], jnp.int32))


def _qk_partials(grads: Any) -> tuple[list[jax.Array], int]:
    """([Σ |g| of each attention to_q / to_k kernel], number of values those kernels hold)."""
    qk = [g for path, g in flatten(grads).items() if path.endswith(("to_q/kernel", "to_k/kernel"))]
    return [jnp.sum(jnp.abs(g.astype(jnp.float32))) for g in qk], sum(g.size for g in qk)


def qk_grads_average(grads: Any) -> jax.Array:
    """Mean |grad| over attention to_q / to_k kernels (0 when there are none)."""
    parts, count = _qk_partials(grads)
    return sum(parts) / count if count else jnp.zeros([], jnp.float32)


def squared_norm_parts(grads: Any) -> list[jax.Array]:
    """Σ g² (f32 scalars) per param; on CPU the params below `shared_reduction_below()` values
    share one (jaxsd/train/compile.py: a compile-time choice of XLA:CPU's)."""
    below = shared_reduction_below()
    leaves = [g.astype(jnp.float32) for g in jax.tree.leaves(grads)]
    parts = [jnp.sum(jnp.square(g)) for g in leaves if g.size >= below]
    small = [g.reshape(-1) for g in leaves if g.size < below]
    if small:
        parts.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return parts


def global_norm(grads: Any) -> jax.Array:
    """√Σ g² over every gradient (as `optax.tree.norm`, summed in `squared_norm_parts`' order)."""
    return jnp.sqrt(sum(squared_norm_parts(grads)))


def gradient_partials(grads: Any) -> dict[str, Any]:
    """Per-param partial sums of the gradient statistics, for `reduce_metrics`.

    grad_sq_parts: `squared_norm_parts` (f32 scalars).  qk_abs_parts: [Σ |g| of each
    to_q/to_k kernel].  qk_count: [] number of values those kernels hold.
    """
    qk_parts, qk_count = _qk_partials(grads)
    return {"grad_sq_parts": squared_norm_parts(grads),
            "qk_abs_parts": qk_parts, "qk_count": jnp.asarray(float(qk_count), jnp.float32)}


def reduce_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A step's metrics (device or host arrays) → {name: float}; partial sums of a streamed
    step become `grad_norm` and `qk_grads_av`."""
    out = {k: float(v) for k, v in metrics.items() if not k.endswith(("_parts", "_count"))}
    if "grad_sq_parts" in metrics:
        out["grad_norm"] = math.sqrt(math.fsum(float(x) for x in metrics["grad_sq_parts"]))
        count = float(metrics["qk_count"])
        out["qk_grads_av"] = math.fsum(float(x) for x in metrics["qk_abs_parts"]) / count if count else 0.0
    return out


# fold_in data of `model_draws`' key: draw_randomness splits the step key in 6 (with partitionable
# threefry, split i = fold_in i), so any constant above 5 is a stream of its own
_MODEL_DRAWS_STREAM = 0x4C6F5241
# and of the stochastic rounding of bfloat16 params' updates (jaxsd.train.rounding)
_ROUNDING_STREAM = 0x526F756E


def _split_micro(x: jax.Array, k: int, spec: Any) -> jax.Array:
    """[k·b, ...] → [k, b, ...] with every micro-batch spread over all batch shards.

    Reshaping to [b, k] first keeps each device's contiguous slice of the batch on
    that device (no communication); micro-batch j is column j.
    """
    y = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    if spec is not None:
        y = jax.lax.with_sharding_constraint(y, spec)
    return y


def make_train_step(apply_fn: ApplyFn, schedule: NoiseSchedule, loss_cfg: LossConfig,
                    tx: optax.GradientTransformationExtraArgs, lr_fn: optax.Schedule, *, ema_cfg: EMAConfig | None = None,
                    grad_accum_steps: int = 1, empty_cond: dict[str, jax.Array] | None = None,
                    micro_batch_sharding: Any = None, loss_fn: Callable | None = None,
                    streamed: bool = False, combine: Callable[..., Any] = merge_params,
                    encode_text: Callable | None = None,
                    model_draws: Callable[[jax.Array, int], dict] | None = None,
                    perceptual: Any = None,
                    fused_update: Callable[[], AdamWSegmentUpdate] | None = None) -> Callable:
    """The pure step function `(state, batch) -> (state, metrics)`.

    apply_fn(params, noisy, t, encoder_hidden_states, added_cond) runs the model on what `combine(trainable,
      frozen)` makes: by default the merged full params; LoRA: {"params": base, "lora": adapters}.
    encode_text(trainable, frozen, batch, drop [B] bool, model_draws) -> batch: for batches of token ids, the
      batch with its text encoded ("encoder_hidden_states", "pooled"), dropped samples from the empty caption
      (`jaxsd.train.text.text_conditioning`); model_draws: those of `model_draws` or None. None: the batch
      holds cached embeddings, and dropped samples take `empty_cond`.
    tx: from `jaxsd.train.optimizers.make_optimizer` (or `guarded(any_optax_tx)`): its update takes
      `grad_norm=` (clipping) and `apply=` (the NaN skip).
    loss_fn: replaces `diffusion_loss` (same signature) — the "what the loss is" seam.
    micro_batch_sharding: sharding of a [k, b, ...] micro-batch stack (None on one device).
    model_draws(key, batch_size) -> {name: [B, ...]}: per-sample randomness the model itself uses
      (LoRA dropout's keys). Drawn from its own stream of the step's key, split into micro-batches
      with the other draws, and given to `combine(trainable, frozen, model_draws_output)`.
    perceptual: a `jaxsd.train.perceptual.StepPerceptual` (loss.perceptual): its `mask(step, t)` joins the draws
      as "perceptual" [B], and its `term(frozen, x0, x0_pred, draws)` is the objective's `extra_loss`.
    streamed: update each param as soon as its gradient exists (module docstring); the
      optimizer must not clip by the global norm. The skip then looks at the loss only.
    fused_update: () -> a fresh `AdamWSegmentUpdate`: each segmented block's update inside its backward pass
      (`jaxsd.train.fused_update`; `tx` must be its `fused_adamw` without clipping, `apply_fn` take the variables
      dict, k = 1). Metrics then hold `params_finite` instead of grad_norm and qk_grads_av.
    metrics: loss, loss_raw, grad_norm, lr, qk_grads_av, skipped (1 if this update was skipped);
      streamed: grad_norm and qk_grads_av as partial sums — pass metrics through `reduce_metrics`.
    """
    k = grad_accum_steps
    objective = loss_fn or diffusion_loss
    if loss_cfg.cond_dropout > 0 and empty_cond is None and encode_text is None:
        raise ValueError("loss.cond_dropout > 0 needs the empty-prompt embedding (empty_cond); "
                         "the data source did not provide one")

    if fused_update is not None and (k != 1 or not streamed):
        raise ValueError("fused_update: no gradient accumulation, and a streamed step (no clipping)")

    def loss_of(trainable, frozen, batch, draws, moments=None):
        if encode_text is not None:  # token ids → what the UNet is conditioned on (inside the gradient)
            batch = encode_text(trainable, frozen, batch, draws["drop"], draws.get("model"))
        variables = combine(trainable, frozen) if model_draws is None else combine(trainable, frozen, draws["model"])
        if moments is not None:  # fused_update: the optimizer's moments beside the params
            variables = {"params": variables, **moments}
        if perceptual is None:
            return objective(apply_fn, variables, batch, draws, schedule, loss_cfg, empty_cond)
        extra = functools.partial(perceptual.term, frozen)
        return objective(apply_fn, variables, batch, draws, schedule, loss_cfg, empty_cond, extra_loss=extra)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        draws = draw_randomness(rng, batch, loss_cfg, schedule.num_train_timesteps)
        if model_draws is not None:  # a stream of its own: the loss's draws stay what they are without it
            draws["model"] = model_draws(jax.random.fold_in(rng, _MODEL_DRAWS_STREAM), draws["t"].shape[0])
        if perceptual is not None:  # which samples get the perceptual terms at this step: [B], split as the draws
            draws["perceptual"] = perceptual.mask(state.step, draws["t"])
        if fused_update is not None:
            loss, raw, new_params, new_opt = fused_update_step(
                lambda p, moments: loss_of(p, state.frozen, batch, draws, moments), state.params,
                state.opt_state, lr_fn(applied_updates(state.opt_state)), fused_update())
            return _finish(state, loss, raw, new_params, new_opt, jnp.isfinite(loss),
                           {"params_finite": params_finite(new_params)})
        if k == 1:
            (loss, raw), grads = grad_fn(state.params, state.frozen, batch, draws)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, k, micro_batch_sharding), (batch, draws))

            def body(carry, mb):
                g_sum, l_sum = carry
                (l, r), g = grad_fn(state.params, state.frozen, *mb)
                return (jax.tree.map(jnp.add, g_sum, g), l_sum + l), r

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (g_sum, l_sum), raws = jax.lax.scan(body, (zeros, 0.0), micro)
            grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), g_sum, state.params)
            loss, raw = l_sum / k, jax.tree.map(lambda r: r.mean(axis=0), raws)
        if streamed:
            grad_norm = None
            finite = jnp.isfinite(loss)
        else:
            grad_norm = global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # the skip lives inside the optimizer (updates exactly 0, state rewritten with itself):
        # selecting old-or-new state here would cost XLA a whole-state temporary
        updates, new_opt = tx.update(grads, state.opt_state, state.params, grad_norm=grad_norm, apply=finite)
        # bfloat16 params: p + u rounded stochastically (jaxsd/train/rounding.py); fp32: optax's p + u
        rounding_key = jax.random.fold_in(rng, _ROUNDING_STREAM) if needs_stochastic_rounding(state.params) else None
        new_params = apply_updates(state.params, updates, rounding_key)
        if streamed:
            stats = gradient_partials(grads)
        else:
            stats = {"grad_norm": grad_norm, "qk_grads_av": qk_grads_average(grads)}
        return _finish(state, loss, raw, new_params, new_opt, finite, stats)

    def _finish(state, loss, raw, new_params, new_opt, finite, stats):
        """The new state (step, EMA, skip count) and the metrics, from the update's results."""
        new_step = state.step + 1
        new_ema = None if state.ema is None else update_ema(state.ema, new_params, new_step, ema_cfg or EMAConfig(),
                                                            apply=finite)
        new_state = state.replace(
            step=new_step, params=new_params, opt_state=new_opt, ema=new_ema,
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
        )
        # the optimizer's schedule runs on its own count of applied updates, which lags state.step after skips
        lr = lr_fn(applied_updates(state.opt_state))
        # the objective's second value: the raw loss, or a dict of metrics (data.subsets: loss_raw,
        # loss_instance, loss_prior)
        extra = raw if isinstance(raw, dict) else {"loss_raw": raw}
        metrics = {"loss": loss, **extra, "lr": lr, "skipped": (~finite).astype(jnp.int32), **stats}
        return new_state, metrics

    return step_fn
