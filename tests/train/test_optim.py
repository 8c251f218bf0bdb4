"""Optimizers, schedules, 8-bit AdamW, trainable selection, gradient accumulation, EMA, NaN skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsd.config import DiffusionConfig, EMAConfig, LossConfig, OptimizerConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train.adamw8bit import dequantize, quantize, state_bytes
from jaxsd.train.ema import update_ema
from jaxsd.train.fused_adamw import adamw_8bit, moments
from jaxsd.train.optimizers import learning_rate_schedule, make_optimizer
from jaxsd.train.step import init_state, make_train_step
from jaxsd.train.trainable import flatten, merge_params, split_params
from tests.helpers import rel_err
from tests.train.toy import batch, toy

SCHED = NoiseSchedule.from_config(DiffusionConfig().to_scheduler_config())


@pytest.fixture(scope="module")
def model():
    return toy()


def test_schedules_warmup_and_min_lr():
    cos = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10,
                                                 min_lr_ratio=0.1), 110)
    assert float(cos(0)) == 0.0 and abs(float(cos(5)) - 0.5) < 1e-6 and abs(float(cos(10)) - 1.0) < 1e-6
    assert abs(float(cos(110)) - 0.1) < 1e-6 and abs(float(cos(60)) - 0.55) < 1e-6
    lin = learning_rate_schedule(OptimizerConfig(learning_rate=2.0, schedule="linear", min_lr_ratio=0.5), 100)
    assert abs(float(lin(50)) - 1.5) < 1e-6 and abs(float(lin(100)) - 1.0) < 1e-6
    assert float(learning_rate_schedule(OptimizerConfig(learning_rate=3.0), 10)(7)) == 3.0


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor", "lion", "sgd"])
def test_every_optimizer_decays_kernels_not_norms_or_biases(name):
    params = {"dense": {"kernel": jnp.ones((64, 80)), "bias": jnp.ones((80,))}, "norm": {"scale": jnp.ones((80,))}}
    tx, _ = make_optimizer(OptimizerConfig(name=name, learning_rate=0.1, weight_decay=0.5, clip_grad_norm=1.0), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0  # decayed
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0 and float(jnp.abs(updates["norm"]["scale"]).max()) == 0


def test_quantisation_round_trip_is_accurate():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(5000) * np.logspace(-4, 0, 5000), jnp.float32)
    for signed, v in ((True, x), (False, jnp.square(x))):
        y = dequantize(quantize(v, 256, signed), v.shape, signed)
        blockmax = jnp.abs(v).reshape(-1)[: 4864].reshape(-1, 256).max(1).repeat(256)
        err = jnp.abs(y - v)[:4864] / blockmax
        assert float(err.max()) < 0.02, (signed, float(err.max()))


def test_dynamic_map_is_sorted_and_quantisation_picks_the_nearest_code():
    # the closed-form encoder must agree with a brute-force nearest-entry search over the map
    # (random values over the whole range, every map value, every midpoint between two)
    from jaxsd.train.adamw8bit import _nearest_code, dynamic_map

    rng = np.random.default_rng(1)
    for signed in (True, False):
        table = dynamic_map(signed)
        assert np.all(np.diff(table) > 0) and table[-1] == 1.0 and table.min() == (-table[-2] if signed else 0.0)
        assert 1e-7 < np.abs(table[table != 0]).min() < 1e-6  # seven decades
        x = np.concatenate([rng.uniform(-1.0, 1.0, 20000), np.sign(rng.standard_normal(20000)) *
                            10.0 ** rng.uniform(-8, 0, 20000), table, (table[1:] + table[:-1]) / 2,
                            [-1.0, 0.0, 1.0]]).astype(np.float32)
        x = x if signed else np.abs(x)
        codes = np.asarray(_nearest_code(jnp.asarray(x), signed))
        nearest = np.abs(x[:, None] - table[None, :]).min(1)
        # up to float rounding (at a midpoint either neighbour is right); a wrong bin would be off by
        # a bin width, ≥ 0.7 % of |x|
        np.testing.assert_array_less(np.abs(x - table[codes]) - nearest, 1e-6 * np.abs(x) + 1e-30)


def test_adamw8bit_tracks_fp32_adamw_with_4x_smaller_state():
    # least-squares regression y = X W*; 8-bit and fp32 AdamW from the same start
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    y = x @ w_true + 0.01 * jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((128,))}
    loss = lambda p: jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

    def run(tx):
        def body(carry, _):
            p, s = carry
            l, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), l
        (p, s), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=300)
        return p, s, losses

    p32, s32, l32 = jax.jit(lambda: run(optax.adamw(3e-2, weight_decay=1e-4)))()
    p8, s8, l8 = jax.jit(lambda: run(adamw_8bit(3e-2, weight_decay=1e-4, block_size=256)))()
    assert float(l32[-1]) < 1e-2 * float(l32[0])  # the problem is actually solved
    assert float(l8[-1]) < 1.5 * float(l32[-1]) + 1e-4
    np.testing.assert_allclose(l8[:50], l32[:50], rtol=0.05)
    assert float(jnp.abs(p8["w"] - p32["w"]).max() / jnp.abs(p32["w"]).max()) < 0.02
    # 8-bit blocks for w (8192 values ≥ min_quantized_size); b (128) stays fp32
    ratio = (state_bytes(s32) - 2 * 128 * 4) / (state_bytes(s8) - 2 * 128 * 4)
    assert ratio > 3.8, ratio


def _regression_params_and_grads(seed: int):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((96, 64)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(64), jnp.float32)}
    grads = [jax.tree.map(lambda p, s=s: jnp.asarray(rng.standard_normal(p.shape) * s, jnp.float32), params)
             for s in (0.01, 3.0, 0.1, 10.0, 0.5)]
    return params, grads


def test_fused_adamw_is_optax_clip_then_adamw():
    from jaxsd.train.fused_adamw import fused_adamw
    from jaxsd.train.optimizers import decay_mask

    params, grads = _regression_params_and_grads(0)
    lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 5)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.1, mask=decay_mask))
    ours = fused_adamw(lr, weight_decay=0.1, mask=decay_mask, clip_grad_norm=1.0)

    def run(tx, **extra):
        p, s = params, tx.init(params)
        for g in grads:
            u, s = tx.update(g, s, p, **extra)
            p = optax.apply_updates(p, u)
        return p

    expected = run(ref)
    for got in (run(ours), run(ours, apply=jnp.asarray(True))):
        for k in params:  # fp32 rounding only: same formulas, different op order
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "sgd"])
def test_skipped_step_leaves_params_and_state_bitwise_unchanged(name):
    params, _ = _regression_params_and_grads(1)
    params = {"w": jnp.tile(params["w"], (1, 100)), "b": params["b"]}  # w large enough for 8-bit moments
    tx, _ = make_optimizer(OptimizerConfig(name=name, learning_rate=1e-2, weight_decay=0.1, block_size=256), 10)
    state = tx.init(params)
    g = jax.tree.map(lambda p: jnp.ones_like(p), params)
    update = jax.jit(lambda g, s, p, ok: tx.update(g, s, p, grad_norm=optax.tree.norm(g), apply=ok))
    _, state = update(g, state, params, jnp.asarray(True))  # non-trivial moments first
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g)
    updates, new_state = update(bad, state, params, jnp.asarray(False))
    new_params = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved, _ = update(g, state, params, jnp.asarray(True))
    assert float(jnp.abs(moved["w"]).max()) > 0  # and an applied step does move


def test_split_merge_and_frozen_params_get_no_state(model):
    _, params, _, _ = model
    train, frozen = split_params(params, [r"to_[qkv]/"], [r"to_v"])
    assert sorted(flatten(train)) == ["to_k/kernel", "to_q/kernel"]
    assert "conv_in/kernel" in flatten(frozen) and "to_v/kernel" in flatten(frozen)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, merge_params(train, frozen), params))
    tx, _ = make_optimizer(OptimizerConfig(), 10)
    assert state_bytes(tx.init(train)) < 3 * 4 * sum(x.size for x in jax.tree.leaves(train)) + 64
    with pytest.raises(ValueError, match="no parameter is trainable"):
        split_params(params, ["nothing_matches"])


MIN_SNR = LossConfig(min_snr_gamma=5.0)


def _step(apply_fn, k, tx=None, lr=None, ema=None, loss_cfg=MIN_SNR):
    if tx is None:
        tx, lr = make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.0), 10)
    return jax.jit(make_train_step(apply_fn, SCHED, loss_cfg, tx, lr, ema_cfg=ema, grad_accum_steps=k)), tx


def test_accumulation_equals_one_big_batch_and_frozen_stay_put(model):
    _, params, apply_fn, _ = model
    train, frozen = split_params(params, [".*"], ["conv_in"])
    b = batch(8)
    outs = []
    # SGD-momentum: the update is linear in the gradient, so equal params mean equal accumulated
    # gradients (Adam's m/√v would amplify last-bit differences of near-zero gradient entries)
    sgd, lr = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1e-1, weight_decay=0.0), 10)
    for k in (1, 4):
        step, tx = _step(apply_fn, k, sgd, lr)
        state = init_state(train, frozen, tx, seed=0, ema=False)
        for _ in range(2):
            state, m = step(state, b)
        outs.append((state, m))
    (s1, m1), (s4, m4) = outs
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["loss_raw"], m1["loss_raw"], rtol=1e-5)
    for a, c in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        assert rel_err(a, c) <= 1e-5
    assert float(m1["qk_grads_av"]) > 0
    assert all(jnp.array_equal(a, c) for a, c in zip(jax.tree.leaves(s1.frozen), jax.tree.leaves(frozen)))


def test_ema_update_rule():
    ema, p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    cfg = EMAConfig(enabled=True, decay=0.9, warmup=False, every=2)
    assert float(update_ema(ema, p, jnp.int32(1), cfg)["w"][0]) == 0.0  # not an EMA step
    np.testing.assert_allclose(update_ema(ema, p, jnp.int32(2), cfg)["w"], 0.1, rtol=1e-6)
    warm = update_ema(ema, p, jnp.int32(1), EMAConfig(decay=0.9999, warmup=True))
    np.testing.assert_allclose(warm["w"], 1 - 2 / 11, rtol=1e-6)  # decay (1+1)/(10+1)


def test_nonfinite_loss_skips_the_update(model):
    _, params, apply_fn, _ = model
    nan_model = lambda p, noisy, t, ehs, added: apply_fn(p, noisy, t, ehs, added) * jnp.nan
    step, tx = _step(nan_model, 1, ema=EMAConfig(enabled=True))
    state = init_state(params, {}, tx, seed=0, ema=True)
    before = jax.tree.map(np.asarray, (state.params, state.ema))
    for i in range(2):
        state, m = step(state, batch(8))
        assert int(m["skipped"]) == 1 and int(state.nonfinite) == i + 1
    after = jax.tree.map(np.asarray, (state.params, state.ema))
    assert all(np.array_equal(a, c) for a, c in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_adamw8bit_initial_state_is_quantised_zeros():
    # init writes the zero codes directly (no encoder in the init program); they must decode to 0
    from jaxsd.train.adamw8bit import quantize as q

    p = {"w": jnp.ones((300, 50)), "b": jnp.ones((50,))}
    state = adamw_8bit(1e-3, block_size=256).init(p)
    assert state.mu["w"] is None and state.mu["b"].shape == (50,)  # w: 8-bit, in the group buffers
    for (moment,), signed in ((state.mu_blocks, True), (state.nu_blocks, False)):
        expected = q(jnp.zeros((300, 50)), 256, signed)  # 15000 values: 59 blocks of 256
        np.testing.assert_array_equal(moment.codes, expected.codes)
        np.testing.assert_array_equal(moment.absmax, expected.absmax)
    for tree in moments(state, p, block_size=256):
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(tree))


def _reference_adamw_step(p, m, v, g, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """One AdamW step of one param written plainly: (new param, new m, new v), all fp32."""
    m = (1 - b1) * g + b1 * m
    v = (1 - b2) * g * g + b2 * v
    u = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
    return p + (-lr) * (u + wd * p if wd else u), m, v


@pytest.mark.parametrize("group_values", [None, 20_000])  # one group; three ([a], [b], [d, e])
def test_adamw8bit_grouped_update_equals_a_per_param_reference(group_values):
    # the moments of all large params live in a few flat buffers updated by one chunk loop each
    # (jaxsd/train/block_groups.py); every step must be plain per-param AdamW from the stored
    # (dequantised) moments, its new moments stored 8-bit; and a skipped step a bitwise no-op
    from jaxsd.train.optimizers import decay_mask

    rng = np.random.default_rng(0)
    shapes = {"a": (256, 170), "b": (3, 3, 40, 50), "c": (64,), "d": (100, 41), "e": (4096,)}  # partial blocks, small c
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1), jnp.float32)
              for k, s in shapes.items()} for _ in range(3)]
    decay = decay_mask(params)
    tx = adamw_8bit(1e-2, weight_decay=0.1, mask=decay_mask, block_size=256, group_values=group_values)
    update = jax.jit(lambda g, s, p, ok: tx.update(g, s, p, apply=ok))
    p, s = params, tx.init(params)
    assert len(s.mu_blocks) == (1 if group_values is None else 3)
    for t, g in enumerate(grads, 1):
        m, v = moments(s, p, block_size=256, group_values=group_values)
        u, s = update(g, s, p, jnp.asarray(True))
        new_p = optax.apply_updates(p, u)
        new_m, new_v = moments(s, p, block_size=256, group_values=group_values)
        for k in shapes:
            ref_p, ref_m, ref_v = _reference_adamw_step(p[k], m[k], v[k], g[k], t, 1e-2, 0.1 if decay[k] else 0.0)
            assert rel_err(new_p[k], ref_p) <= 1e-6, (t, k)
            if params[k].size < 4096:  # fp32 moments
                assert rel_err(new_m[k], ref_m) <= 1e-6 and rel_err(new_v[k], ref_v) <= 1e-6, (t, k)
                continue
            for got, want, signed in ((new_m[k], ref_m, True), (new_v[k], ref_v, False)):
                stored = dequantize(quantize(want, 256, signed), want.shape, signed)
                # equal to fp32 rounding, except that a value on a quantisation bin edge may round either
                # way: one bin (< 1.5 % of the absmax), rarely
                diff, scale = np.abs(np.asarray(got) - np.asarray(stored)), float(jnp.abs(want).max())
                assert diff.max() <= 0.015 * scale and (diff > 1e-5 * scale).mean() < 0.01, (t, k)
        p = new_p
    u, skipped = update(grads[0], s, p, jnp.asarray(False))
    for a, b in zip(jax.tree.leaves((optax.apply_updates(p, u), skipped)), jax.tree.leaves((p, s)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["adamw", "sgd"])  # the fused and the guarded update paths
def test_logged_lr_is_the_one_applied_after_skips(model, name):
    # warmup: the schedule moves every applied update; a skipped step must not move it
    _, params, apply_fn, _ = model
    tx, lr = make_optimizer(OptimizerConfig(name=name, learning_rate=1.0, warmup_steps=10, weight_decay=0.0), 20)
    step = jax.jit(make_train_step(apply_fn, SCHED, MIN_SNR, tx, lr))
    nan_step = jax.jit(make_train_step(lambda *a: apply_fn(*a) * jnp.nan, SCHED, MIN_SNR, tx, lr))
    state = init_state(params, {}, tx, seed=0, ema=False)
    logged = []
    for fn in (step, nan_step, nan_step, step, step):
        state, m = fn(state, batch(8))
        logged.append(float(m["lr"]))
    # applied updates before each step: 0, 1, 1 (skipped), 1 (skipped), 2 — not state.step's 0..4
    assert logged == pytest.approx([float(lr(n)) for n in (0, 1, 1, 1, 2)], rel=1e-6)
    assert int(state.step) == 5
