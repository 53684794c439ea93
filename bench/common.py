"""Shared benchmark helpers: timing, RSS, and one row format."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Row:
    what: str
    ours: float
    reference: float | None = None
    reference_name: str = ""
    unit: str = "s"
    limit: float | None = None  # the largest ratio the issue allows, when it sets one
    ceiling: float | None = None  # the largest figure (in ``unit``) the issue allows, when it sets one

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        return self.ours / self.reference

    def __str__(self) -> str:
        text = f"{self.what:<58} ours {self.ours:10.4f} {self.unit}"
        if self.reference is not None:
            text += f"   {self.reference_name} {self.reference:10.4f} {self.unit}"
            text += f"   ratio {self.ratio:6.2f}x"
            if self.limit is not None:
                text += "  OK" if self.ratio <= self.limit else f"  OVER the {self.limit}x limit"
        if self.ceiling is not None:
            text += (f"   limit {self.ceiling:g} {self.unit}  OK" if self.ours <= self.ceiling
                     else f"   OVER the {self.ceiling:g} {self.unit} limit")
        return text


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median wall time of ``repeat`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(run: Callable[[Any], list[Row]], children: dict[str, Callable[..., object]] | None = None) -> None:
    """A bench module run on its own: its rows printed (``--quick`` for smaller tables).
    ``FLAG ARG...`` naming one of ``children`` runs that part instead: the part a module
    measures in a fresh process of its own, started by its ``run``."""
    argv = sys.argv[1:]
    if argv and children and argv[0] in children:
        children[argv[0]](*argv[1:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args(argv)):
        print(row)
