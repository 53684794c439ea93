"""The lean /metrics writers against prometheus_client's own, byte for byte.

Three sources of families: every real collector on this host (with ipsets of
awkward names in a namespace of our own and a real HTTP server serving
kube-proxy's and kube-router's pages, for the histograms), seeded random
families of every type client_python has, and the HTTP layer itself against
prometheus_client's make_wsgi_app on the same registry.
"""

from __future__ import annotations

import gzip
import math
import random
import urllib.request
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import ALLOWUTF8
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.samples import Exemplar, Sample, Timestamp

from exporter.exposition import Unsupported, go_float, openmetrics_page, text_page
from exporter import http as exporter_http
from exporter.http import MetricsServer, make_metrics_app, metrics_page
from tests.helpers import make_runner
from tests.ipset_ns import NetNS
from tests.proxy_pages import kube_proxy_page, kube_proxy_state, kube_router_page, kube_router_state
from tests.proxy_server import Answer, FakeProxy


class Fixed:
    """A collector that yields the same families every time."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def assert_same_pages(families: list[Metric], openmetrics: bool = True, utf8_declined_ok: bool = False) -> int:
    """Our pages against client_python's, under both escapings; how many allow-utf-8 pages we wrote.

    Under allow-utf-8 our writers decline (Unsupported) a name that would need
    quoting; ``utf8_declined_ok`` says whether ``families`` may hold one.
    """
    written = 0
    writers = [(text_page, generate_latest)]
    if openmetrics:
        writers.append((openmetrics_page, openmetrics_latest))
    for ours, theirs in writers:
        expected = theirs(Fixed(families))
        assert ours(families) == expected, _first_difference(ours(families), expected)
        expected = theirs(Fixed(families), escaping=ALLOWUTF8)
        try:
            page = ours(families, escaping=ALLOWUTF8)
        except Unsupported:
            assert utf8_declined_ok, "our writer declined allow-utf-8 on legacy names"
            continue
        assert page == expected, _first_difference(page, expected)
        written += 1
    return written


def _first_difference(ours: bytes, theirs: bytes) -> str:
    for n, (a, b) in enumerate(zip(ours.splitlines(), theirs.splitlines())):
        if a != b:
            return f"line {n}: ours {a!r} theirs {b!r}"
    return f"lengths {len(ours)} / {len(theirs)}"


# -- every real collector ---------------------------------------------------------

AWKWARD_SETS = ['q"uote', "back\\slash", "sp ace", "KUBE-SRC-ABCDEF", "100%s{}"]


@pytest.fixture
def proxies():
    kube_proxy, kube_router = FakeProxy().start(), FakeProxy().start()
    try:
        kube_proxy.answers["/metrics"] = Answer(kube_proxy_page(kube_proxy_state(dual_stack=True)).encode())
        kube_router.answers["/metrics"] = Answer(kube_router_page(kube_router_state(syncs=40, services=30)).encode())
        yield kube_proxy, kube_router
    finally:
        kube_proxy.stop()
        kube_router.stop()


@pytest.mark.parametrize("proxy", ["kube-proxy", "kube-router"])
def test_every_real_collector_on_this_host(proxies, proxy):
    server = proxies[0] if proxy == "kube-proxy" else proxies[1]
    # Every collector this host can run (whose own ipsets we only read; it has no ip_vs
    # module and no API server, so the IPVS collectors are the drift tests' business) ...
    runner, _ = make_runner(["--proxy", proxy, "--proxy.metrics-url", server.url(),
                             "--no-collector.ipvs", "--no-collector.ipvs_drift"])
    families = list(runner.collect())
    # ... and the ipset collector again in a namespace of ours, with sets of awkward names.
    ipset_runner, _ = make_runner([f"--no-collector.{name}"
                                   for name in ("memcg", "process", "proxy", "ipvs", "ipvs_drift")])
    with NetNS("-expo") as ns:
        for name in AWKWARD_SETS:
            ns.ipset("create", name, "hash:ip")
        ns.ipset("add", "sp ace", "10.0.0.1")
        ipset_families = ns.run(lambda: list(ipset_runner.collect()))

    # The pages are worth comparing only if every collector ran and the shapes are there.
    for page in (families, ipset_families):
        ok = {s.labels["collector"]: s.value for f in page if f.name == "kubenode_collector_success"
              for s in f.samples}
        assert ok and all(v == 1.0 for v in ok.values()), ok
    by_name = {f.name: f for f in families}
    assert by_name["kubenode_proxy_sync_duration_seconds"].type == "histogram"
    assert {f.type for f in families} >= {"gauge", "counter", "histogram"}
    ipset_sets = {s.labels["set"] for f in ipset_families if f.name == "kubenode_ipset_entries" for s in f.samples}
    assert ipset_sets == set(AWKWARD_SETS)
    assert_same_pages(families)
    assert_same_pages(ipset_families)


# -- seeded random families ---------------------------------------------------------

SPECIAL_VALUES = [0, 0.0, -0.0, 1, -1, True, False, 0.5, 1e-05, 0.005, 5e-324, 2.5e-7, 999999, 999999.5,
                  1000000, 1000000.0, 1234567.0, 1234567.89, 10 ** 15, 1e16, 1e22, 1.7976931348623157e308,
                  2 ** 53, 2 ** 53 + 1, -(2 ** 53), -(2 ** 53) - 1, 10 ** 30, -1234567.0, -1e22,
                  math.inf, -math.inf, math.nan, "1.5", "-Inf"]
VALUE_PIECES = ["", "a", "kube-system", "\\", '"', "\n", "\\n", "é", "日本", "\U0001F600", "{", "}", "%s", "%",
                "{}", "=", ",", " ", "\t", "\r", "#"]
NAME_PIECES = ["a", "b_c", "X", "_", ":", "9", "-", ".", "é", " ", "{", "%", "\n"]


def random_value(rng: random.Random):
    pick = rng.random()
    if pick < 0.4:
        return rng.choice(SPECIAL_VALUES)
    if pick < 0.6:
        return rng.randint(-10 ** 7, 10 ** 7)
    if pick < 0.8:
        return rng.uniform(-1e3, 1e3)
    return math.copysign(10 ** rng.uniform(-12, 25), rng.random() - 0.3)


def random_amount(rng: random.Random) -> float:
    """A counter's or a sum's value: not negative."""
    return abs(float(random_value(rng)))


def random_text(rng: random.Random, pieces: list[str], most: int = 4) -> str:
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, most)))


def random_label_names(rng: random.Random) -> list[str]:
    # "a\n" and "__a\n": client_python's name regexes end in "$", which also
    # matches before a final newline, so these take its odd paths.
    legacy = ["set", "type", "le_", "collector", "proxy", "a", "zz", "__reserved", "a\n", "__a\n"]
    names = set()
    for _ in range(rng.randint(0, 3)):
        names.add(rng.choice(legacy) if rng.random() < 0.7 else random_text(rng, NAME_PIECES, 3))
    return sorted(names, key=lambda _: rng.random())  # not in sorted order: the writer sorts


def random_timestamp(rng: random.Random):
    pick = rng.random()
    if pick < 0.7:
        return None
    if pick < 0.85:
        return rng.choice([1763401234.5, 0.001, 1763401234, 1.5e9 + rng.random()])
    return Timestamp(rng.randint(0, 2 * 10 ** 9), rng.randint(0, 999_999_999))


def random_bounds(rng: random.Random) -> list[str]:
    bounds = sorted({rng.choice([0.005, 1e-05, 0.1, 1, 2.5, 10, 1e6, 1234567.0, 0.0])
                     for _ in range(rng.randint(0, 5))})
    return [go_float(b) for b in bounds] + ["+Inf"]


def random_family(rng: random.Random) -> Metric:
    """One family of a random type, as a collector or client_python's parser would build it."""
    name = rng.choice(["kubenode_x", "kubenode_proxy_sync_duration_seconds", "a:b", "x_total", "up"])
    doc = random_text(rng, VALUE_PIECES + ["help text"], 5)
    labels = random_label_names(rng)
    label_values = lambda: [random_text(rng, VALUE_PIECES) for _ in labels]  # noqa: E731
    kind = rng.choice(["gauge", "counter", "histogram", "gaugehistogram", "summary", "info", "stateset",
                       "unknown", "raw"])
    n = rng.choice([0, 1, 2, 5])
    if kind == "gauge":
        unit = rng.choice(["", "", "seconds", "bytes"])
        family = GaugeMetricFamily(name, doc, labels=labels, unit=unit)
        for _ in range(n):
            family.add_metric(label_values(), random_value(rng), timestamp=random_timestamp(rng))
    elif kind == "counter":
        family = CounterMetricFamily(name, doc, labels=labels)
        for _ in range(n):
            created = rng.choice([None, 1763401000.25, 1e9])
            family.add_metric(label_values(), random_amount(rng), created=created,
                              timestamp=random_timestamp(rng))
    elif kind in ("histogram", "gaugehistogram"):
        cls = HistogramMetricFamily if kind == "histogram" else GaugeHistogramMetricFamily
        family = cls(name, doc, labels=[label for label in labels if label != "le"])
        for _ in range(n):
            bounds = random_bounds(rng)
            buckets = list(zip(bounds, sorted(rng.randint(0, 1000) for _ in bounds)))
            values = [random_text(rng, VALUE_PIECES) for _ in family._labelnames]
            family.add_metric(values, buckets, random_amount(rng), timestamp=random_timestamp(rng))
    elif kind == "summary":
        family = SummaryMetricFamily(name, doc, labels=[label for label in labels if label != "quantile"])
        for _ in range(n):
            family.add_metric([random_text(rng, VALUE_PIECES) for _ in family._labelnames],
                              rng.randint(0, 100), random_amount(rng), timestamp=random_timestamp(rng))
    elif kind == "info":
        family = InfoMetricFamily(name, doc, labels=labels)
        for _ in range(n):
            family.add_metric(label_values(), {"version": random_text(rng, VALUE_PIECES), "go": "1.22"})
    elif kind == "stateset":
        family = StateSetMetricFamily(name, doc, labels=[label for label in labels if label != name])
        for _ in range(n):
            family.add_metric([random_text(rng, VALUE_PIECES) for _ in family._labelnames],
                              {"on": rng.random() < 0.5, "off": rng.random() < 0.5})
    elif kind == "unknown":
        family = UnknownMetricFamily(name, doc, labels=labels)
        for _ in range(n):
            family.add_metric(label_values(), random_value(rng))
    else:
        # A family as only a hand-built Metric makes it: names outside the legacy
        # charset, samples of mixed names and label sets in one family.
        family = Metric("kubenode_raw", doc, rng.choice(["gauge", "counter", "untyped", "histogram"]))
        family.name = rng.choice([family.name, random_text(rng, NAME_PIECES, 6), "9lives", "a.b-c", "a:b\n"])
        for _ in range(n):
            sample_name = rng.choice([family.name, family.name + "_total", family.name + "_created",
                                      family.name + "_gsum", random_text(rng, NAME_PIECES, 5)])
            sample_labels = {label: random_text(rng, VALUE_PIECES) for label in random_label_names(rng)}
            family.samples.append(Sample(sample_name, sample_labels, random_value(rng), random_timestamp(rng)))
    return family


@pytest.mark.parametrize("seed", range(40))
def test_random_families(seed):
    rng = random.Random(seed)
    written = 0
    for _ in range(25):
        written += assert_same_pages([random_family(rng) for _ in range(rng.randint(0, 6))], utf8_declined_ok=True)
    assert written > 0  # allow-utf-8 pages of legacy names were written, not all declined


def test_empty_page_and_empty_families():
    assert_same_pages([])
    assert_same_pages([GaugeMetricFamily("kubenode_nothing", "no samples", labels=["a"]),
                       CounterMetricFamily("kubenode_nothing_either", "")])


def test_values_print_as_client_python_prints_them():
    from prometheus_client.utils import floatToGoString

    rng = random.Random(7)
    for v in SPECIAL_VALUES + [random_value(rng) for _ in range(20_000)]:
        assert go_float(v) == floatToGoString(v), v
    assert [go_float(v) for v in (1e6, 1234567.0, 0.005, 1e-05, math.inf, -0.0)] == \
        ["1e+06", "1.234567e+06", "0.005", "1e-05", "+Inf", "-0.0"]


def test_exemplars_left_out_of_text_and_left_to_client_python_in_openmetrics():
    family = CounterMetricFamily("kubenode_requests", "Requests.", labels=["code"])
    family.add_metric(["200"], 5)
    family.samples[0] = family.samples[0]._replace(exemplar=Exemplar({"trace_id": 'a"b'}, 1.0, 1763401234.5))
    assert text_page([family]) == generate_latest(Fixed([family]))
    with pytest.raises(Unsupported):
        openmetrics_page([family])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed([family]))
    body, content_type = metrics_page(registry, "application/openmetrics-text; version=1.0.0")
    assert body == openmetrics_latest(registry) and b'# {trace_id="a\\"b"} 1.0' in body


# -- the HTTP layer ------------------------------------------------------------------

# What Prometheus 2.42 (this machine's) sends by default: OpenMetrics first.
PROMETHEUS_2_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                       "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PROMETHEUS_3_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                       "application/openmetrics-text;version=0.0.1;q=0.5,"
                       "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")

ACCEPTS = [
    None,
    "text/plain",
    "text/plain; version=0.0.4",
    "text/plain;version=1.0.0",  # text 1.0.0, underscores: the 0.0.4 lines, its own Content-Type
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text; version=0.0.1",
    "application/openmetrics-text; version=1.0.0; escaping=dots",
    PROMETHEUS_2_ACCEPT,
    "*/*",
    "text/plain;version=1.0.0;escaping=underscores",
    # What Prometheus 3 sends by default (scrape/scrape.go acceptHeader over config.go's
    # DefaultScrapeProtocols, escaping allow-utf-8 on the 1.0.0 formats) ...
    PROMETHEUS_3_ACCEPT,
    # ... and 3.0's first form (config.UTF8NamesHeader on every protocol), and its text-only setting.
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;escaping=allow-utf-8;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;escaping=allow-utf-8;q=0.3,"
    "*/*;q=0.2",
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=0.0.4;q=0.5,*/*;q=0.4",
]


def _call(app, method: str, accept: str | None, encoding: str | None, query: str = ""):
    environ: dict = {"REQUEST_METHOD": method, "PATH_INFO": "/metrics", "QUERY_STRING": query}
    setup_testing_defaults(environ)
    if accept is not None:
        environ["HTTP_ACCEPT"] = accept
    if encoding is not None:
        environ["HTTP_ACCEPT_ENCODING"] = encoding
    got = {}

    def start_response(status, headers):
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    if got["headers"].get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return got["status"], got["headers"], body


def _sample_registry() -> CollectorRegistry:
    rng = random.Random(2026)
    families = [random_family(rng) for _ in range(30)]
    families = [f for f in families if all(s.exemplar is None for s in f.samples)]
    histogram = HistogramMetricFamily("kubenode_proxy_sync_duration_seconds", "Sync.", labels=["proxy"])
    histogram.add_metric(["kube-proxy"], [("0.005", 1), ("1e-05", 0), ("+Inf", 3)], 0.25)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(families + [histogram]))
    return registry


@pytest.mark.parametrize("encoding", [None, "gzip", "identity", "deflate, gzip;q=0.5"])
@pytest.mark.parametrize("accept", ACCEPTS)
def test_same_answer_as_prometheus_client_wsgi_app(accept, encoding):
    registry = _sample_registry()
    ours, theirs = make_metrics_app(registry), make_wsgi_app(registry)
    for method in ("GET", "OPTIONS", "POST", "HEAD"):
        assert _call(ours, method, accept, encoding) == _call(theirs, method, accept, encoding), method


def test_over_a_real_socket_text_gzip_and_openmetrics():
    registry = _sample_registry()
    server = MetricsServer(make_metrics_app(registry), "127.0.0.1:0")
    server.start()
    try:
        def fetch(headers):
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                return dict(resp.headers), resp.read()

        headers, body = fetch({})
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "Content-Encoding" not in headers and body == generate_latest(registry)
        headers, body = fetch({"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == generate_latest(registry)
        headers, body = fetch({"Accept": PROMETHEUS_2_ACCEPT, "Accept-Encoding": "gzip"})
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert gzip.decompress(body) == openmetrics_latest(registry)
    finally:
        server.stop()


def _no_client_python_writer(monkeypatch) -> None:
    """client_python's writers are only ever handed _Collected: make that fail loudly."""
    def refuse(self):
        raise AssertionError("the page was written by client_python's writer, not the lean one")
    monkeypatch.setattr(exporter_http._Collected, "collect", refuse)


def _families_lean_writes(registry) -> list[Metric]:
    kept = []
    for family in registry.collect():
        try:
            openmetrics_page([family], escaping=ALLOWUTF8)
            text_page([family], escaping=ALLOWUTF8)
        except Unsupported:
            continue
        kept.append(family)
    return kept


@pytest.mark.parametrize("accept, theirs, content_type", [
    (PROMETHEUS_3_ACCEPT, lambda r: openmetrics_latest(r, escaping=ALLOWUTF8),
     "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
    ("text/plain;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=0.0.4;q=0.5,*/*;q=0.4",
     lambda r: generate_latest(r, escaping=ALLOWUTF8), "text/plain; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
    ("text/plain;version=1.0.0", generate_latest, "text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
])
def test_prometheus_3_gets_the_lean_writer(monkeypatch, accept, theirs, content_type):
    legacy = _families_lean_writes(_sample_registry())
    assert len(legacy) >= 10
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(legacy))
    expected = theirs(registry)
    _no_client_python_writer(monkeypatch)
    assert metrics_page(registry, accept) == (expected, content_type)


def test_a_name_that_needs_quoting_is_left_to_client_python():
    family = GaugeMetricFamily("kubenode_x", "X.", labels=["a"])
    family.add_metric(["1"], 1)
    odd = GaugeMetricFamily("kubenode.dotted", "Dotted.", labels=["__reserved"])
    odd.add_metric(["2"], 2)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed([family, odd]))
    body, content_type = metrics_page(registry, PROMETHEUS_3_ACCEPT)
    assert body == openmetrics_latest(registry, escaping=ALLOWUTF8)
    assert b'{"kubenode.dotted","__reserved"="2"} 2.0' in body
    assert content_type.endswith("escaping=allow-utf-8")


@pytest.mark.parametrize("accept, expected", [
    # Out of order: the client's q-values decide, not the order it wrote them in.
    ("text/plain;version=0.0.4;q=0.3,application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6",
     "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
    ("application/openmetrics-text;version=1.0.0;q=0.2,text/plain;version=1.0.0;q=0.9",
     "text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
    # A range at q=0 is refused: the next one is served.
    ("application/openmetrics-text;version=1.0.0;q=0,text/plain;version=0.0.4", "text/plain; version=0.0.4; charset=utf-8"),
    # Ties keep the client's order.
    ("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=1.0.0;q=0.5",
     "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"),
])
def test_negotiation_follows_the_clients_q_values(accept, expected):
    assert exporter_http.negotiate(accept).content_type == expected
