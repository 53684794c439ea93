"""iptables (legacy backend): the exporter's full check against `iptables-legacy-save` on the same rules.

kube-proxy's newest iptables layout (tests/ipt_rulesets.py) at 1,000 and 10,000
Services x 5 endpoints is loaded with `iptables-legacy-restore --noflush` into a
network namespace of its own (removed afterwards). The reference is one
`iptables-legacy-save` there (every table), as an operator would run it; the
issue's limit: a full check at most 1.5x of it.

Rows: a full check of a fresh ``IptablesDataplane`` on the legacy backend (the table
info getsockopt, each table's blob fetched by IPT_SO_GET_ENTRIES and decoded in this
process chain by chain as the resolver walks them: its lazy source, as the
exporter has it), its wall and CPU time; the floor under it: the same fetch and one
step over every entry, nothing decoded (what any reader in Python pays first); a re-read after kube-proxy rewrote one Service's
endpoint (the source's memo: only new entries decoded); the clock's re-read
(``REREAD_SECONDS``) with nothing changed (the tables fetched, their digests, counters
aside, found the last read's: nothing decoded or resolved) and one that finds an
endpoint swapped for one of the same length (the signal did not move: read whole);
nothing changed (the getsockopt alone: what a scrape costs between
changes, 5 ms budget); peak RSS a first check adds to a fresh process (VmHWM) against
iptables-legacy-save's, the RSS kept after it and after three periodic re-reads, and
what each part holds: the largest blob, the decoded rulesets, the resolution, and what
stays between reads (the memos and the resolution).
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


def _legacy_save(ns: IptNS) -> tuple[float, int, float]:
    """Wall time, peak RSS (bytes) and CPU seconds (user + system) of one
    `iptables-legacy-save` in the namespace."""
    start = time.perf_counter()
    child = subprocess.Popen(["nsenter", f"--net={ns.path}", "iptables-legacy-save"], stdout=subprocess.PIPE)
    for _ in iter(lambda: child.stdout.read(1 << 20), b""):
        pass
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"iptables-legacy-save failed with status {os.waitstatus_to_exitcode(status)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


# A fresh process in the namespace: peak RSS (VmHWM) and RSS around one full check, then the
# same steps one by one in a second fresh process to say what each part holds.
_GROWTH = """
import gc
from exporter import allocator
allocator.tune()  # as serve does, before anything
from exporter.readers.dataplanes import IptablesDataplane
from exporter.readers.iptables_legacy import IptablesLegacySource
import exporter.readers.iptables, exporter.readers.iptables_blob
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))
before = status("VmHWM")
legacy = IptablesLegacySource(keep=False, lazy=True)
dataplane = IptablesDataplane(legacy=legacy, nft=None)
live = dataplane.read_rules(0)
assert live.backend == "legacy" and live.read.table and not live.read.unread, live.read.unread[:3]
gc.collect()
first = status("VmRSS") - before
legacy.reread_interval = 0.0  # the re-read clock passed, three times: nothing changed
for _ in range(3):
    assert not dataplane.read_rules(-1).reread  # fetched, found the same by digest: nothing decoded
gc.collect()
print(status("VmHWM") - before, first, status("VmRSS") - before, legacy.blob_bytes)
"""

# What each part holds, to the byte (tracemalloc, in a fresh process: slower, exact).
_PARTS = """
import gc, tracemalloc
from exporter.readers import iptables_legacy as L
from exporter.readers.iptables import resolve_rulesets
from exporter.readers.iptables_blob import BlobMemo, decode_table
from exporter.readers.iptables_rules import IptablesRuleset
tracemalloc.start()
tables, memos, blob_bytes = {}, {}, 0
with L._socket(4) as sock:
    for table in ("nat", "filter"):
        blob = L.fetch_table(sock, 4, table)
        blob_bytes = max(blob_bytes, len(blob.buffer))
        memos[table] = memo = BlobMemo()
        memo.start_read()
        tables[table] = decode_table(blob.buffer, L._GET_ENTRIES_HEAD.size, blob.info.size, 4, blob.hooks,
                                     blob.underflows, memo)
        memo.end_read()
        del blob
gc.collect()
decoded_peak = tracemalloc.get_traced_memory()[1]
with_memos = tracemalloc.get_traced_memory()[0]
rulesets = [IptablesRuleset(4, tables)]
del tables
read = resolve_rulesets(rulesets)
gc.collect()
resolved = tracemalloc.get_traced_memory()[0] - with_memos
del rulesets
gc.collect()
kept = tracemalloc.get_traced_memory()[0]
print(blob_bytes, decoded_peak, with_memos, resolved, kept - resolved)
"""


def _floor() -> tuple[float, float]:
    """Wall and CPU seconds of what any reader of the legacy tables pays before it decodes a
    rule: IPv4 nat and filter fetched (the kernel's copy, as iptables-legacy-save takes it),
    then every entry stepped over once by its size (run in the namespace)."""
    from exporter.readers import iptables_legacy as legacy
    from exporter.readers.iptables_blob import _U16, ENTRY_SIZE, OFFSETS_AT

    start, cpu = time.perf_counter(), _cpu()
    entries = 0
    with legacy._socket(4) as sock:
        for table in ("nat", "filter"):
            blob = legacy.fetch_table(sock, 4, table)
            buffer, unpack = blob.buffer, _U16.unpack_from
            at, end, next_at = legacy._GET_ENTRIES_HEAD.size, legacy._GET_ENTRIES_HEAD.size + blob.info.size, OFFSETS_AT[4] + 2
            while at < end:
                step = unpack(buffer, at + next_at)[0]
                if step < ENTRY_SIZE[4]:
                    raise RuntimeError(f"an entry of {step} bytes")
                at += step
                entries += 1
    return time.perf_counter() - start, _cpu() - cpu


def _scan_floor() -> tuple[float, float, int]:
    """Wall and CPU seconds of the least a Python reader can do and still have what the
    resolver needs (run in the namespace): IPv4 nat and filter fetched, then nat's chain
    heads, every standard target's verdict and every DNAT's address and port found by
    regular-expression scans of the blob (in C), each placed in its chain. Nothing is
    checked (offsets, sizes, matches), no rule is decoded, the counters stay, and no
    frontend is read or resolved: a reader that may be trusted does all of that on top.
    Also gives the number of endpoint chains found (a check that the scans saw the rules)."""
    import bisect
    import re

    from exporter.readers import iptables_legacy as legacy
    from exporter.readers.iptables_blob import _HEAD_NAME, _XT_HEADER, STANDARD_TARGET_SIZE

    verdict_at = re.compile(re.escape(_XT_HEADER.pack(STANDARD_TARGET_SIZE, b"", 0)) + b"(....)", re.S)
    # xt_DNAT revision 1 or 2: nf_nat_range's first address, then its first port.
    dnat_at = re.compile(rb"DNAT\x00{25}[\x01\x02].{4}(.{16}).{16}(..)", re.S)
    start, cpu = time.perf_counter(), _cpu()
    with legacy._socket(4) as sock:
        nat, _ = legacy.fetch_table(sock, 4, "nat"), legacy.fetch_table(sock, 4, "filter")
    buffer = nat.buffer
    heads, names = [], []
    for found in _HEAD_NAME.finditer(buffer):
        heads.append(found.start())
        names.append(found.group(1))
    jumps: dict[int, list[int]] = {}
    for found in verdict_at.finditer(buffer):
        jumps.setdefault(bisect.bisect(heads, found.start()), []).append(int.from_bytes(found.group(1), "little"))
    endpoints = {bisect.bisect(heads, found.start()): (found.group(1)[:4], found.group(2))
                 for found in dnat_at.finditer(buffer)}
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    # Each DNAT placed in an endpoint chain, each of which jumps (to KUBE-MARK-MASQ): the
    # scans found what a reader needs, where it is (checked off the clock).
    assert all(names[chain - 1].startswith(b"KUBE-SEP-") for chain in endpoints), "a DNAT outside an endpoint chain"
    assert endpoints.keys() <= jumps.keys(), "an endpoint chain without its jump"
    return seconds, cpu, len(endpoints)


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _in_ns(ns: IptNS, code: str) -> list[int]:
    done = subprocess.run(["nsenter", f"--net={ns.path}", sys.executable, "-c", code],
                          capture_output=True, encoding="utf-8", check=True)
    return [int(v) for v in done.stdout.split()]


def _size(ns: IptNS, count: int, rows: list[Row]) -> None:
    from exporter.paths import Paths
    from exporter.readers.dataplanes import IptablesDataplane
    from exporter.readers.iptables_legacy import IptablesLegacySource

    services = bench_services(count, ENDPOINTS)
    start = time.perf_counter()
    ns.restore(ruleset(services, 4), 4, "legacy")
    load = time.perf_counter() - start
    label = f"{count:,} services x {ENDPOINTS} (legacy)"
    limit = (lambda ratio: ratio if count >= 10000 else None)  # the limits are at 10,000 x 5

    saves, checks, check_cpus, floors, scans = [], [], [], [], []
    dataplane = None
    for _ in range(3):
        saves.append(_legacy_save(ns))
        dataplane = None  # one alive at a time, as in the exporter
        dataplane = ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths(), keep=False, lazy=True), nft=None))
        cpu = _cpu()
        live = ns.run(lambda: dataplane.read_rules(0))
        check_cpus.append(_cpu() - cpu)
        assert live.reread and live.backend == "legacy" and not live.read.unread
        checks.append(live.read_seconds)
        floors.append(ns.run(_floor))
        scans.append(ns.run(_scan_floor))
    reference = min(t for t, _, _ in saves)
    save_cpu = min(cpu for _, _, cpu in saves)
    rows.append(Row(f"{label}: full check ({len(live.read.table):,} frontends)", min(checks), reference,
                    "iptables-legacy-save", limit=limit(1.5)))
    rows.append(Row(f"{label}: the same, CPU (user + system)", min(check_cpus), save_cpu, "iptables-legacy-save"))
    rows.append(Row(f"{label}: floor: the tables fetched and their entries stepped over, nothing decoded",
                    min(wall for wall, _ in floors), reference, "iptables-legacy-save"))
    assert all(found == len(services) * ENDPOINTS for _, _, found in scans), "the scans missed endpoint chains"
    rows.append(Row(f"{label}: floor: the tables fetched, then nat's chain heads, verdicts and DNATs found by "
                    "regular-expression scans (in C) and placed in their chains; nothing checked or resolved",
                    min(wall for wall, _, _ in scans), reference, "iptables-legacy-save"))
    rows.append(Row(f"{label}: floor, the scans, CPU (user + system)", min(cpu for _, cpu, _ in scans), save_cpu,
                    "iptables-legacy-save"))
    # kube-proxy moves one endpoint: its SEP chain replaced, the rest of the table as it was.
    rereads = []
    for i in range(3):
        sep = services[i].endpoints[0]
        text = ns.save(4, "legacy", "nat")
        ns.iptables(backend="legacy", tool="-restore",
                    input=text.replace(f"{sep[0]}:{sep[1]}", f"{sep[0]}:{sep[1] + 1}"))
        ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN", backend="legacy")  # the signal moves
        moved = ns.run(lambda: dataplane.read_rules(-1))
        assert moved.reread and not moved.read.unread
        rereads.append(moved.read_seconds)
    rows.append(Row(f"{label}: re-read after a change ({dataplane.legacy.decoded} parts decoded anew)",
                    min(rereads), reference, "iptables-legacy-save"))
    from exporter.readers.iptables_legacy import REREAD_SECONDS
    dataplane.legacy.reread_interval = 0.0  # as every REREAD_SECONDS: read again, nothing changed
    periodic = [ns.run(lambda: dataplane.read_rules(-1)) for _ in range(3)]
    dataplane.legacy.reread_interval = REREAD_SECONDS
    assert not any(live.reread for live in periodic), "the clock's re-read decoded the same rules again"
    rows.append(Row(f"{label}: the clock's re-read (every {REREAD_SECONDS:.0f} s), nothing changed: the tables "
                    "fetched and their digests compared, nothing decoded", min(live.read_seconds for live in periodic),
                    reference, "iptables-legacy-save"))
    # An endpoint swapped for one of the same length: count and size stay, the clock's re-read finds it.
    swapped = []
    for i in range(3):
        old = services[10 + i].endpoints[0][0]
        new = old[:-1] + ("7" if old[-1] != "7" else "8")
        text = ns.save(4, "legacy", "nat")
        ns.iptables(backend="legacy", tool="-restore", input=text.replace(f"{old}:", f"{new}:"))
        dataplane.legacy.reread_interval = 0.0
        live = ns.run(lambda: dataplane.read_rules(-1))
        dataplane.legacy.reread_interval = REREAD_SECONDS
        assert live.reread and not live.read.unread
        swapped.append(live.read_seconds)
    rows.append(Row(f"{label}: the clock's re-read finding an endpoint swapped (the signal did not move)",
                    min(swapped), reference, "iptables-legacy-save"))
    idles = [ns.run(lambda: dataplane.read_rules(-1)) for _ in range(20)]
    assert not any(live.reread for live in idles), "the tables were read with nothing changed"
    idle = statistics.median(live.read_seconds for live in idles)
    rows.append(Row(f"{label}: nothing changed (table info getsockopt)", idle, 0.005, "5 ms budget",
                    limit=limit(1.0)))
    rows.append(Row(f"{label}: iptables-legacy-restore load (setup, for scale)", load, unit="s"))
    grown, kept, kept_rereads, blob_bytes = _in_ns(ns, _GROWTH)
    blob, peak, decoded, resolved, memos = _in_ns(ns, _PARTS)
    save_peak = max(rss for _, rss, _ in saves)
    rows.append(Row(f"{label}: peak RSS added by a first check", grown / 1e6, save_peak / 1e6,
                    "iptables-legacy-save's peak RSS", unit="MB"))
    rows.append(Row(f"{label}: RSS kept after it (memos, resolution)", kept / 1e6, unit="MB"))
    rows.append(Row(f"{label}: RSS kept after three periodic re-reads more", kept_rereads / 1e6, unit="MB"))
    rows.append(Row(f"{label}: traced: the largest table blob (freed once decoded)", blob / 1e6, unit="MB"))
    rows.append(Row(f"{label}: traced: peak while decoding (blob + rules + memos)", peak / 1e6, unit="MB"))
    rows.append(Row(f"{label}: traced: decoded rulesets and the memos", decoded / 1e6, unit="MB"))
    rows.append(Row(f"{label}: traced: the memos alone (kept between reads)", memos / 1e6, unit="MB"))
    rows.append(Row(f"{label}: traced: the resolution", resolved / 1e6, unit="MB"))


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
