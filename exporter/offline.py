"""Offline tools: ``desired`` and ``diff`` (built in the drift work, issue 4)."""

from __future__ import annotations

import sys


def main(command: str, argv: list[str]) -> int:
    print(f"kubenode-exporter {command}: not available in this build yet", file=sys.stderr)
    return 2
