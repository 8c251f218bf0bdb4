"""Side-by-side benchmarks of jaxsd against diffusers PyTorch (`jaxsd bench SUITE`).

Layout:
  harness.py        child processes (one per framework, so peak RSS never mixes),
                    min/median/max statistics, machine/version info, JSONL records, tables
  child.py          the entry point of a measuring child: `python -m bench.child`
  presets.py        UNet configs (tiny, small, sd15, sdxl) as diffusers config dicts
  suites/           one file per suite: train_step, scaling, sample, cache,
                    optimizer_state, flops, host_overhead

torch is imported only inside torch-side children (and the weight-preparing child),
never by the parent process nor by the jaxsd package.
"""
