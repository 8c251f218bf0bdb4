"""Sharding: the same 3 steps on 1 device and on 8 fake devices in three mesh shapes; FSDP layout and memory."""

import json

import numpy as np
import pytest

from jaxsd.config import ShardingConfig
from jaxsd.train.sharding import mesh_shape
from tests.helpers import run_python

MESHES_CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jaxsd.config import DiffusionConfig, LossConfig, OptimizerConfig, ShardingConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train.optimizers import make_optimizer
from jaxsd.train.sharding import global_batch, make_mesh, micro_batch_sharding, param_shardings, train_state_shardings
from jaxsd.train.step import init_state, make_train_step
from tests.train.toy import batch, toy

toy_module, params, apply_fn, specs = toy(width=128)
rules = ShardingConfig().rules
# SGD-momentum: params are then linear in the gradients, so the comparison measures the sharded
# reductions, not Adam's m/√v amplifying last-bit differences of near-zero gradient entries.
tx, lr = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1e-2, weight_decay=1e-2), 10)
sched = NoiseSchedule.from_config(DiffusionConfig().to_scheduler_config())
host_batch = jax.tree.map(np.asarray, batch(16))

def run(shape, devices, k=1):
    mesh = make_mesh(ShardingConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), devices)
    p_sh = param_shardings(params, specs, mesh, rules)
    abstract = jax.eval_shape(lambda p: init_state(p, {}, tx, 0, True), params)
    st_sh = train_state_shardings(abstract, p_sh, {}, mesh)
    state = jax.jit(lambda p: init_state(p, {}, tx, 0, True), out_shardings=st_sh)(jax.device_put(params, p_sh))
    b = global_batch(host_batch, mesh)
    step = make_train_step(apply_fn, sched, LossConfig(min_snr_gamma=5.0), tx, lr, grad_accum_steps=k,
                           micro_batch_sharding=micro_batch_sharding(mesh))
    jitted = jax.jit(step, in_shardings=(st_sh, jax.tree.map(lambda x: x.sharding, b)),
                     out_shardings=(st_sh, None), donate_argnums=(0,))
    compiled = jitted.lower(state, b).compile()
    losses = []
    for _ in range(3):
        state, m = compiled(state, b)
        losses.append(float(m["loss"]))
    mem = compiled.memory_analysis()
    return state, losses, mem.argument_size_in_bytes, p_sh

ref, ref_losses, _, _ = run((1, 1, 1), jax.devices()[:1])
out = {"ref_losses": ref_losses}
for shape in [(8, 1, 1), (2, 4, 1), (1, 8, 1)]:
    state, losses, arg_bytes, p_sh = run(shape, jax.devices(), k=2 if shape == (2, 4, 1) else 1)
    errs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-30))
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params))]
    q = state.params["to_q"]["kernel"]
    out[str(shape)] = {"losses": losses, "max_param_rel_err": max(errs), "arg_bytes": arg_bytes,
                       "to_q_spec": list(q.sharding.spec), "to_q_shard": list(q.addressable_shards[0].data.shape),
                       "opt_specs": sorted({repr(tuple(x.sharding.spec))
                                            for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
                                            if "to_q" in jax.tree_util.keystr(path)})}

# 8-bit AdamW's chunk loop (params of >= 128 blocks) on an fsdp-sharded param == unsharded
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxsd.train.fused_adamw import adamw_8bit
rng = np.random.default_rng(0)
w8 = {"w": jnp.asarray(rng.standard_normal((512, 640)), jnp.float32)}  # 320 blocks of 1024
g8 = [{"w": jnp.asarray(rng.standard_normal((512, 640)), jnp.float32)} for _ in range(2)]
tx8 = adamw_8bit(1e-2, block_size=1024)
mesh8 = make_mesh(ShardingConfig(data=1, fsdp=8), jax.devices())

def run8(spec):
    sh = NamedSharding(mesh8, spec)
    p8 = jax.device_put(w8, sh)
    s8 = jax.device_put(tx8.init(p8), NamedSharding(mesh8, P()))
    s8 = jax.tree.map(lambda x: jax.device_put(x, sh) if x.ndim == 2 else x, s8)  # codes: rows over fsdp
    upd = jax.jit(lambda g, s, p: tx8.update(g, s, p, apply=jnp.asarray(True)))
    for g in g8:
        u, s8 = upd(jax.device_put(g, sh), s8, p8)
        p8 = optax.apply_updates(p8, u)
    return p8

a8, b8 = run8(P()), run8(P("fsdp", None))
out["adamw8bit_fsdp_err"] = float(np.max(np.abs(np.asarray(a8["w"]) - np.asarray(b8["w"]))))
out["adamw8bit_fsdp_spec"] = list(b8["w"].sharding.spec)
print("RESULT" + json.dumps(out))
"""

# LoRA (jaxsd.train.adapters) on the toy's Dense layers over its frozen base, with dropout on the adapter
# input: 3 steps on 1 device, and on 8 devices with data parallelism + fsdp and 2 accumulation micro-batches
LORA_CODE = r"""
from flax import traverse_util
from jaxsd.models.lora import adapter_logical_axes, init_adapters, plan_adapters
from jaxsd.train.adapters import AdapterPlan

rng = np.random.default_rng(1)
adapters = traverse_util.unflatten_dict({  # up random too, so dropout acts on every gradient from step 1
    p: v if p[-1] == "down" else jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype)
    for p, v in traverse_util.flatten_dict(init_adapters(params, "all_linear", 4, 8, jax.random.key(1))).items()
    if p[-1] != "scale"})

def run_lora(shape, devices, k=1, dropout=0.25, keys=True):
    lora_plan = AdapterPlan(plan_adapters(params, "all_linear", 4, 8), dropout)
    mesh = make_mesh(ShardingConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), devices)
    f_sh = param_shardings(params, specs, mesh, rules)
    t_sh = param_shardings(adapters, adapter_logical_axes(specs, adapters), mesh, rules)
    init = lambda t, f: init_state(t, f, tx, 0, True)
    st_sh = train_state_shardings(jax.eval_shape(init, adapters, params), t_sh, f_sh, mesh)
    state = jax.jit(init, out_shardings=st_sh)(adapters, params)
    b = global_batch(host_batch, mesh)

    def combine(t, f, draws=None):
        variables = {"params": f, "lora": lora_plan.variables(t)}
        return variables if draws is None else {**variables, "lora_dropout": lora_plan.dropout_variables(draws)}

    step = make_train_step(lambda v, *a: toy_module.apply(v, *a), sched, LossConfig(), tx, lr, grad_accum_steps=k,
                           micro_batch_sharding=micro_batch_sharding(mesh), combine=combine,
                           model_draws=lora_plan.draw_dropout if keys else None)
    jitted = jax.jit(step, in_shardings=(st_sh, jax.tree.map(lambda x: x.sharding, b)),
                     out_shardings=(st_sh, None), donate_argnums=(0,))
    losses = []
    for _ in range(3):
        state, m = jitted(state, b)
        losses.append(float(m["loss"]))
    return [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)], losses

one = jax.devices()[:1]
lora = {"ref": run_lora((1, 1, 1), one), "meshed": run_lora((2, 4, 1), jax.devices(), k=2),
        "off": run_lora((1, 1, 1), one, dropout=0, keys=False),  # lora.dropout=0: the step as without dropout
        "rate_0": run_lora((1, 1, 1), one, dropout=0)}  # the dropout keys drawn, at rate 0
print("LORA" + json.dumps(lora))
"""



def test_mesh_shape_fill_and_errors():
    assert mesh_shape(ShardingConfig(data=-1, fsdp=4), 8) == (2, 4, 1)
    assert mesh_shape(ShardingConfig(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_shape(ShardingConfig(data=3, fsdp=2), 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape(ShardingConfig(data=-1, fsdp=-1), 8)


@pytest.fixture(scope="module")
def eight_devices():
    """One 8-device subprocess: the mesh comparisons, then the 1-process reference of the 2-process test."""
    stdout = run_python(MESHES_CODE + LORA_CODE + WORKER_BODY, devices=8)
    return tuple(json.loads(stdout.split(tag, 1)[1].split("\n", 1)[0]) for tag in ("RESULT", "WORKER", "LORA"))


def test_meshes_match_single_device_and_fsdp_shards_state(eight_devices):
    res = eight_devices[0]
    ref = res["ref_losses"]
    for shape in ["(8, 1, 1)", "(2, 4, 1)", "(1, 8, 1)"]:
        r = res[shape]
        assert max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)) <= 1e-5, (shape, r["losses"], ref)
        assert r["max_param_rel_err"] <= 1e-5, (shape, r["max_param_rel_err"])
    # a [128,128] attention kernel: 'embed' → fsdp, so each of 8 devices holds 16 rows; its momentum likewise
    assert res["(1, 8, 1)"]["to_q_spec"] == ["fsdp", None]
    assert res["(1, 8, 1)"]["to_q_shard"] == [16, 128]
    assert res["(1, 8, 1)"]["opt_specs"] == ["('fsdp', None)"]
    assert res["(8, 1, 1)"]["to_q_shard"] == [128, 128]
    # per-device argument bytes (params + opt state + EMA + batch): ≈1/8 with fsdp=8, ≈1/4 with fsdp=4
    full = res["(8, 1, 1)"]["arg_bytes"]
    assert res["(1, 8, 1)"]["arg_bytes"] < 0.16 * full, res
    assert res["(2, 4, 1)"]["arg_bytes"] < 0.3 * full, res
    # 8-bit AdamW's chunk loop over an fsdp-sharded param gives the unsharded numbers
    assert res["adamw8bit_fsdp_spec"] == ["fsdp", None] and res["adamw8bit_fsdp_err"] <= 1e-6, res


def test_lora_with_dropout_on_8_devices_and_accumulation_matches_one_device(eight_devices):
    lora = eight_devices[2]
    (ref_params, ref_losses), (meshed_params, meshed_losses) = lora["ref"], lora["meshed"]
    assert max(abs(a - b) / abs(b) for a, b in zip(meshed_losses, ref_losses)) <= 1e-5, (meshed_losses, ref_losses)
    for a, b in zip(meshed_params, ref_params):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) / np.max(np.abs(b)) <= 1e-5
    assert lora["off"][1][0] != ref_losses[0]  # the dropout masks reach the layers in the step
    # drawing the keys leaves the loss's own draws (noise, timesteps) as they are, and rate 0 is no dropout
    assert lora["rate_0"] == lora["off"]


WORKER_HEADER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from jaxsd.config import ShardingConfig
from jaxsd.train.sharding import maybe_initialize_distributed
port, pid = int(sys.argv[1]), int(sys.argv[2])
assert maybe_initialize_distributed(ShardingConfig(coordinator_address=f"localhost:{port}", num_processes=2,
                                                   process_id=pid))
"""

# fsdp over 2 devices: two processes with one device each, or (as the reference) one process's first two
WORKER_BODY = r"""
import json
import jax
import jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jaxsd.config import DiffusionConfig, LossConfig, OptimizerConfig
from jaxsd.diffusion.schedule import NoiseSchedule
from jaxsd.train.optimizers import make_optimizer
from jaxsd.train.sharding import global_batch, make_mesh, param_shardings, train_state_shardings
from jaxsd.train.step import init_state, make_train_step
from tests.train.toy import batch, toy

_, params, apply_fn, specs = toy(width=32)
tx, lr = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1e-2), 10)
sched = NoiseSchedule.from_config(DiffusionConfig().to_scheduler_config())
mesh = make_mesh(ShardingConfig(data=1, fsdp=-1), jax.devices()[:2])
p_sh = param_shardings(params, specs, mesh, ShardingConfig().rules)
abstract = jax.eval_shape(lambda p: init_state(p, {}, tx, 0, False), params)
st_sh = train_state_shardings(abstract, p_sh, {}, mesh)
state = jax.jit(lambda p: init_state(p, {}, tx, 0, False), out_shardings=st_sh)(params)
full = jax.tree.map(np.asarray, batch(8))
rows = 8 // jax.process_count()
local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in full.items()}
b = global_batch(local, mesh)  # each process feeds only its own rows
step = jax.jit(make_train_step(apply_fn, sched, LossConfig(), tx, lr), out_shardings=(st_sh, None),
               donate_argnums=(0,))
losses = []
for _ in range(3):
    state, m = step(state, b)
    losses.append(float(m["loss"]))
gathered = multihost_utils.process_allgather(state.params, tiled=True)
if jax.process_index() == 0:
    print("WORKER" + json.dumps({"losses": losses, "processes": jax.process_count(),
                                 "params": [np.asarray(x).ravel()[:2000].tolist() for x in jax.tree.leaves(gathered)]}))
"""


def test_two_processes_over_loopback_match_one_process(eight_devices):
    import os
    import socket
    import subprocess
    import sys

    from tests.helpers import REPO, xla_flags
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": xla_flags(1)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER_HEADER + WORKER_BODY, str(port), str(i)],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-5000:]
    two = json.loads(outs[0][0].split("WORKER", 1)[1])
    one = eight_devices[1]
    assert two["processes"] == 2 and one["processes"] == 1
    assert max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"])) <= 1e-5
    for a, b in zip(two["params"], one["params"]):
        scale = max(max(abs(x) for x in b), 1e-30)
        assert max(abs(x - y) for x, y in zip(a, b)) / scale <= 1e-5
