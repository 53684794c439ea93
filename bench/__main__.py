"""`make bench`: run every bench/bench_*.py and print its ratios.

Each module has ``run(args) -> list[Row]``; a Row names what was measured, our
figure, the reference tool's figure on the same data, and the ratio. A module
may need root, a network namespace or the VM; it says so in its rows or raises
``SystemExit`` with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time

import bench


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("only", nargs="*", help="bench module names (default: all), e.g. ipset")
    parser.add_argument("--quick", action="store_true", help="smaller tables, for a smoke run")
    args = parser.parse_args()
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench.__path__)
                   if m.name.startswith("bench_"))
    failed = 0
    for name in names:
        if args.only and name not in args.only:
            continue
        module = importlib.import_module(f"bench.bench_{name}")
        print(f"== {name}", flush=True)
        start = time.monotonic()
        try:
            rows = module.run(args)
        except SystemExit as err:
            print(f"   not run: {err}")
            failed += 1
            continue
        for row in rows:
            print("   " + str(row), flush=True)
        print(f"   ({time.monotonic() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
