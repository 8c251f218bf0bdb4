"""Entry point of one measuring child process.

    python -m bench.child SUITE_MODULE ROLE CONFIG_JSON RESULT_JSON

calls `bench.suites.<SUITE_MODULE>.child_<ROLE>(config) -> dict` and writes the
dict as JSON. ROLE is a framework ("jaxsd", "torch") or a helper step
("prepare", "fsdp"). Each child is a fresh interpreter so its peak RSS is its own;
the parent (`bench.harness.run_child`) reads it from the kernel on exit.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    suite, role, config_path, result_path = argv
    module = importlib.import_module(f"bench.suites.{suite}")
    fn = getattr(module, f"child_{role}", None)
    if fn is None:
        print(f"bench.suites.{suite} has no child_{role}()", file=sys.stderr)
        return 2
    with open(config_path) as fh:
        config = json.load(fh)
    result = fn(config)
    with open(result_path, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
