"""Roots for every kernel file the exporter reads (node_exporter's --path.*).

All reads of /proc and /sys go through ``Paths`` so tests point collectors at
fixture trees, and a DaemonSet at the host's /proc mounted elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Paths:
    procfs: str = "/proc"
    sysfs: str = "/sys"

    def proc(self, *parts: str) -> str:
        return os.path.join(self.procfs, *parts)

    def sys(self, *parts: str) -> str:
        return os.path.join(self.sysfs, *parts)
