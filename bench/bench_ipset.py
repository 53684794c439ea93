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
import subprocess

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

    repeat = 15
    reference = best_of(ipset_terse, repeat)
    scrape = best_of(lambda: generate_latest(registry), repeat)
    reader = best_of(read_headers, repeat)
    what = f"{n_sets} sets, {n_entries} entries"
    rows = [
        Row(f"full scrape ({what}, {len(page) // 1024} KB page)", scrape, reference,
            "ipset list -t", limit=3.0),
        Row("reader alone (netlink header dump + parse)", reader, reference, "ipset list -t"),
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

    rows.append(Row("for comparison: pyroute2 IPSet().list(header flag)", best_of(pyroute2_headers, 3),
                    reference, "ipset list -t"))
    return rows
