"""nftables: the live reader against `nft list table ip kube-proxy` on the same table.

kube-proxy's newest layout (tests/nft_rulesets.py) at 1,000 and 10,000 Services x 5
endpoints is loaded with `nft -f` into a network namespace of its own (removed
afterwards). Our reads run in a thread that joined it; `nft` runs there through
nsenter. Rows: a first read (every rule decoded, every anonymous set fetched), a
read with nothing changed (the generation check), and the read after one
Service's endpoints changed (kube-proxy's partial sync: its sets, maps and base
chains added again as they are, the Service's chain added, flushed and written
again), each as a ratio of `nft list table`, with the CPU time of that read
(os.times: the machine is shared) and the chains it dumped (the change feed names
the one that changed: one); the CPU of the read after a Service was added, after one
was deleted, and after one's endpoints went to zero and back (map elements changed:
applied from the feed, no whole read); then memory: what a first read adds to a fresh
process's peak RSS (VmHWM), against nft's own peak RSS, and what the reader keeps
(tracemalloc) after its first read and after those element changes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from bench.common import Row
from exporter.readers.nftables import NftablesReader
from tests.nft_rulesets import (NftNS, bench_services, element_deleted, endpoints_synced, ruleset, service_resynced,
                                service_rules)

ENDPOINTS = 5


def _nft_list(ns: NftNS) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one `nft list table ip kube-proxy` in the namespace."""
    start = time.perf_counter()
    child = subprocess.Popen(["nsenter", f"--net={ns.path}", "nft", "list", "table", "ip", "kube-proxy"],
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"nft list table failed with status {child.returncode}")
    return elapsed, usage.ru_maxrss * 1024


# A fresh process: peak RSS (VmHWM) after the imports, then after one first read.
_GROWTH = """
from exporter.readers.nftables import NftablesReader
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
before = hwm()
read = NftablesReader().read()
print(hwm() - before)
"""


def _peak_growth(ns: NftNS) -> int:
    """How much one first read adds to a fresh exporter process's peak RSS, in bytes."""
    done = subprocess.run(["nsenter", f"--net={ns.path}", sys.executable, "-c", _GROWTH],
                          capture_output=True, encoding="utf-8", check=True)
    return int(done.stdout.strip())


def _size(ns: NftNS, count: int, rows: list[Row]) -> None:
    services = bench_services(count, ENDPOINTS)
    start = time.perf_counter()
    ns.nft(ruleset(services))
    load = time.perf_counter() - start
    label = f"{count:,} services x {ENDPOINTS}"

    def limit(ratio: float) -> float | None:
        return ratio if count >= 10000 else None  # the issue sets its limits at 10,000 x 5

    # A first read is a fresh reader's; alternate it with nft so both see the same load.
    runs, firsts = [], []
    reader = first = None
    for i in range(3):
        runs.append(_nft_list(ns))
        reader = first = None  # one reader alive at a time, as in the exporter
        reader = NftablesReader()
        first = ns.run(reader.read)
        firsts.append(first.read_seconds)
    assert len(first.table) >= count and not first.unread, first.unread[:3]
    reference = min(t for t, _ in runs)
    nft_peak = max(rss for _, rss in runs)
    rows.append(Row(f"{label}: first read", min(firsts), reference, "nft list table", limit=limit(1.0)))

    idle = statistics.median(ns.run(reader.read).read_seconds for _ in range(20))
    rows.append(Row(f"{label}: read, nothing changed", idle, 0.005, "5 ms budget", limit=limit(1.0)))

    changes, cpu, dumped = [], [], []
    whole_reads = reader.whole_reads
    for i in range(10):
        svc = services[i * 7]
        ns.nft(endpoints_synced(svc, [(a, p + 1) for a, p in svc.endpoints]))
        before = os.times()
        read = ns.run(reader.read)
        after = os.times()
        assert read.reread and reader.anonymous_sets_read == 1
        changes.append(read.read_seconds)
        cpu.append(after.user - before.user + after.system - before.system)
        dumped.append(reader.chains_dumped)
    assert reader.whole_reads == whole_reads, reader.whole_reason
    rows.append(Row(f"{label}: read after one Service changed", statistics.median(changes), reference,
                    "nft list table", limit=limit(0.2)))
    # os.times ticks in 10 ms: the mean of ten reads, not a median of ticks.
    rows.append(Row(f"{label}: CPU of that read (mean of 10)", sum(cpu) / len(cpu), unit="s",
                    ceiling=0.03 if count >= 10000 else None))
    rows.append(Row(f"{label}: chains dumped by that read", statistics.median(dumped), unit="chains"))
    for kind, cpu, dumped in _element_changes(ns, reader, services, count):
        rows.append(Row(f"{label}: CPU of the read after {kind} (mean of {len(cpu)})",
                        sum(cpu) / len(cpu), unit="s", ceiling=0.03 if count >= 10000 else None))
        rows.append(Row(f"{label}: chains dumped by that read", statistics.median(dumped), unit="chains"))
    rows.append(Row(f"{label}: nft -f load (setup, for scale)", load, unit="s"))
    _kept(ns, count, rows, label)
    grown = _peak_growth(ns) / 1e6
    rows.append(Row(f"{label}: peak RSS added by a first read", grown, nft_peak / 1e6, "nft's peak RSS",
                    unit="MB"))


def _element_changes(ns: NftNS, reader: NftablesReader, services, count: int, rounds: int = 5, offset: int = 0):
    """Reads after kube-proxy-like syncs that move map elements: a Service added (its chains,
    its service-ips element), one deleted (its elements, its chains flushed), one's endpoints
    gone to zero (service-ips -> no-endpoint-services) and back. Each must be a read of what
    changed (``offset``: which Services, so that a second call meets others). Yields (kind,
    CPU seconds per read, chains dumped per read)."""
    whole_reads = reader.whole_reads
    cpu: dict[str, list[float]] = {}
    dumped: dict[str, list[int]] = {}

    def timed(kind: str, script: str) -> None:
        ns.nft(script)
        before = os.times()
        read = ns.run(reader.read)
        after = os.times()
        assert read.reread and reader.elements_applied, kind
        cpu.setdefault(kind, []).append(after.user - before.user + after.system - before.system)
        dumped.setdefault(kind, []).append(reader.chains_dumped)

    for i in range(offset, offset + rounds):
        new = bench_services(count + i + 1, ENDPOINTS)[-1]
        new.name, new.cluster_ip = f"added{i}", f"172.31.0.{i + 1}"
        lines = service_rules(new)
        timed("a Service was added", "\n".join(line for kind in ("sets", "chains", "rules", "elements") for line in lines[kind]) + "\n")
        gone = service_rules(services[count // 2 + i])
        timed("a Service was deleted", "\n".join([element_deleted(line) for line in gone["elements"]]
                                    + [line.replace("add chain", "flush chain", 1) for line in gone["chains"]]) + "\n")
        svc = services[count // 3 + i]
        before = service_rules(svc)
        svc.endpoints, endpoints = [], svc.endpoints
        timed("a Service's endpoints went to zero", service_resynced(svc, before))
        before = service_rules(svc)
        svc.endpoints = endpoints
        timed("they came back", service_resynced(svc, before))
    assert reader.whole_reads == whole_reads, reader.whole_reason
    for kind in cpu:
        yield kind, cpu[kind], dumped[kind]


# A fresh reader's kept memory (tracemalloc: every Python object alive) after its first read
# and after a few reads of element changes (``_element_changes``).
def _kept(ns: NftNS, count: int, rows: list[Row], label: str) -> None:
    import gc
    import tracemalloc

    services = bench_services(count, ENDPOINTS)
    tracemalloc.start()
    try:
        reader = NftablesReader()
        last = ns.run(reader.read)
        gc.collect()
        first = tracemalloc.get_traced_memory()[0]
        for _ in _element_changes(ns, reader, services, count, rounds=3, offset=10):
            pass
        last = ns.run(reader.read)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        reader.close()
        del last, reader
    finally:
        tracemalloc.stop()
    rows.append(Row(f"{label}: kept by the reader after its first read (tracemalloc)", first / 1e6, unit="MB"))
    rows.append(Row(f"{label}: kept after 12 reads of element changes, more than that", (after - first) / 1e6,
                    unit="MB"))


def run(args) -> list[Row]:
    sizes = (200, 1000) if getattr(args, "quick", False) else (1000, 10000)
    rows: list[Row] = []
    for count in sizes:
        try:
            with NftNS() as ns:
                _size(ns, count, rows)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
    return rows
