"""ipset: a full scrape of 2,000 sets against `ipset list -t` on the same namespace.

The sets live in a fresh network namespace (removed afterwards). The timed
code runs in a thread that joined it (tests/ipset_ns.py), and `ipset list -t`
is started from that thread, so it inherits the namespace without `ip netns
exec`'s own start-up cost. "Full scrape" is what /metrics does: the Runner
with only the ipset collector, serialized by prometheus_client's
generate_latest.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from bench.common import Row, best_of
from exporter.cli import settings_from_args
from exporter.collector import Context, Runner
from exporter.collectors.ipset import IpsetCollector
from exporter.paths import Paths
from exporter.readers.ipset import read_headers
from tests.ipset_ns import NetNS

# (type, create options, how to make entry i of set s): a kube-router-like mix.
KINDS = [
    ("hash:ip", "", lambda s, i: f"10.{s % 250}.{i // 250}.{i % 250}"),
    ("hash:net", "", lambda s, i: f"10.{s % 250}.{i % 250}.0/24"),
    ("hash:ip,port", "", lambda s, i: f"10.{s % 250}.0.{i % 250},tcp:{1000 + i}"),
    ("hash:ip", "family inet6", lambda s, i: f"fd00:{s:x}::{i:x}"),
]


def restore_script(n_sets: int, n_entries: int) -> str:
    lines = []
    per_set, extra = divmod(n_entries, n_sets)
    for s in range(n_sets):
        kind, options, entry = KINDS[s % len(KINDS)]
        name = f"KUBE-BENCH-{s:05d}"
        lines.append(f"create {name} {kind} {options} maxelem 131072".replace("  ", " "))
        for i in range(per_set + (1 if s < extra else 0)):
            lines.append(f"add {name} {entry(s, i)}")
    return "\n".join(lines) + "\nCOMMIT\n"


def _interleaved(fns, rounds: int) -> list[tuple[float, float]]:
    """(best, median) wall time of each function, timed in alternation.

    The build machine is shared: alternating puts our scrape and the reference
    under the same background load, and the best round is the figure least
    disturbed by it (interference only ever adds time). Medians are printed too.
    """
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [(min(t), statistics.median(t)) for t in times]


def run(args) -> list[Row]:
    if os.geteuid() != 0:
        raise SystemExit("needs root (a network namespace and ipsets)")
    n_sets, n_entries = (200, 4_000) if args.quick else (2_000, 40_000)
    with NetNS("-bench") as ns:
        ns.ipset("restore", input=restore_script(n_sets, n_entries))
        return ns.run(lambda: _measure(n_sets, n_entries))


def _measure(n_sets: int, n_entries: int) -> list[Row]:
    headers = read_headers()
    if len(headers) != n_sets or sum(h.entries for h in headers) != n_entries:
        raise SystemExit(f"bench namespace has {len(headers)} sets / "
                         f"{sum(h.entries for h in headers)} entries, expected {n_sets} / {n_entries}")

    def ipset_terse() -> None:
        subprocess.run(["ipset", "list", "-t"], stdout=subprocess.PIPE, check=True)

    settings = settings_from_args([])
    ctx = Context(settings=settings, paths=Paths(settings["path.procfs"], settings["path.sysfs"]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Runner([IpsetCollector(ctx)]))
    page = generate_latest(registry)
    if b'kubenode_collector_success{collector="ipset"} 1.0' not in page:
        raise SystemExit("the ipset collector failed in the bench namespace")

    rounds = 21
    reference, scrape, reader = _interleaved(
        [ipset_terse, lambda: generate_latest(registry), read_headers], rounds)
    what = f"{n_sets} sets, {n_entries} entries"
    rows = [
        Row(f"full scrape ({what}, {len(page) // 1024} KB page), best", scrape[0], reference[0],
            "ipset list -t", limit=3.0),
        Row("full scrape, median", scrape[1], reference[1], "ipset list -t"),
        Row("reader alone (netlink header dump + parse), best", reader[0], reference[0], "ipset list -t"),
    ]
    try:
        from pyroute2 import IPSet
        from pyroute2.netlink.nfnetlink.ipset import IPSET_FLAG_LIST_HEADER
    except ImportError:
        return rows

    def pyroute2_headers() -> None:
        with IPSet() as ipset:
            for msg in ipset.list(flags=IPSET_FLAG_LIST_HEADER):
                msg.get_attr("IPSET_ATTR_DATA").get_attr("IPSET_ATTR_ELEMENTS")

    rows.append(Row("for comparison: pyroute2 IPSet().list(header flag), median",
                    best_of(pyroute2_headers, 3), reference[1], "ipset list -t"))
    return rows
