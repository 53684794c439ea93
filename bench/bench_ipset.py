"""ipset: a full scrape of 2,000 sets against `ipset list -t` on the same namespace.

The sets live in a fresh network namespace (removed afterwards). The timed
code runs in a thread that joined it (tests/ipset_ns.py), and `ipset list -t`
is started from that thread, so it inherits the namespace without `ip netns
exec`'s own start-up cost. "Full scrape" is what /metrics does: the
exporter's own /metrics WSGI app (exporter/http.py, socket left out) over a
Runner with only the ipset collector, asked as curl asks (text, no gzip) and
as a Prometheus server asks (OpenMetrics first, gzip). The page writers alone
are then timed against prometheus_client's on the same families.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import subprocess
import time

from wsgiref.util import setup_testing_defaults

from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import ALLOWUTF8
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from bench.common import Row, best_of
from exporter.cli import settings_from_args
from exporter.collector import Context, Runner
from exporter.collectors.ipset import IpsetCollector
from exporter.exposition import openmetrics_page, text_page
from exporter.http import make_app
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


def _interleaved(probes, rounds: int) -> list[dict[str, float]]:
    """Best and median wall time, and best CPU time, of each probe, timed in alternation.

    A probe runs its work once and returns the CPU seconds it cost. The build
    machine is shared: alternating puts our scrape and the reference under the
    same background load; the best round is the one least disturbed (load only
    ever adds time); CPU time, kernel time included, hardly depends on the load.
    """
    for probe in probes:
        probe()  # warm-up
    walls: list[list[float]] = [[] for _ in probes]
    cpus: list[list[float]] = [[] for _ in probes]
    for _ in range(rounds):
        for probe, wall, cpu in zip(probes, walls, cpus):
            start = time.perf_counter()
            cpu.append(probe())
            wall.append(time.perf_counter() - start)
    return [{"best": min(w), "median": statistics.median(w), "cpu": min(c)} for w, c in zip(walls, cpus)]


def _in_thread(fn):
    """A probe of in-process work: this thread's CPU time (user + system) around ``fn``."""
    def probe() -> float:
        start = time.thread_time()
        fn()
        return time.thread_time() - start
    return probe


def _ipset_terse() -> float:
    """A probe of `ipset list -t`: the child's user + system time, exec and all."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["ipset", "list", "-t"], stdout=subprocess.PIPE, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# What Prometheus 2.42 (this machine's) sends: OpenMetrics first, gzip.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
# What Prometheus 3 sends by default (scrape/scrape.go acceptHeader over config.DefaultScrapeProtocols).
PROMETHEUS_3_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                       "application/openmetrics-text;version=0.0.1;q=0.5,"
                       "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")


def _scraper(app, accept: str | None = None, encoding: str | None = None):
    """One GET /metrics on the WSGI app, as the HTTP server calls it; the body."""
    def scrape() -> bytes:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"}
        if accept:
            environ["HTTP_ACCEPT"] = accept
        if encoding:
            environ["HTTP_ACCEPT_ENCODING"] = encoding
        setup_testing_defaults(environ)
        return b"".join(app(environ, lambda status, headers: None))
    return scrape


class _Fixed:
    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families


def _writer_rows(families) -> list[Row]:
    """The page writers alone on the ipset families: microseconds a sample, ours against client_python's."""
    n = sum(len(f.samples) for f in families)
    rows = []
    for what, ours, theirs in [("text 0.0.4", text_page, generate_latest),
                               ("OpenMetrics 1.0.0", openmetrics_page, openmetrics_latest),
                               ("OpenMetrics 1.0.0 allow-utf-8 (Prometheus 3)",
                                functools.partial(openmetrics_page, escaping=ALLOWUTF8),
                                functools.partial(openmetrics_latest, escaping=ALLOWUTF8))]:
        if ours(families) != theirs(_Fixed(families)):
            raise SystemExit(f"the {what} writer's page differs from prometheus_client's")
        ours_cpu, theirs_cpu = _interleaved([_in_thread(lambda: ours(families)),
                                            _in_thread(lambda: theirs(_Fixed(families)))], rounds=21)
        rows.append(Row(f"writer alone, {what}, CPU a sample", ours_cpu["cpu"] / n * 1e6,
                        theirs_cpu["cpu"] / n * 1e6, "prometheus_client", unit="us"))
    return rows


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

    settings = settings_from_args([])
    ctx = Context(settings=settings, paths=Paths(settings["path.procfs"], settings["path.sysfs"]))
    runner = Runner([IpsetCollector(ctx)])
    app = make_app(runner)
    text, prometheus = _scraper(app), _scraper(app, PROMETHEUS_ACCEPT, "gzip")
    prometheus_3 = _scraper(app, PROMETHEUS_3_ACCEPT, "gzip")
    page = text()
    if b'kubenode_collector_success{collector="ipset"} 1.0' not in page:
        raise SystemExit("the ipset collector failed in the bench namespace")

    reference, scrape, scrape_prometheus, scrape_prometheus_3, reader = _interleaved(
        [_ipset_terse, _in_thread(text), _in_thread(prometheus), _in_thread(prometheus_3),
         _in_thread(read_headers)], rounds=21)
    what = f"{n_sets} sets, {n_entries} entries"
    terse = "ipset list -t"
    rows = [
        Row(f"full scrape ({what}, {len(page) // 1024} KB page), best wall", scrape["best"],
            reference["best"], terse, limit=3.0),
        Row("full scrape, median wall", scrape["median"], reference["median"], terse),
        Row("full scrape, CPU (user+sys, kernel dump included)", scrape["cpu"], reference["cpu"], terse,
            limit=3.0),
        Row("full scrape, OpenMetrics + gzip as Prometheus asks, best wall", scrape_prometheus["best"],
            reference["best"], terse, limit=3.0),
        Row("full scrape, OpenMetrics + gzip, CPU", scrape_prometheus["cpu"], reference["cpu"], terse, limit=3.0),
        Row("full scrape as Prometheus 3 asks (allow-utf-8), CPU", scrape_prometheus_3["cpu"],
            scrape_prometheus["cpu"], "as Prometheus 2 asks"),
        Row("reader alone (netlink header dump + parse), best wall", reader["best"], reference["best"], terse),
        Row("reader alone, CPU", reader["cpu"], reference["cpu"], terse),
    ]
    rows += _writer_rows(list(runner.collect()))
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
                    best_of(pyroute2_headers, 3), reference["median"], terse))
    return rows
