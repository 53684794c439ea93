"""Render the bundle: ``python -m tools.bundle`` writes, ``--check`` only compares.

Outputs (all generated, all committed):
- alerts/kubenode-exporter.rules.yaml      plain Prometheus rule file
- alerts/operator/prometheusrule.yaml      the same groups as a prometheus-operator PrometheusRule
- grafana/dashboards/<name>.json           dashboards to import or provision
- grafana/configmaps/<name>.yaml           the same dashboards for Grafana's dashboard sidecar
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.bundle.render import render

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bundle", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed file differs from a fresh render")
    ap.add_argument("--root", type=Path, default=ROOT, help="where to write (default: this repository)")
    args = ap.parse_args(argv)
    stale = []
    for rel, text in render().items():
        path = args.root / rel
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print("stale generated files (run `make bundle`): " + ", ".join(stale), file=sys.stderr)
        return 1
    for rel in stale:
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
