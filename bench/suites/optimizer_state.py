"""optimizer-state: bytes of optimizer state for AdamW, 8-bit AdamW and Adafactor on a UNet.

Computed from shapes only: `jax.eval_shape` of the optimizer's `init` over the
UNet's abstract params — nothing is allocated, so the sd15 (and sdxl) UNet is fine
on any machine. Runs in one child (the parent never imports jax).
"""

from __future__ import annotations

import argparse

from bench.harness import make_record, run_child, table
from bench.presets import UNET_PRESETS
from jaxsd.errors import InputError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="sd15", choices=sorted(UNET_PRESETS), help="UNet architecture (default sd15)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated subset of {','.join(OPTIMIZERS)}")


def run(args: argparse.Namespace) -> list[dict]:
    from bench.presets import unet_preset

    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in names if o not in OPTIMIZERS]
    if bad or not names:
        raise InputError(f"--optimizers {args.optimizers!r}: choose from {','.join(OPTIMIZERS)}")
    out = run_child("optimizer_state", "jaxsd", {"unet": unet_preset(args.preset), "optimizers": names},
                    timeout=args.timeout)
    adamw = out["state_bytes"].get("adamw")
    records = []
    for name in names:
        state = out["state_bytes"][name]
        figures = {"state_bytes": state, "state_gb": state / 1e9, "bytes_per_param": state / out["num_params"],
                   "param_bytes": out["param_bytes"]}
        results = {"jaxsd": figures, "ratio": {"state_vs_adamw": state / adamw if adamw else None,
                                                "state_vs_params": state / out["param_bytes"]}}
        records.append(make_record("optimizer-state", {"preset": args.preset, "optimizer": name,
                                                       "num_params": out["num_params"]}, results, note=args.note))
    return records


def format_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        j, q = r["jaxsd"], r["ratio"]
        vs = "—" if q["state_vs_adamw"] is None else f"{q['state_vs_adamw']:.3g}×"
        rows.append([r["config"]["preset"], r["config"]["optimizer"], f"{r['config']['num_params'] / 1e6:.0f} M",
                     f"{j['state_gb']:.3g}", f"{j['bytes_per_param']:.3g}", vs, f"{q['state_vs_params']:.3g}×"])
    return table(["preset", "optimizer", "params", "state GB", "bytes/param", "vs AdamW", "vs fp32 params"], rows)


def child_jaxsd(config: dict) -> dict:
    import jax

    from bench import jaxsd_unet as J

    model = J.build_model(config["unet"])
    params = J.abstract_params(model)
    state = {name: J.tree_bytes(jax.eval_shape(J.make_optimizer(name).init, params))
             for name in config["optimizers"]}
    return {"state_bytes": state, "param_bytes": J.tree_bytes(params),
            "num_params": sum(int(x.size) for x in jax.tree.leaves(params))}
