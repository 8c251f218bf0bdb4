"""scaling: how a UNet train step's cost grows — with batch size, latent size and devices.

  --sweep batch    step time (jaxsd and torch) for batch 1, 2, 4, 8 at the preset's latent size
  --sweep latent   step time for latents 16, 32, 64 at batch 1
  --sweep devices  per-device memory of the FSDP-sharded step for 1, 2, 4, 8 fake CPU devices,
                   from the compiled step's memory analysis (compile only; nothing runs)

Each point is measured like `train-step` (own process per framework, same weights).
The device sweep shards params, gradients and optimizer state over an `fsdp` mesh
axis — with `--step train` exactly as `jaxsd train` does (jaxsd.train.sharding's
logical-axis rules), with `--step simple` each array along its largest divisible
dimension — and the batch over the same axis; the child sets XLA_FLAGS=--xla_force_host_platform_device_count=N, so on a
CPU-only machine it shows how memory per device falls, not how time does.
"""

from __future__ import annotations

import argparse

from bench.harness import comparison_table, compiled_memory_figures, make_record, run_child, table
from bench.presets import DEFAULT_LATENT, unet_preset
from bench.suites import train_step
from jaxsd.errors import InputError

SWEEPS = ("batch", "latent", "devices")


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_step.add_unet_arguments(p, preset="small")
    p.add_argument("--sweep", default="batch,latent,devices",
                   help="comma-separated subset of batch,latent,devices (default all three)")
    p.add_argument("--batches", type=_ints, default=[1, 2, 4, 8], help="batch sizes (default 1,2,4,8)")
    p.add_argument("--latents", type=_ints, default=[16, 32, 64], help="latent sizes (default 16,32,64)")
    p.add_argument("--devices", type=_ints, default=[1, 2, 4, 8], help="fake device counts (default 1,2,4,8)")
    p.add_argument("--per-device-batch", type=int, default=1,
                   help="device sweep: batch per device (global batch = devices × this)")
    p.add_argument("--latent", type=int, default=None, help="device/batch sweeps: latent size (default per preset)")


def run(args: argparse.Namespace) -> list[dict]:
    sweeps = [s.strip() for s in args.sweep.split(",") if s.strip()]
    bad = [s for s in sweeps if s not in SWEEPS]
    if bad or not sweeps:
        raise InputError(f"--sweep {args.sweep!r}: choose from {','.join(SWEEPS)}")
    frameworks = tuple(args.frameworks)
    latent = args.latent or DEFAULT_LATENT[args.preset]
    points = [("batch", {"latent": latent, "batch": b}) for b in args.batches if "batch" in sweeps]
    points += [("latent", {"latent": s, "batch": 1}) for s in args.latents if "latent" in sweeps]
    records = []
    if points:
        with train_step.shared_weights(args, frameworks) as folder:
            for sweep, point in points:
                config = {**train_step.base_config(args), "sweep": sweep, **point}
                results = train_step.measure(args, config, folder, frameworks)
                records.append(make_record("scaling", config, results, note=args.note))
    if "devices" in sweeps:
        records += [device_point(args, n, latent) for n in args.devices]
    return records


def device_point(args: argparse.Namespace, devices: int, latent: int) -> dict:
    config = {"preset": args.preset, "step": args.step, "sweep": "devices", "devices": devices, "latent": latent,
              "batch": devices * args.per_device_batch, "dtype": args.dtype, "optimizer": args.optimizer,
              "remat": args.remat,
              "sharding": "jaxsd.train.sharding (fsdp)" if args.step == "train" else "largest dim over fsdp"}
    out = run_child("scaling", "fsdp", {**config, "unet": unet_preset(args.preset)}, timeout=args.timeout,
                    env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"})
    figures = {**compiled_memory_figures(out), "info": out["info"]}
    return make_record("scaling", config, {"jaxsd": figures}, note=args.note)


def format_table(records: list[dict]) -> str:
    parts = []
    steps = [r for r in records if r["config"]["sweep"] != "devices"]
    if steps:
        parts.append(comparison_table(steps, ("sweep", "preset", "latent", "batch", "dtype")))
    devs = [r for r in records if r["config"]["sweep"] == "devices"]
    if devs:
        rows = [[r["config"]["devices"], r["config"]["batch"], *train_step.memory_cells(r["jaxsd"])] for r in devs]
        parts.append(table(["devices", "global batch", *(f"{h}/dev" if "GB" in h else h
                                                          for h in train_step.MEMORY_HEADERS)], rows))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- child

def _fsdp_sharding(mesh, n: int):
    """Shard an array along its largest dimension divisible by n (replicate small/indivisible ones)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def for_shape(x):
        shape = getattr(x, "shape", ())
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if shape[d] % n == 0 and shape[d] >= n:
                spec = [None] * len(shape)
                spec[d] = "fsdp"
                return NamedSharding(mesh, PartitionSpec(*spec))
        return NamedSharding(mesh, PartitionSpec())

    return lambda tree: jax.tree.map(for_shape, tree)


def child_fsdp(config: dict) -> dict:
    import time

    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from bench import jaxsd_unet as J
    from bench.jaxsd_steps import make_kit

    n = config["devices"]
    if jax.device_count() != n:
        raise RuntimeError(f"expected {n} devices, JAX sees {jax.device_count()} (XLA_FLAGS not applied?)")
    model = J.build_model(config["unet"], config["dtype"], remat_policy=config.get("remat"))
    train = config["step"] == "train"
    kit = make_kit(config["step"], model, config["optimizer"], fsdp=n if train else 1)
    state = kit.abstract_state()
    batch = kit.to_batch(J.abstract_batch(config["unet"], config["batch"], config["latent"]))
    if train:  # the trainer's own shardings: logical-axis rules, mesh (data=1, fsdp=n, tensor=1)
        from jaxsd.train.sharding import batch_sharding

        mesh, state_sh = kit.mesh, kit.state_shardings
        batch_sh = jax.tree.map(lambda x: batch_sharding(mesh, x.ndim), batch)
    else:
        mesh = Mesh(jax.devices(), ("fsdp",))
        state_sh = _fsdp_sharding(mesh, n)(state)
        batch_sh = jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec("fsdp", *([None] * (x.ndim - 1)))),
                                batch)
    replicated = NamedSharding(mesh, PartitionSpec())
    t0 = time.perf_counter()
    # a state-updating step returns (*state, aux); "grad" returns (loss, grads like the params)
    out_sh = (*state_sh, replicated) if kit.updates_state else (replicated, state_sh[0])
    # with the XLA options the step runs with (the trainer's for --step train: on CPU its memory-optimized
    # scheduler: the SDXL 8-bit step holds 25.9 GB of temporaries with them, 63.2 GB without)
    compiled = jax.jit(kit.step, in_shardings=(*state_sh, batch_sh), out_shardings=out_sh,
                       donate_argnums=kit.donate).lower(*state, batch).compile(compiler_options=kit.compiler_options)
    compile_s = time.perf_counter() - t0
    num_params, num_trainable = kit.param_counts(state)
    return {**J.memory_figures(compiled), "compile_s": compile_s,
            "info": {"num_params": num_params, "num_trainable": num_trainable}}
