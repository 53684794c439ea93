"""Copy the bundle's operator resources into the prometheus-operator overlay.

kustomize reads no file outside a kustomization's own tree, so the overlay keeps
copies of alerts/operator/*.yaml (the PrometheusRule) and grafana/configmaps/*.yaml
(the dashboards for Grafana's sidecar), which `make bundle` generates. Run this
after `make bundle`; tests/test_deploy.py fails while the copies differ.

    python deploy/sync_bundle.py [--from REPO_ROOT] [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGET = HERE / "overlays" / "prometheus-operator" / "bundle"
SOURCES = ("alerts/operator", "grafana/configmaps")
HEADER = ("# Written by deploy/sync_bundle.py: the bundle's PrometheusRule and dashboard\n"
          "# ConfigMaps, copied from alerts/operator/ and grafana/configmaps/.\n")


def bundle_files(root: Path) -> dict[str, bytes]:
    """{file name: content} of the bundle's operator resources under ``root``."""
    files: dict[str, bytes] = {}
    for folder in SOURCES:
        for path in sorted((root / folder).glob("*.yaml")):
            if path.name in files:
                raise SystemExit(f"sync_bundle: two bundle files named {path.name}")
            files[path.name] = path.read_bytes()
    return files


def kustomization(names: list[str]) -> bytes:
    lines = [HEADER, "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:"]
    lines += [f"  - {name}" for name in names] or ["  []"]
    return ("\n".join(lines) + "\n").encode()


def expected(root: Path) -> dict[str, bytes]:
    files = bundle_files(root)
    files["kustomization.yaml"] = kustomization(sorted(files))
    return files


def differences(root: Path) -> list[str]:
    want = expected(root)
    have = {p.name: p.read_bytes() for p in TARGET.glob("*.yaml")}
    return sorted(name for name in set(want) | set(have) if want.get(name) != have.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="root", type=Path, default=REPO,
                        help="repository root holding alerts/ and grafana/ (default: this one)")
    parser.add_argument("--check", action="store_true", help="only report differences (exit 1)")
    args = parser.parse_args(argv)
    if not any((args.root / folder).is_dir() for folder in SOURCES):
        print(f"sync_bundle: no {' or '.join(SOURCES)} under {args.root}; run `make bundle` first",
              file=sys.stderr)
        return 2
    diff = differences(args.root)
    if args.check:
        for name in diff:
            print(f"sync_bundle: {name} differs from the bundle")
        return 1 if diff else 0
    TARGET.mkdir(parents=True, exist_ok=True)
    want = expected(args.root)
    for stale in set(p.name for p in TARGET.glob("*.yaml")) - set(want):
        (TARGET / stale).unlink()
    for name, content in want.items():
        (TARGET / name).write_bytes(content)
    print(f"sync_bundle: {len(want) - 1} bundle files in {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
