"""Collector ``proxy`` against a real HTTP server serving kube-proxy's and kube-router's pages."""

from __future__ import annotations

import logging
import math
import time

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import Collector, Runner
from exporter.collectors.proxy import ProxyCollector
from exporter.http import MetricsServer, make_app
from tests.helpers import get, make_runner, samples, value
from tests.proxy_pages import (
    GO_DEFAULT_BUCKETS,
    KUBE_PROXY_PROGRAMMING_BUCKETS,
    KUBE_PROXY_SYNC_BUCKETS,
    go_float,
    kube_proxy_page,
    kube_proxy_state,
    kube_router_page,
    kube_router_state,
    node_exporter_page,
    old_kube_proxy_page,
)
from tests.proxy_server import Answer, FakeProxy, closed_port

NOW = 1763401234.5


@pytest.fixture
def fake():
    server = FakeProxy().start()
    try:
        yield server
    finally:
        server.stop()


def collector(*argv: str, clock=lambda: NOW) -> ProxyCollector:
    runner, ctx = make_runner(list(argv))
    return ProxyCollector(ctx, clock=clock)


def scrape(coll: Collector) -> dict:
    return samples(Runner([coll]))


def buckets_on_page(text: str, family: str) -> dict[tuple, float]:
    """An independent reading of the page (client_python's parser): summed over ip_family."""
    out: dict[tuple, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for s in fam.samples:
            key = (s.name, s.labels.get("le"))
            out[key] = out.get(key, 0.0) + s.value
    return out


def carried(s: dict, name: str, proxy: str) -> dict[tuple, float]:
    out = {}
    for (sample, labels), v in s.items():
        labels = dict(labels)
        if sample.startswith(name) and labels.get("proxy") == proxy:
            out[(sample, labels.get("le"))] = v
    return out


def assert_same_histogram(ours: dict, theirs: dict, base: str) -> None:
    assert ours, f"{base} not carried"
    # bounds compared as numbers: we print them as client_python does
    norm = lambda d: {(k[0], None if k[1] is None else float(k[1])): v for k, v in d.items()}  # noqa: E731
    ours_n, theirs_n = norm(ours), norm(theirs)
    assert set(ours_n) == set(theirs_n)
    for key in theirs_n:
        assert ours_n[key] == pytest.approx(theirs_n[key], rel=1e-12), key


# -- kube-proxy ---------------------------------------------------------------


@pytest.mark.parametrize("dual_stack", [False, True])
def test_kube_proxy_page_carried_over(fake, dual_stack):
    state = kube_proxy_state(now=NOW, dual_stack=dual_stack)
    state.endpoint_changes_pending, state.service_changes_pending = 7, 2
    text = kube_proxy_page(state)
    fake.answers["/metrics"] = Answer(text.encode())
    s = scrape(collector("--proxy.metrics-url", fake.url()))

    assert value(s, "kubenode_collector_success", collector="proxy") == 1.0
    assert value(s, "kubenode_proxy_up", proxy="kube-proxy") == 1.0
    sync = carried(s, "kubenode_proxy_sync_duration_seconds", "kube-proxy")
    theirs = {("kubenode_proxy_sync_duration_seconds" + k[0][len("kubeproxy_sync_proxy_rules_duration_seconds"):],
               k[1]): v for k, v in buckets_on_page(text, "kubeproxy_sync_proxy_rules_duration_seconds").items()}
    assert_same_histogram(sync, theirs, "sync duration")
    # the proxy's own buckets, not ours: 0.001 s doubling to 16.384 s, then +Inf
    bounds = sorted(float(le) for (name, le) in sync if name.endswith("_bucket"))
    assert bounds == pytest.approx(list(KUBE_PROXY_SYNC_BUCKETS) + [math.inf])
    total = sum(len(v) for v in state.syncs.values())
    assert sync[("kubenode_proxy_sync_duration_seconds_count", None)] == total

    prog = carried(s, "kubenode_proxy_network_programming_duration_seconds", "kube-proxy")
    bounds = sorted(float(le) for (name, le) in prog if name.endswith("_bucket"))
    assert bounds[0] == 0.0 and len(bounds) == len(KUBE_PROXY_PROGRAMMING_BUCKETS) + 1
    assert prog[("kubenode_proxy_network_programming_duration_seconds_count", None)] == \
        sum(len(v) for v in state.programming.values())

    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-proxy") == \
        pytest.approx(NOW - 3.25)
    # queued before the last sync: nothing waits
    assert value(s, "kubenode_proxy_sync_pending_seconds", proxy="kube-proxy") == 0.0
    assert value(s, "kubenode_proxy_endpoint_changes_pending", proxy="kube-proxy") == 7.0
    assert value(s, "kubenode_proxy_service_changes_pending", proxy="kube-proxy") == 2.0
    # we asked for the text format, uncompressed
    assert fake.requests[-1]["headers"]["Accept"].startswith("text/plain")
    assert fake.requests[-1]["headers"]["Accept-Encoding"] == "identity"


def test_changes_queued_after_the_last_sync_show_their_age(fake):
    """The third incident: kube-proxy keeps queueing changes but its sync loop is hung."""
    state = kube_proxy_state(now=NOW, dual_stack=True)
    state.last_sync = {"IPv4": NOW - 900.0, "IPv6": NOW - 5.0}  # IPv4 has not synced for 15 min
    state.last_queued = {"IPv4": NOW - 842.0, "IPv6": NOW - 6.0}  # ... and a change waits since then
    state.endpoint_changes_pending = 31
    fake.answers["/metrics"] = Answer(kube_proxy_page(state).encode())
    coll = collector("--proxy.metrics-url", fake.url())
    s = scrape(coll)
    assert value(s, "kubenode_proxy_sync_pending_seconds", proxy="kube-proxy") == pytest.approx(842.0)
    # the family most behind decides the last sync time
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-proxy") == pytest.approx(NOW - 900)
    assert value(s, "kubenode_proxy_endpoint_changes_pending", proxy="kube-proxy") == 31.0

    # the wait grows with our clock while kube-proxy stays stuck
    coll.clock = lambda: NOW + 60
    s = scrape(coll)
    assert value(s, "kubenode_proxy_sync_pending_seconds", proxy="kube-proxy") == pytest.approx(902.0)

    # it syncs: the wait is 0 again
    state.last_sync = {"IPv4": NOW + 61, "IPv6": NOW + 61}
    fake.answers["/metrics"] = Answer(kube_proxy_page(state).encode())
    coll.clock = lambda: NOW + 62
    s = scrape(coll)
    assert value(s, "kubenode_proxy_sync_pending_seconds", proxy="kube-proxy") == 0.0


def test_kube_proxy_before_its_first_sync(fake, caplog):
    """Labelled families appear only once observed: right after start only the queue time is there.

    No sync histogram is no sync metrics to alert on, so the proxy is not up (for
    KubeNodeProxyMetricsDown's 10 minutes that is a proxy that never synced); what
    the page has is still carried, and the log says why in kube-proxy's terms.
    """
    state = kube_proxy_state(now=NOW)
    state.syncs, state.programming, state.last_sync = {}, {}, None
    state.last_queued = {"IPv4": NOW - 20.0}
    fake.answers["/metrics"] = Answer(kube_proxy_page(state).encode())
    s = scrape(collector("--proxy.metrics-url", fake.url()))
    assert value(s, "kubenode_collector_success", collector="proxy") == 1.0
    assert value(s, "kubenode_proxy_up", proxy="kube-proxy") == 0.0
    assert value(s, "kubenode_proxy_expected_metric_missing", proxy="kube-proxy",
                 metric="kubeproxy_sync_proxy_rules_duration_seconds") == 1.0
    assert not carried(s, "kubenode_proxy_sync_duration_seconds", "kube-proxy")
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-proxy") is None
    assert value(s, "kubenode_proxy_sync_pending_seconds", proxy="kube-proxy") == pytest.approx(20.0)
    assert "has not synced since it started" in caplog.text


def test_default_url_is_kube_proxys_own():
    coll = collector()
    assert coll.url == "http://127.0.0.1:10249/metrics"


# -- kube-router ----------------------------------------------------------------


def test_kube_router_page_and_last_sync_from_count_growth(fake):
    state = kube_router_state(syncs=40, services=30)
    fake.answers["/metrics"] = Answer(kube_router_page(state).encode())
    clock = [NOW]
    coll = collector("--proxy", "kube-router", "--proxy.metrics-url", fake.url(), clock=lambda: clock[0])

    s = scrape(coll)
    assert value(s, "kubenode_collector_success", collector="proxy") == 1.0
    assert value(s, "kubenode_proxy_up", proxy="kube-router") == 1.0
    sync = carried(s, "kubenode_proxy_sync_duration_seconds", "kube-router")
    bounds = sorted(float(le) for (name, le) in sync if name.endswith("_bucket"))
    assert bounds == pytest.approx(list(GO_DEFAULT_BUCKETS) + [math.inf])
    assert sync[("kubenode_proxy_sync_duration_seconds_count", None)] == 40
    assert sync[("kubenode_proxy_sync_duration_seconds_sum", None)] == pytest.approx(sum(state.syncs))
    assert value(s, "kubenode_proxy_ipvs_services", proxy="kube-router") == 60.0
    # first sight of the count: when it last grew is unknown, so no series yet
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-router") is None
    # kube-router has no queue time to compare with
    assert value(s, "kubenode_proxy_sync_pending_seconds", proxy="kube-router") is None

    clock[0] = NOW + 30  # same count: still unknown
    s = scrape(coll)
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-router") is None

    state.syncs.append(16.2)  # a slow resync (the first incident)
    fake.answers["/metrics"] = Answer(kube_router_page(state).encode())
    clock[0] = NOW + 60
    s = scrape(coll)
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-router") == NOW + 60
    sync = carried(s, "kubenode_proxy_sync_duration_seconds", "kube-router")
    # 16.2 s is past kube-router's last bound (10 s): only +Inf holds it
    assert sync[("kubenode_proxy_sync_duration_seconds_bucket", "10.0")] == sum(1 for d in state.syncs if d <= 10)
    assert sync[("kubenode_proxy_sync_duration_seconds_bucket", "+Inf")] == 41

    clock[0] = NOW + 400  # no growth: remembered, not moved
    s = scrape(coll)
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-router") == NOW + 60

    # unreachable for a while: the memory survives
    fake.answers["/metrics"] = Answer(b"oops", status=503)
    clock[0] = NOW + 430
    s = scrape(coll)
    assert value(s, "kubenode_proxy_up", proxy="kube-router") == 0.0

    # kube-router restarted and has synced twice: a lower, non-zero count is growth
    restarted = kube_router_state(syncs=2, services=30)
    fake.answers["/metrics"] = Answer(kube_router_page(restarted).encode())
    clock[0] = NOW + 460
    s = scrape(coll)
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-router") == NOW + 460

    # restarted again and not synced yet (count 0): not growth
    fake.answers["/metrics"] = Answer(kube_router_page(kube_router_state(syncs=0, services=30)).encode())
    clock[0] = NOW + 490
    s = scrape(coll)
    assert value(s, "kubenode_proxy_last_sync_timestamp_seconds", proxy="kube-router") == NOW + 460


def test_kube_router_without_a_metrics_url_says_how_to_fix_it(caplog):
    s = scrape(collector("--proxy", "kube-router"))
    assert value(s, "kubenode_collector_success", collector="proxy") == 0.0
    assert "--metrics-port" in caplog.text and "proxy.metrics-url" in caplog.text


def test_old_kube_router_gauge_is_reported_not_misread(fake, caplog):
    state = kube_router_state()
    fake.answers["/metrics"] = Answer(kube_router_page(state, sync_family_type="gauge").encode())
    s = scrape(collector("--proxy", "kube-router", "--proxy.metrics-url", fake.url()))
    assert value(s, "kubenode_collector_success", collector="proxy") == 0.0
    assert value(s, "kubenode_proxy_up", proxy="kube-router") == 0.0
    assert "is a gauge on this page, expected a histogram" in caplog.text


# -- a page that is not the proxy's (issue 12, item 4) ---------------------------


@pytest.mark.parametrize("proxy, page, metric, hint", [
    ("kube-proxy", node_exporter_page, "kubeproxy_sync_proxy_rules_duration_seconds",
     "none of kube-proxy's sync metrics"),
    ("kube-proxy", old_kube_proxy_page, "kubeproxy_sync_proxy_rules_duration_seconds",
     "none of kube-proxy's sync metrics"),
    ("kube-router", node_exporter_page, "kube_router_controller_ipvs_services_sync_time",
     "none of kube-router's service proxy metrics"),
], ids=["node_exporter-as-kube-proxy", "kube-proxy-1.13", "node_exporter-as-kube-router"])
def test_a_page_without_the_sync_histogram_is_not_up(fake, caplog, proxy, page, metric, hint):
    """A 200 page of well-formed metrics that are not the proxy's: down, saying which metric, once."""
    caplog.set_level(logging.INFO)
    fake.answers["/metrics"] = Answer(page().encode())
    runner = Runner([collector("--proxy", proxy, "--proxy.metrics-url", fake.url())])
    for _ in range(3):
        s = samples(runner)
        assert value(s, "kubenode_proxy_up", proxy=proxy) == 0.0
        assert value(s, "kubenode_proxy_expected_metric_missing", proxy=proxy, metric=metric) == 1.0
        # the page was read whole; what is at the address is a fact for the alert, not a failed read
        assert value(s, "kubenode_collector_success", collector="proxy") == 1.0
    said = [r for r in caplog.records if r.name == "exporter.collectors.proxy"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]
    line = said[0].getMessage()
    assert metric in line and fake.url() in line and hint in line and "\n" not in line

    # the proxy's own page is back: up, no missing series, and that is said once too
    good = kube_proxy_page(kube_proxy_state(now=NOW)) if proxy == "kube-proxy" else kube_router_page(kube_router_state())
    fake.answers["/metrics"] = Answer(good.encode())
    for _ in range(2):
        s = samples(runner)
        assert value(s, "kubenode_proxy_up", proxy=proxy) == 1.0
        assert not [k for k in s if k[0] == "kubenode_proxy_expected_metric_missing"]
    said = [r for r in caplog.records if r.name == "exporter.collectors.proxy"]
    assert len(said) == 2 and said[1].levelno == logging.INFO and metric in said[1].getMessage()


# -- failures -----------------------------------------------------------------


def test_closed_port_is_proxy_down_not_a_collector_failure(caplog):
    caplog.set_level(logging.INFO)
    s = scrape(collector("--proxy.metrics-url", f"http://127.0.0.1:{closed_port()}/metrics"))
    assert value(s, "kubenode_proxy_up", proxy="kube-proxy") == 0.0
    assert value(s, "kubenode_collector_success", collector="proxy") == 1.0
    assert "failed" not in caplog.text


def expect_unusable(fake, answer: Answer, reason: str, caplog, *extra: str, proxy: str = "kube-proxy") -> dict:
    fake.answers["/metrics"] = answer
    args = ["--proxy.metrics-url", fake.url(), *extra]
    if proxy != "kube-proxy":
        args += ["--proxy", proxy]
    start = time.monotonic()
    s = scrape(collector(*args))
    elapsed = time.monotonic() - start
    assert value(s, "kubenode_proxy_up", proxy=proxy) == 0.0
    assert value(s, "kubenode_collector_success", collector="proxy") == 0.0
    lines = [r.getMessage() for r in caplog.records if r.name == "exporter.collector"]
    assert lines and reason in lines[-1], lines
    assert "\n" not in lines[-1] and "Traceback" not in caplog.text
    return {"elapsed": elapsed, "samples": s}


def test_http_500(fake, caplog):
    expect_unusable(fake, Answer(b"internal error\n", status=500), "HTTP 500", caplog)


def test_garbage_html(fake, caplog):
    page = b"<html><body><h1>Welcome to nginx!</h1></body></html>\n"
    expect_unusable(fake, Answer(page, content_type="text/html"), "not in the Prometheus text format", caplog)


def test_garbage_binary(fake, caplog):
    expect_unusable(fake, Answer(bytes(range(256)) * 40), "not UTF-8", caplog)


def test_protobuf_answer(fake, caplog):
    answer = Answer(b"\x0a\x05hello", content_type="application/vnd.google.protobuf; "
                    "proto=io.prometheus.client.MetricFamily; encoding=delimited")
    expect_unusable(fake, answer, "not the text format", caplog)


def test_bucket_with_a_non_number_is_garbage(fake, caplog):
    text = kube_proxy_page(kube_proxy_state(now=NOW))
    broken = text.replace('le="0.004"} ', 'le="0.004"} many', 1)
    assert broken != text
    expect_unusable(fake, Answer(broken.encode()), "not a number", caplog)


def test_truncated_histogram(fake, caplog):
    text = kube_proxy_page(kube_proxy_state(now=NOW))
    # the page ends in the middle of the sync histogram: no +Inf bucket, no _sum, no _count
    cut = text.index('kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="1.024"}')
    expect_unusable(fake, Answer(text[:cut].encode()), "no +Inf bucket", caplog)
    # buckets complete but _count lost
    lines = [line for line in text.splitlines()
             if not line.startswith("kubeproxy_sync_proxy_rules_duration_seconds_count")]
    expect_unusable(fake, Answer(("\n".join(lines) + "\n").encode()), "no _sum or _count", caplog)


@pytest.mark.parametrize("chunked", [True, False])
def test_connection_closed_mid_page(fake, caplog, chunked):
    body = kube_proxy_page(kube_proxy_state(now=NOW)).encode()
    expect_unusable(fake, Answer(body, chunked=chunked, cut_after_bytes=len(body) // 2), "closed mid-page", caplog)


def test_stall_before_answering_times_out(fake, caplog):
    out = expect_unusable(fake, Answer(b"x", stall_before_headers=30), "no complete answer within 0.5 s", caplog,
                          "--proxy.timeout", "0.5")
    assert out["elapsed"] < 2.0


def test_stall_mid_page_times_out(fake, caplog):
    body = kube_proxy_page(kube_proxy_state(now=NOW)).encode()
    out = expect_unusable(fake, Answer(body, stall_after_bytes=32 * 1024), "no complete answer", caplog,
                          "--proxy.timeout", "0.5")
    assert out["elapsed"] < 2.0


def test_slow_drip_is_bounded_by_one_deadline(fake, caplog):
    """A byte every 0.1 s never trips a per-read timeout; the whole read still ends on time."""
    body = kube_proxy_page(kube_proxy_state(now=NOW)).encode()
    out = expect_unusable(fake, Answer(body, drip_seconds=0.1), "no complete answer", caplog,
                          "--proxy.timeout", "1")
    assert out["elapsed"] < 2.5


def test_ten_megabyte_page_over_the_cap(fake, caplog):
    text = kube_router_page(kube_router_state(services=7000))
    assert len(text) > 10_000_000
    expect_unusable(fake, Answer(text.encode()), "over the 8388608-byte cap", caplog, proxy="kube-router")
    # announced with a Content-Length: refused before reading the body
    expect_unusable(fake, Answer(text.encode(), chunked=False), "is 10", caplog, proxy="kube-router")


def test_ten_megabyte_page_read_when_the_cap_allows(fake):
    state = kube_router_state(services=7000)
    fake.answers["/metrics"] = Answer(kube_router_page(state).encode())
    s = scrape(collector("--proxy", "kube-router", "--proxy.metrics-url", fake.url(),
                         "--proxy.max-bytes", str(16 * 1024 * 1024), "--proxy.timeout", "10"))
    assert value(s, "kubenode_collector_success", collector="proxy") == 1.0
    assert value(s, "kubenode_proxy_ipvs_services", proxy="kube-router") == 14000.0


class Steady(Collector):
    name = "steady"

    def __init__(self) -> None:
        pass

    def collect(self):
        yield GaugeMetricFamily("kubenode_test_steady", "a collector that always works", value=1)


def test_other_collectors_keep_serving_while_proxy_fails(fake):
    """Through the exporter's real HTTP server: one broken proxy page fails only its own collector."""
    fake.answers["/metrics"] = Answer(b"internal error\n", status=500)
    runner, ctx = make_runner(["--proxy.metrics-url", fake.url()])
    runner = Runner([*runner.collectors, Steady()])
    server = MetricsServer(make_app(runner), "127.0.0.1:0")
    server.start()
    try:
        status, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    assert status == 200
    s = samples(body.decode())
    assert value(s, "kubenode_collector_success", collector="proxy") == 0.0
    assert value(s, "kubenode_proxy_up", proxy="kube-proxy") == 0.0
    assert value(s, "kubenode_collector_success", collector="steady") == 1.0
    assert value(s, "kubenode_test_steady") == 1.0


def test_bad_url_is_refused_at_start():
    # A URL the reader cannot fetch stops the exporter at start (exit 2, tests/test_config.py),
    # rather than a collector that can never succeed.
    from exporter.config import ConfigError

    with pytest.raises(ConfigError, match="proxy.metrics-url.*must start with http://"):
        make_runner(["--proxy.metrics-url", "https://127.0.0.1:10249/metrics"])


def test_go_float_matches_go():
    # strconv.FormatFloat(v, 'g', -1, 64) as seen on real pages
    assert [go_float(v) for v in (1763401234.5, 0.001, 16.384, 1234567, 123456, 1e-05, 0.25, 0)] == \
        ["1.7634012345e+09", "0.001", "16.384", "1.234567e+06", "123456", "1e-05", "0.25", "0"]


def test_compressed_answer_is_refused(fake, caplog):
    """A server that ignores our Accept-Encoding: identity."""
    import gzip

    body = gzip.compress(kube_proxy_page(kube_proxy_state(now=NOW)).encode())
    expect_unusable(fake, Answer(body, headers={"Content-Encoding": "gzip"}), "Content-Encoding gzip", caplog)
    # the same bytes without saying so are still not text
    expect_unusable(fake, Answer(body), "not UTF-8", caplog)


# -- one deadline for the whole exchange (issue 12, item 11) --------------------------


def test_dripped_headers_are_bounded_by_one_deadline(fake, caplog):
    """Status line and headers a byte at a time: every receive is quick, the exchange is not.

    Through the exporter's own HTTP server with scrapes in parallel: none waits past
    the proxy's deadline plus slack, each says why the proxy is down.
    """
    import concurrent.futures

    answer = Answer(kube_proxy_page(kube_proxy_state(now=NOW)).encode(), drip_head_seconds=0.05)
    assert len(FakeProxy._head(answer)) * 0.05 > 4  # the drip alone outlasts the deadline fourfold
    fake.answers["/metrics"] = answer
    runner, _ = make_runner(["--proxy.metrics-url", fake.url(), "--proxy.timeout", "1"])
    server = MetricsServer(make_app(runner), "127.0.0.1:0")
    server.start()

    def timed_scrape() -> tuple[float, dict]:
        start = time.monotonic()
        status, _, body = get(f"http://127.0.0.1:{server.port}/metrics", timeout=30)
        assert status == 200
        return time.monotonic() - start, samples(body.decode())

    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: timed_scrape(), range(3)))
    finally:
        server.stop()
    for elapsed, s in results:
        assert elapsed < 2.5, f"a scrape took {elapsed:.1f} s with proxy.timeout 1 s"
        assert value(s, "kubenode_proxy_up", proxy="kube-proxy") == 0.0
        assert value(s, "kubenode_collector_success", collector="proxy") == 0.0
    assert "no complete answer within 1 s (proxy.timeout): timed out reading the status line and headers" \
        in caplog.text


def test_dripped_end_of_chunked_body_is_down_not_up(fake, caplog):
    """The whole page arrives at once, then the chunk line that ends it crawls for 3 s.

    A per-read timeout set before each read lets that one read run past the
    deadline and the page count as up; one deadline ends it at 1 s.
    """
    body = kube_proxy_page(kube_proxy_state(now=NOW)).encode()
    answer = Answer(body, drip_end_chunk_seconds=0.03, end_chunk_padding=100)
    out = expect_unusable(fake, answer, "timed out reading the body", caplog, "--proxy.timeout", "1")
    assert out["elapsed"] < 2.5
    assert "no complete answer within 1 s (proxy.timeout)" in caplog.text
