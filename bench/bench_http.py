"""/metrics as Prometheus 2 and Prometheus 3 ask for it, on the IPVS page of 10,000 services x 5.

The table is written as /proc/net/ip_vs text under a procfs of our own
(tests/ipvs_text.py, the kernel's format), so this runs on the host without
the VM; the exporter's own WSGI app (exporter/http.py, socket left out) over a
Runner with the ipvs collector serves it. Each default Accept header is asked
with gzip, as the servers ask, the table read anew for each (as scrapes a
scrape interval apart find it; unchanged, so the reader's caches serve it):

- Prometheus 2: OpenMetrics 1.0.0 first (underscore escaping);
- Prometheus 3: OpenMetrics 1.0.0 with ``escaping=allow-utf-8`` first
  (scrape/scrape.go acceptHeader over config.DefaultScrapeProtocols).

Rows: each whole scrape against the Prometheus 2 one (the ratio to read: 1.0
means Prometheus 3 pays nothing more), and the page writer alone for the
Prometheus 3 format, ours against client_python's (the writer Prometheus 3's
scrapes got before).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prometheus_client.openmetrics.exposition import ALLOWUTF8
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from bench.bench_ipset import PROMETHEUS_3_ACCEPT, _Fixed, _scraper
from bench.bench_ipset import PROMETHEUS_ACCEPT as PROMETHEUS_2_ACCEPT
from bench.bench_ipvs import interleaved
from bench.common import Row
from exporter.cli import settings_from_args
from exporter.collector import Context, Runner
from exporter.collectors.ipvs import IPVSCollector
from exporter.dataplane import RealServer, VirtualServer, VirtualServerKey
from exporter.exposition import openmetrics_page
from exporter.http import make_app, negotiate
from exporter.paths import Paths
from exporter.readers.ipvs import kernel_hz
from tests.ipvs_text import format_ip_vs

def uniform_table(services: int, reals: int = 5) -> dict:
    """TCP ClusterIP virtual servers of ``reals`` masq real servers each (the bench_ipvs shape)."""
    table = {}
    for i in range(services):
        key = VirtualServerKey("TCP", f"10.{96 + (i >> 16)}.{i >> 8 & 255}.{i & 255}", 80 + i % 7)
        rs = {}
        for j in range(reals):
            n = i * 8 + j
            address = f"10.{128 + (n >> 16)}.{n >> 8 & 255}.{n & 255}"
            rs[(address, 8080)] = RealServer(address, 8080)
        table[key] = VirtualServer(key, real_servers=rs)
    return table


def run(args) -> list[Row]:
    services = 2_700 if args.quick else 10_000
    with tempfile.TemporaryDirectory(prefix=f"kubenode-bench-http-{os.getpid()}-") as procfs:
        (Path(procfs) / "net").mkdir()
        (Path(procfs) / "net" / "ip_vs").write_text(format_ip_vs(uniform_table(services), kernel_hz()))
        return _measure(procfs, services)


def _measure(procfs: str, services: int) -> list[Row]:
    settings = settings_from_args(["--path.procfs", procfs])
    collector = IPVSCollector(Context(settings=settings, paths=Paths(procfs, settings["path.sysfs"])))
    runner = Runner([collector])
    app = make_app(runner)
    text = _scraper(app)()
    if b'kubenode_collector_success{collector="ipvs"} 1.0' not in text or \
            f"kubenode_ipvs_virtual_servers {services:.1f}".encode() not in text:
        raise SystemExit("the ipvs collector did not read the bench table")
    if negotiate(PROMETHEUS_3_ACCEPT).lean is None:
        raise SystemExit("Prometheus 3's Accept header is not on the lean writer")

    p2, p3 = _scraper(app, PROMETHEUS_2_ACCEPT, "gzip"), _scraper(app, PROMETHEUS_3_ACCEPT, "gzip")

    def stale() -> None:
        collector.live._read_at = float("-inf")  # each scrape reads the table, as one a scrape interval apart

    scrapes = interleaved({"p2": (stale, p2), "p3": (stale, p3)}, rounds=15)
    families = list(runner.collect())
    n = sum(len(f.samples) for f in families)
    if openmetrics_page(families, escaping=ALLOWUTF8) != openmetrics_latest(_Fixed(families), escaping=ALLOWUTF8):
        raise SystemExit("the allow-utf-8 OpenMetrics page differs from prometheus_client's")
    writers = interleaved({"ours": lambda: openmetrics_page(families, escaping=ALLOWUTF8),
                           "theirs": lambda: openmetrics_latest(_Fixed(families), escaping=ALLOWUTF8)}, rounds=201)
    label = f"{services:,} services x 5 real servers, {len(text)} B page"
    return [
        Row(f"full scrape, Prometheus 2 Accept + gzip ({label})", scrapes["p2"]),
        Row("full scrape, Prometheus 3 Accept + gzip", scrapes["p3"], scrapes["p2"], "Prometheus 2 Accept"),
        Row(f"writer alone, OpenMetrics allow-utf-8, {n} samples", writers["ours"] * 1e6,
            writers["theirs"] * 1e6, "prometheus_client", unit="us"),
    ]
