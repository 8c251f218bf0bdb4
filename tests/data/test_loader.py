"""The grain loader: single-bucket batches, determinism, exact resume, and two processes over loopback."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxsd.data.loader import Loader, plan_epoch
from tests.data.fakes import make_cached
from tests.helpers import REPO, xla_flags


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return make_cached(tmp_path_factory.mktemp("loader"))


def test_plan_is_single_bucket_deterministic_and_covers_the_epoch():
    buckets = np.array([0] * 10 + [1] * 7 + [2] * 3)
    plan = plan_epoch(buckets, 3, seed=5, epoch=0).batches
    assert plan.shape == (3 + 2 + 1, 3)
    for batch in plan:
        assert len(set(buckets[batch])) == 1
    assert len(set(plan.ravel())) == plan.size  # no sample twice in an epoch
    np.testing.assert_array_equal(plan, plan_epoch(buckets, 3, seed=5, epoch=0).batches)
    assert not np.array_equal(plan, plan_epoch(buckets, 3, seed=5, epoch=1).batches)
    with pytest.raises(ValueError, match="data.loader.batch_size"):
        plan_epoch(buckets, 11, seed=0, epoch=0)


def test_batches_are_single_bucket_and_carry_everything(cached):
    cfg, vae, te = cached
    loader = Loader(cfg, latents=vae.spec, text=te.spec)
    ids = loader.store.bucket_ids()
    seen = []
    flips = set()
    for _ in range(loader.steps_per_epoch):
        b = next(loader)
        assert len(set(ids[b["index"]])) == 1
        h, w = loader.store.bucket_list[ids[b["index"][0]]]
        assert b["latent_mean"].shape == (4, h // 8, w // 8, 4) == b["latent_logvar"].shape
        assert b["encoder_hidden_states"].shape == (4, 8, 16) and b["pooled"].shape == (4, 16)
        assert b["time_ids"].shape == (4, 6) and np.all(b["time_ids"][:, 4:] == [h, w])
        flips |= {int(t) for t in b["time_ids"][:, 3]}  # crop-left differs between flipped/unflipped
        seen += list(b["index"])
    assert sorted(seen) == list(range(24))  # 8 per bucket, batch 4: nothing dropped
    assert len(flips) > 1
    empty = loader.empty_prompt()  # what conditioning dropout swaps in
    assert empty["encoder_hidden_states"].shape == (8, 16) and empty["pooled"].shape == (16,)
    assert Loader(cfg, batch_size=8).steps_per_epoch == 3  # the trainer's batch size wins


def test_restore_yields_exactly_the_next_batches(cached, tmp_path):
    cfg, vae, te = cached
    loader = Loader(cfg, latents=vae.spec, text=te.spec)
    for _ in range(4):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))  # JSON-able
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader.iterator)))
    mngr.wait_until_finished()
    expected = [next(loader) for _ in range(5)]  # crosses into epoch 2 (6 steps per epoch)
    for restore in ("state", "orbax"):
        fresh = Loader(cfg, latents=vae.spec, text=te.spec)
        if restore == "state":
            fresh.set_state(state)
        else:
            mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh.iterator)))
        for want in expected:
            got = next(fresh)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
    other = Loader(cfg.__class__(**{**cfg.__dict__, "loader": cfg.loader.__class__(batch_size=2)}),
                   latents=vae.spec, text=te.spec)
    with pytest.raises(ValueError, match="batch_size saved 4 now 2"):
        other.set_state(state)


WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={pid})
import jax.numpy as jnp
from jaxsd.data.cache import build_cache
from jaxsd.data.loader import GlobalBatches, Loader
from tests.data.fakes import fake_text, fake_vae, small_config
cfg = small_config(*{roots})
vae, te = fake_vae("{base}/vae", cfg), fake_text("{base}/te", cfg)
cached = build_cache(cfg, vae=vae, text=te, progress=False, log=lambda s: None)  # each encodes its share
mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
loader = Loader(cfg, mesh=mesh, latents=vae.spec, text=te.spec)
batches = GlobalBatches(loader)
total = jax.jit(lambda x: jnp.sum(x))
steps = []
for _ in range(loader.steps_per_epoch):
    b = next(batches)
    local = sorted({{int(v) for s in b["index"].addressable_shards for v in s.data}})
    steps.append({{"local": local, "sum": int(total(b["index"])),
                  "shapes": {{k: list(v.shape) for k, v in b.items()}}}})
print("RESULT" + json.dumps({{"rows": loader.rows.tolist(), "steps": steps, "encoded": cached.encoded,
                             "kept": cached.report.counts["kept"]}}))
"""


def test_two_processes_cache_and_read_disjoint_shards_of_the_same_batches(tmp_path):
    """Two roots, two processes (2 CPU devices each, gloo): each caches its share of the files, then
    reads only its rows of every global batch; the rows are disjoint and their union is the epoch."""
    from tests.data.fakes import make_images, save_fake_text, save_fake_vae, small_config

    roots = [str(make_images(tmp_path / "a", 12)), str(make_images(tmp_path / "b", 12))]
    save_fake_vae(tmp_path / "vae", 0)
    save_fake_text(tmp_path / "te", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2),
           "PYTHONPATH": str(REPO)}
    code = [textwrap.dedent(WORKER.format(port=port, pid=i, roots=roots, base=tmp_path)) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=REPO) for c in code]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-4000:]
        outs.append(json.loads(out.split("RESULT", 1)[1]))
    # caching: each process encoded its own half; the merged report and manifests hold everything
    assert [o["encoded"]["latents"] for o in outs] == [12, 12]
    assert [o["encoded"]["text"] for o in outs] == [12 + 2, 12]  # process 0 also encodes "" once per root
    assert outs[0]["kept"] == 24
    assert outs[0]["rows"] == [0, 1] and outs[1]["rows"] == [2, 3]
    single = Loader(small_config(*roots))  # the same epoch seen from one process
    union = []
    for step, (a, b) in enumerate(zip(outs[0]["steps"], outs[1]["steps"])):
        assert not set(a["local"]) & set(b["local"])
        want = sorted(int(i) for i in single.source.indices(step))
        assert sorted(a["local"] + b["local"]) == want
        assert a["sum"] == b["sum"] == sum(want)  # the global array really holds both processes' rows
        assert a["shapes"] == b["shapes"] and a["shapes"]["latent_mean"][0] == 4
        union += a["local"] + b["local"]
    assert sorted(union) == list(range(24))
