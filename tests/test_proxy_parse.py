"""The proxy page parser and the shaping functions, on text (no network)."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from exporter.collectors.proxy import (
    KUBE_PROXY_FAMILIES,
    KUBE_ROUTER_FAMILIES,
    SyncCountWatch,
    read_kube_proxy,
    read_kube_router,
    shape,
)
from exporter.readers.proxymetrics import (
    Histogram,
    PageUnusable,
    fetch_page,
    histograms,
    merge_histograms,
    parse_families,
)
from tests.proxy_pages import kube_proxy_page, kube_proxy_state, kube_router_page, kube_router_state
from tests.proxy_server import Answer, FakeProxy

WANT = {"demo_seconds": "histogram", "demo_gauge": "gauge"}

DEMO = """\
# HELP demo_seconds a demo histogram
# TYPE demo_seconds histogram
demo_seconds_bucket{a="x",le="0.5"} 1
demo_seconds_bucket{a="x",le="1"} 3
demo_seconds_bucket{a="x",le="+Inf"} 4
demo_seconds_sum{a="x"} 5.5
demo_seconds_count{a="x"} 4
demo_seconds_bucket{a="y",le="0.5"} 0
demo_seconds_bucket{a="y",le="1"} 2
demo_seconds_bucket{a="y",le="+Inf"} 2
demo_seconds_sum{a="y"} 1.5
demo_seconds_count{a="y"} 2
"""


def test_histograms_merge_over_labels():
    fams = parse_families(DEMO, WANT)
    per = histograms(fams["demo_seconds"])
    assert set(per) == {(("a", "x"),), (("a", "y"),)}
    merged = merge_histograms("demo_seconds", per.values())
    assert merged == Histogram(((0.5, 1), (1.0, 5), (float("inf"), 6)), 7.0)
    assert merged.count == 6


def test_unknown_lines_are_tolerated_when_well_formed():
    text = (
        "# a free comment\n\n"
        '# HELP other_thing help with "quotes" and \\\\ backslash\n'
        "# TYPE other_thing untyped\n"
        'other_thing{path="/a b}{c",x="y\\"z"} 1 1700000000000\n'
        "other_thing_without_labels +Inf\n"
        "# EOF-like comment\n" + DEMO +
        "# TYPE demo_gauge gauge\n"
        'demo_gauge{v="a\\nb\\\\c\\"d",} 2.5e+00 1700000000000\n'
    )
    fams = parse_families(text, WANT)
    assert "other_thing" not in fams
    assert fams["demo_gauge"].samples[0].labels == (("v", 'a\nb\\c"d'),)
    assert fams["demo_gauge"].samples[0].value == 2.5


@pytest.mark.parametrize("mutation, reason", [
    (lambda t: t.replace('le="1"} 3', 'le="1"} three'), "not a number"),
    (lambda t: t.replace('le="1"} 3', 'le="1"} 3_0'), "not a number"),
    (lambda t: t.replace('{a="x",le="0.5"}', '{a="x",le="half"}'), "bad or missing le"),
    (lambda t: t.replace('{a="x",le="0.5"}', '{a="x" le="0.5"}'), "bad label set"),
    (lambda t: t.replace('demo_seconds_count{a="x"} 4', 'demo_seconds_count{a="x"} 5'), "differs from the +Inf"),
    (lambda t: t.replace('le="1"} 3', 'le="1"} 0'), "fewer than the one below"),
    (lambda t: t.replace('{a="x",le="+Inf"} 4\n', ''), "no +Inf bucket"),
    (lambda t: t.replace('demo_seconds_sum{a="y"} 1.5\n', ''), "no _sum or _count"),
    (lambda t: t.replace("# TYPE demo_seconds histogram\n", ""), "no TYPE line"),
    (lambda t: t.replace("# TYPE demo_seconds histogram", "# TYPE demo_seconds summary"), "is a summary"),
    (lambda t: t.replace('le="0.5"} 1', 'le="0.5"} -1'), "a bucket or count of -1"),
    (lambda t: t.replace('le="0.5"} 1', 'le="0.5"} NaN'), "a bucket or count of nan"),
    (lambda t: t + "<html>\n", "not in the Prometheus text format"),
    (lambda t: t + 'demo_seconds_bucket{a="x",le="1"} 3\n', "le=1 twice"),
])
def test_carried_families_are_strict(mutation, reason):
    text = mutation(DEMO)
    assert text != DEMO
    with pytest.raises(PageUnusable, match=None) as err:
        fams = parse_families(text, WANT)
        histograms(fams["demo_seconds"])
    assert reason in str(err.value)
    assert "\n" not in str(err.value)


def test_different_buckets_across_labels_are_refused():
    text = DEMO.replace('{a="y",le="0.5"}', '{a="y",le="0.25"}')
    with pytest.raises(PageUnusable, match="different buckets"):
        merge_histograms("demo_seconds", histograms(parse_families(text, WANT)["demo_seconds"]).values())


def test_pending_age_ignores_a_proxy_clock_ahead_of_ours():
    state = kube_proxy_state(now=1000.0)
    state.last_sync, state.last_queued = {"IPv4": 990.0}, {"IPv4": 1005.0}
    reading = read_kube_proxy(parse_families(kube_proxy_page(state), KUBE_PROXY_FAMILIES), now=1000.0)
    assert reading.pending_seconds == 0.0


def test_sync_count_watch():
    w = SyncCountWatch()
    assert w.observe(5, 10.0) is None  # first sight: unknown
    assert w.observe(5, 20.0) is None
    assert w.observe(6, 30.0) == 30.0
    assert w.observe(6, 40.0) == 30.0
    assert w.observe(0, 50.0) == 30.0  # restart, no sync yet
    assert w.observe(1, 60.0) == 60.0
    assert w.observe(1, 70.0) == 60.0
    assert w.observe(0, 75.0) == 60.0
    assert w.observe(0, 80.0) == 60.0


def _mutants(text: str, rng: random.Random, n: int):
    lines = text.splitlines(keepends=True)
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:  # cut anywhere
            yield text[:rng.randrange(len(text))]
        elif kind == 1:  # flip a character
            i = rng.randrange(len(text))
            yield text[:i] + rng.choice('x{}"=, \n\\0.9e+-#') + text[i + 1:]
        elif kind == 2:  # drop a line
            i = rng.randrange(len(lines))
            yield "".join(lines[:i] + lines[i + 1:])
        elif kind == 3:  # duplicate a line
            i = rng.randrange(len(lines))
            yield "".join(lines[:i] + [lines[i]] + lines[i:])
        elif kind == 4:  # swap two lines
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            copy = list(lines)
            copy[i], copy[j] = copy[j], copy[i]
            yield "".join(copy)
        else:  # random bytes decoded loosely
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))).decode("latin-1")


@pytest.mark.parametrize("proxy", ["kube-proxy", "kube-router"])
def test_no_input_crashes_the_shaping(proxy):
    """Any mangled page either shapes or raises PageUnusable; nothing else escapes."""
    rng = random.Random(7)
    if proxy == "kube-proxy":
        text = kube_proxy_page(kube_proxy_state(dual_stack=True), features=20)
        # keep the mutations on the part we carry, where strictness matters
        text = text[text.index("# HELP kubeproxy_"):]
    else:
        text = kube_router_page(kube_router_state(services=3))
    outcomes = {"shaped": 0, "unusable": 0}
    for mutant in _mutants(text, rng, 1500):
        try:
            if proxy == "kube-proxy":
                reading = read_kube_proxy(parse_families(mutant, KUBE_PROXY_FAMILIES), 1e9)
            else:
                reading = read_kube_router(parse_families(mutant, KUBE_ROUTER_FAMILIES), 1e9, SyncCountWatch())
            shape(proxy, True, reading)
            outcomes["shaped"] += 1
        except PageUnusable as err:
            assert "\n" not in str(err)
            outcomes["unusable"] += 1
    assert outcomes["shaped"] > 50 and outcomes["unusable"] > 50, outcomes


def test_reading_stops_at_the_cap():
    """A 10 MB page with a 1 MiB cap never holds much more than the cap in memory."""
    body = kube_router_page(kube_router_state(services=7000)).encode()
    assert len(body) > 10_000_000
    fake = FakeProxy().start()
    try:
        fake.answers["/metrics"] = Answer(body)
        tracemalloc.start()
        try:
            with pytest.raises(PageUnusable, match="over the 1048576-byte cap"):
                fetch_page(fake.url(), 10.0, 1024 * 1024)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        fake.stop()
    assert peak < 3 * 1024 * 1024, f"peak {peak} bytes while reading"


@pytest.mark.parametrize("url", ["https://127.0.0.1:10249/metrics", "http:///metrics", "http://127.0.0.1:x/m",
                                 "http://127.0.0.1:10249/métrics", "http://127.0.0.1:10249/a b", "127.0.0.1:10249"])
def test_bad_urls_are_refused_with_a_reason(url):
    from exporter.readers.proxymetrics import check_url

    with pytest.raises(ValueError, match="metrics URL"):
        check_url(url)


@pytest.mark.parametrize("proxy, page, cause", [
    ("kube-proxy", "", "another program at that address"),
    ("kube-proxy", "# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge\n"
                   'kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"} 1e9\n',
     "it has not synced since it started"),
    ("kube-router", "", "without --run-service-proxy"),
    ("kube-router", "# TYPE kube_router_controller_ipvs_services gauge\nkube_router_controller_ipvs_services 4\n",
     "a build that does not publish it"),
])
def test_missing_sync_histogram_is_named_with_its_likely_cause(proxy, page, cause):
    from exporter.collectors.proxy import SYNC_FAMILY, missing_sync_reason

    families = parse_families(page, KUBE_PROXY_FAMILIES if proxy == "kube-proxy" else KUBE_ROUTER_FAMILIES)
    assert cause in missing_sync_reason(proxy, families)
    out = {f.name: f for f in shape(proxy, False, None, SYNC_FAMILY[proxy])}
    assert out["kubenode_proxy_up"].samples[0].value == 0.0
    (sample,) = out["kubenode_proxy_expected_metric_missing"].samples
    assert sample.labels == {"proxy": proxy, "metric": SYNC_FAMILY[proxy]} and sample.value == 1.0


def test_a_name_lookup_that_hangs_ends_at_the_deadline(monkeypatch):
    """getaddrinfo has no timeout: a resolver that never answers must not hold the fetch
    past proxy.timeout (the lookup is the only step a socket timeout does not cover)."""
    import time

    from tests.helpers import hang_lookups_of

    released = hang_lookups_of(monkeypatch, "kube-proxy.invalid")
    fake = FakeProxy().start()
    try:
        start = time.monotonic()
        with pytest.raises(PageUnusable, match=r"within 0.5 s .*looking up kube-proxy.invalid"):
            fetch_page(fake.url().replace("127.0.0.1", "kube-proxy.invalid"), 0.5, 1024)
        assert time.monotonic() - start < 5
        released.set()  # the name now resolves (to the fake): the same fetch gets its page
        fake.answers["/metrics"] = Answer(b"# nothing\n")
        assert fetch_page(fake.url().replace("127.0.0.1", "kube-proxy.invalid"), 5.0, 1024) == b"# nothing\n"
    finally:
        released.set()
        fake.stop()
