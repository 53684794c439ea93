"""Proxy collector: parse time of a proxy's metrics page, against client_python's full parser.

Pages are generated as kube-proxy 1.36 and kube-router v2 print them
(tests/proxy_pages.py): a realistic kube-proxy page, a padded one, and a
kube-router page with per-service gauges for 7,000 services (about 10 MB).
"Ours" parses only the families the collector carries (checking every line's
outline); the reference parses every family.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from bench.common import Row, best_of
from exporter.collectors.proxy import KUBE_PROXY_FAMILIES, KUBE_ROUTER_FAMILIES, read_kube_proxy, read_kube_router
from exporter.collectors.proxy import SyncCountWatch
from exporter.readers.proxymetrics import parse_families
from tests.proxy_pages import kube_proxy_page, kube_proxy_state, kube_router_page, kube_router_state


def _reference(text: str) -> None:
    for family in text_string_to_metric_families(text):
        for _ in family.samples:
            pass


def run(args) -> list[Row]:
    services = 1000 if args.quick else 7000
    pages = [
        ("kube-proxy page", kube_proxy_page(kube_proxy_state()), "kube-proxy"),
        ("kube-proxy page, dual-stack, 5 API hosts",
         kube_proxy_page(kube_proxy_state(dual_stack=True), api_hosts=5), "kube-proxy"),
        (f"kube-router page, {services:,} services", kube_router_page(kube_router_state(services=services)),
         "kube-router"),
    ]
    rows = []
    for label, text, proxy in pages:
        if proxy == "kube-proxy":
            def ours(text=text):
                read_kube_proxy(parse_families(text, KUBE_PROXY_FAMILIES), 0.0)
        else:
            def ours(text=text):
                read_kube_router(parse_families(text, KUBE_ROUTER_FAMILIES), 0.0, SyncCountWatch())
        repeat = 2 if len(text) > 1_000_000 else 7
        rows.append(Row(f"parse {label} ({len(text) / 1024:,.0f} KiB)", best_of(ours, repeat),
                        best_of(lambda text=text: _reference(text), repeat), "client_python parser"))
    rows.append(_whole_scrape(pages[0][1]))
    return rows


def _whole_scrape(text: str) -> Row:
    """One collect() over real HTTP (fetch + parse + shape) against a bare GET of the same page."""
    import urllib.request

    from exporter.collector import Runner
    from tests.helpers import make_runner
    from tests.proxy_server import Answer, FakeProxy

    fake = FakeProxy().start()
    try:
        fake.answers["/metrics"] = Answer(text.encode())
        runner, _ = make_runner(["--proxy.metrics-url", fake.url()])
        runner = Runner(runner.collectors)
        ours = best_of(lambda: list(runner.collect()), 7)
        reference = best_of(lambda: urllib.request.urlopen(fake.url(), timeout=5).read(), 7)
    finally:
        fake.stop()
    return Row(f"scrape via HTTP, kube-proxy page ({len(text) / 1024:,.0f} KiB)", ours, reference,
               "urllib GET only")
