"""iptables (legacy backend): the exporter's full check against `iptables-legacy-save` on the same rules.

kube-proxy's newest iptables layout (tests/ipt_rulesets.py) at 1,000 and 10,000
Services x 5 endpoints is loaded with `iptables-legacy-restore --noflush` into a
network namespace of its own (removed afterwards). The reference is one
`iptables-legacy-save` there (every table), as an operator would run it; the
issue's limit: a full check at most 1.5x of it.

Rows: a full check of a fresh ``IptablesDataplane`` on the legacy backend (the table
info getsockopt, the `-t nat` / `-t filter` children, t-iptcore's parse and resolve);
nothing changed (the getsockopt alone: what a scrape costs between changes, 5 ms
budget); peak RSS a first check adds to a fresh process (VmHWM), and the children's
own peak (RLIMIT_AS bounds it), against iptables-legacy-save's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from bench.common import Row
from tests.ipt_rulesets import IptNS, bench_services, ruleset

ENDPOINTS = 5


def _legacy_save(ns: IptNS) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one `iptables-legacy-save` in the namespace."""
    start = time.perf_counter()
    child = subprocess.Popen(["nsenter", f"--net={ns.path}", "iptables-legacy-save"], stdout=subprocess.PIPE)
    for _ in iter(lambda: child.stdout.read(1 << 20), b""):
        pass
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"iptables-legacy-save failed with status {os.waitstatus_to_exitcode(status)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


# A fresh process: peak RSS (VmHWM) after the imports, then after one full check; and
# the largest child's peak.
_GROWTH = """
import resource
from exporter.readers.dataplanes import IptablesDataplane
from exporter.readers.iptables_legacy import IptablesLegacySource
import exporter.readers.iptables, exporter.readers.iptables_save
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
before = hwm()
live = IptablesDataplane(legacy=IptablesLegacySource(timeout=120, keep=False), nft=None).read_rules(0)
assert live.backend == "legacy" and live.read.table and not live.read.unread, live.read.unread[:3]
print(hwm() - before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _size(ns: IptNS, count: int, rows: list[Row]) -> None:
    from exporter.paths import Paths
    from exporter.readers.dataplanes import IptablesDataplane
    from exporter.readers.iptables_legacy import IptablesLegacySource

    start = time.perf_counter()
    ns.restore(ruleset(bench_services(count, ENDPOINTS), 4), 4, "legacy")
    load = time.perf_counter() - start
    label = f"{count:,} services x {ENDPOINTS} (legacy)"
    limit = (lambda ratio: ratio if count >= 10000 else None)  # the limits are at 10,000 x 5

    saves, checks = [], []
    dataplane = None
    for _ in range(2 if count >= 10000 else 3):
        saves.append(_legacy_save(ns))
        dataplane = None  # one alive at a time, as in the exporter
        dataplane = ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths(), timeout=120, keep=False),
                                                     nft=None))
        live = ns.run(lambda: dataplane.read_rules(0))
        assert live.reread and live.backend == "legacy" and not live.read.unread
        checks.append(live.read_seconds)
    reference = min(t for t, _ in saves)
    rows.append(Row(f"{label}: full check ({len(live.read.table):,} frontends)", min(checks), reference,
                    "iptables-legacy-save", limit=limit(1.5)))
    idles = [ns.run(lambda: dataplane.read_rules(-1)) for _ in range(20)]
    assert not any(live.reread for live in idles), "a child ran with nothing changed"
    idle = statistics.median(live.read_seconds for live in idles)
    rows.append(Row(f"{label}: nothing changed (table info getsockopt)", idle, 0.005, "5 ms budget",
                    limit=limit(1.0)))
    rows.append(Row(f"{label}: iptables-legacy-restore load (setup, for scale)", load, unit="s"))
    done = subprocess.run(["nsenter", f"--net={ns.path}", sys.executable, "-c", _GROWTH],
                          capture_output=True, encoding="utf-8", check=True)
    grown, child_peak = (int(v) for v in done.stdout.split())
    save_peak = max(rss for _, rss in saves)
    rows.append(Row(f"{label}: peak RSS added by a first check", grown / 1e6, save_peak / 1e6,
                    "iptables-legacy-save's peak RSS", unit="MB"))
    rows.append(Row(f"{label}: the save children's peak RSS", child_peak / 1e6, save_peak / 1e6,
                    "iptables-legacy-save's peak RSS", unit="MB"))


def run(args) -> list[Row]:
    sizes = (200, 1000) if getattr(args, "quick", False) else (1000, 10000)
    rows: list[Row] = []
    for count in sizes:
        try:
            with IptNS() as ns:
                _size(ns, count, rows)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
    return rows


if __name__ == "__main__":
    from bench.common import main

    main(run)
