"""The reflector against the API stand-in: list, watch, resume, bookmarks, 410, backoff, bad input."""

from __future__ import annotations

import json
import logging
import time

import pytest

from exporter.kube.client import (ApiClient, Backoff, KubeConfigError, Reflector, endpointslices_resource,
                                  load_config, node_resource, services_resource)
from tests.apiserver import endpoint_slice, node, service
from tests.kube_helpers import Recorder, api, apiserver, wait_for  # noqa: F401 - fixtures

def reflector(api, resource, handler, **kw) -> Reflector:
    kw.setdefault("backoff", Backoff(base=0.05, cap=0.4))
    return Reflector(api, resource, handler, **kw)


@pytest.fixture
def running():
    started: list[Reflector] = []

    def start(r: Reflector) -> Reflector:
        started.append(r)
        r.start()
        return r
    try:
        yield start
    finally:
        for r in started:
            r.stop()


def test_list_in_pages_then_watch_applies_events(apiserver, api, running):
    for i in range(5):
        apiserver.create("services", service("default", f"s{i}", f"10.96.0.{i + 1}"))
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, page_size=2))
    assert r.wait_synced(10)
    assert rec.keys("services") == {f"default/s{i}" for i in range(5)}
    lists = apiserver.lists("services")
    assert [q.params.get("limit") for q in lists] == ["2", "2", "2"]
    assert "continue" not in lists[0].params and all("continue" in q.params for q in lists[1:])
    listed_rv = r.resource_version
    assert listed_rv == "105"

    wait_for(lambda: apiserver.watches("services"), what="a watch")
    watch = apiserver.watches("services")[0]
    assert watch.params["resourceVersion"] == listed_rv
    assert watch.params["allowWatchBookmarks"] == "true"
    assert watch.params["timeoutSeconds"] == "300"

    apiserver.create("services", service("kube-system", "dns", "10.96.0.10", ports=(("dns", "UDP", 53),)))
    apiserver.update("services", service("default", "s1", "10.96.0.99"))
    apiserver.delete("services", "default", "s0")
    wait_for(lambda: "default/s0" not in rec.keys("services"), what="the delete")
    assert "kube-system/dns" in rec.keys("services")
    assert rec.items["services"]["default/s1"].cluster_ips == ("10.96.0.99",)
    assert rec.items["services"]["kube-system/dns"].ports[0].protocol == "UDP"
    assert r.resource_version == str(apiserver.rv)
    assert len(apiserver.lists("services")) == 3  # no relist


def test_dropped_stream_resumes_from_last_resource_version_without_relist(apiserver, api, running):
    apiserver.create("services", service("default", "a", "10.96.0.1"))
    apiserver.drop_watch_after("services", events=2)
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec))
    assert r.wait_synced(10)
    wait_for(lambda: apiserver.open_watches, what="an open watch")
    for name in ("b", "c", "d", "e"):
        apiserver.create("services", service("default", name, "10.96.0.2"))
    wait_for(lambda: len(rec.keys("services")) == 5, what="all services")
    watches = apiserver.watches("services")
    assert len(watches) >= 2
    # The first stream delivered b and c, then broke; the second resumed after c.
    assert "default/c" in rec.items["services"]
    rv_of_c = apiserver.objects["services"][("default", "c")]["metadata"]["resourceVersion"]
    assert watches[1].params["resourceVersion"] == rv_of_c
    assert len(apiserver.lists("services")) == 1


def test_bookmark_advances_resource_version(apiserver, api, running):
    apiserver.create("services", service("default", "a", "10.96.0.1"))
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec))
    assert r.wait_synced(10)
    wait_for(lambda: apiserver.open_watches, what="an open watch")
    # Other resources move the global resourceVersion; services see only a bookmark.
    for i in range(3):
        apiserver.create("endpointslices", endpoint_slice("default", f"x{i}", "x", ["10.0.0.1"]))
    bookmark_rv = apiserver.bookmark("services")
    wait_for(lambda: r.resource_version == str(bookmark_rv), what="the bookmark's resourceVersion")
    assert [c[0] for c in rec.calls] == ["replace"]  # a bookmark is not an object
    # The next watch resumes from the bookmark: history before it is compacted away, so
    # resuming from the list's older resourceVersion would get 410 and a relist.
    apiserver.compact(bookmark_rv)
    apiserver.end_watches()
    wait_for(lambda: len(apiserver.watches("services")) >= 2, what="a new watch")
    apiserver.create("services", service("default", "b", "10.96.0.2"))
    wait_for(lambda: "default/b" in rec.keys("services"), what="service b")
    assert any(w.params["resourceVersion"] == str(bookmark_rv) for w in apiserver.watches("services")[1:])
    assert len(apiserver.lists("services")) == 1


def test_periodic_bookmarks_sent_by_the_server(apiserver, api, running):
    apiserver.bookmark_interval = 0.2
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec))
    assert r.wait_synced(10)
    apiserver.create("endpointslices", endpoint_slice("default", "x", "x", ["10.0.0.1"]))
    wait_for(lambda: r.resource_version == str(apiserver.rv), what="a periodic bookmark")


@pytest.mark.parametrize("gone_as_status", [False, True], ids=["error-event", "http-410"])
def test_gone_relists_and_forgets_what_was_deleted_in_the_gap(apiserver, api, running, gone_as_status):
    apiserver.gone_as_status = gone_as_status
    for name in ("keep", "doomed", "changed"):
        apiserver.create("services", service("default", name, "10.96.0.1"))
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, watch_timeout=1))
    assert r.wait_synced(10)
    # Make the watch fail from its next reconnect on, so the reflector misses what follows.
    apiserver.fail(10_000, resource="services", kind="watch")
    wait_for(lambda: any(w.status == 500 for w in apiserver.watches("services")), what="a failed reconnect")
    apiserver.delete("services", "default", "doomed")
    apiserver.update("services", service("default", "changed", "10.96.0.77"))
    apiserver.create("services", service("default", "born", "10.96.0.5"))
    apiserver.compact()
    apiserver.failures.clear()
    wait_for(lambda: len(apiserver.lists("services")) == 2, what="a relist")
    wait_for(lambda: rec.keys("services") == {"default/keep", "default/changed", "default/born"},
             what="converged state")
    assert rec.items["services"]["default/changed"].cluster_ips == ("10.96.0.77",)
    assert any(w.status == 410 for w in apiserver.watches("services"))
    assert wait_for(lambda: r.status().synced and r.status().up)


def test_continue_token_expired_by_compaction_restarts_the_list(apiserver, api, running):
    for i in range(6):
        apiserver.create("services", service("default", f"s{i}", "10.96.0.1"))
    apiserver.delay = 0.2
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, page_size=2))
    wait_for(lambda: len(apiserver.lists("services")) >= 2, what="the second page")
    apiserver.delete("services", "default", "s5")
    apiserver.compact()
    apiserver.delay = 0
    assert r.wait_synced(10)
    assert rec.keys("services") == {f"default/s{i}" for i in range(5)}
    assert any(q.params.get("continue") and q.status == 410 for q in apiserver.lists("services"))


def test_backs_off_exponentially_on_500s_then_syncs(apiserver, api, running):
    apiserver.create("services", service("default", "a", "10.96.0.1"))
    apiserver.fail(5, resource="services", kind="list")
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, backoff=Backoff(base=0.05, cap=10)))
    assert not r.status().up
    assert r.wait_synced(15)
    started = [i for i, q in enumerate(apiserver.requests) if q.kind == "list"]
    assert len(started) == 6
    assert [apiserver.requests[i].status for i in started] == [500] * 5 + [200]
    assert "HTTP 500" in (r.status().last_error or "")
    assert r.status().up
    assert r.backoff.failures == 5
    # A watch that delivers an event proves the connection: the backoff starts over.
    apiserver.create("services", service("default", "b", "10.96.0.2"))
    wait_for(lambda: "default/b" in rec.keys("services"))
    assert r.backoff.failures == 0


def test_backoff_delays_grow_and_are_capped():
    b = Backoff(base=0.1, cap=1.0)
    delays = [b.next_delay() for _ in range(8)]
    for n, d in enumerate(delays):
        full = min(1.0, 0.1 * 2 ** n)
        assert full * 0.5 <= d < full
    b.reset()
    assert b.next_delay() < 0.1


def test_backoff_timing_between_failed_lists(apiserver, api, running):
    apiserver.fail(4, resource="services", kind="list")
    times: list[float] = []
    rec = Recorder()
    orig = api.list_page

    def timed(*a, **kw):
        times.append(time.monotonic())
        return orig(*a, **kw)
    api.list_page = timed
    r = running(reflector(api, services_resource(), rec, backoff=Backoff(base=0.1, cap=10)))
    assert r.wait_synced(15)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Delays are base*2^n*[0.5, 1): 0.05-0.1, 0.1-0.2, 0.2-0.4, 0.4-0.8
    assert gaps[3] >= 0.4, gaps  # a lower bound: load can only lengthen gaps
    assert gaps[3] > gaps[0]


def test_malformed_objects_are_skipped_and_logged(apiserver, api, running, caplog):
    caplog.set_level(logging.WARNING, logger="exporter.kube.client")
    apiserver.create("services", service("default", "good", "10.96.0.1"))
    apiserver.create("services", service("default", "bad-ip", "10.96.0.300"))
    apiserver.create("services", service("default", "bad-proto", "10.96.0.2", ports=(("x", "QUIC", 80),)))
    apiserver.create("services", {"metadata": {"namespace": "default"}, "spec": {}})  # no name
    apiserver.create("endpointslices", endpoint_slice("default", "good", "good", ["10.0.0.1"]))
    apiserver.create("endpointslices", endpoint_slice("default", "bad", "good", ["not-an-ip"]))
    apiserver.create("endpointslices", {"metadata": {"namespace": "default", "name": "noport"},
                                        "addressType": "IPv4", "ports": [{"port": 99999}]})
    rec = Recorder()
    rs = running(reflector(api, services_resource(), rec))
    re_ = running(reflector(api, endpointslices_resource(), rec))
    assert rs.wait_synced(10) and re_.wait_synced(10)
    assert rec.keys("services") == {"default/good"}
    assert rec.keys("endpointslices") == {"default/good"}
    assert rs.status().malformed == 3 and re_.status().malformed == 2
    text = caplog.text
    assert "skipping a malformed object" in text
    assert "10.96.0.300" in text and "QUIC" in text and "not-an-ip" in text

    # In the watch: a good object turned bad is dropped (what we kept is no longer true);
    # a bad new one is skipped; good ones after them still land.
    apiserver.update("services", service("default", "good", "10.96.0.1", ports=(("x", "TCP", 0),)))
    apiserver.create("services", service("default", "bad2", "fe80::zz"))
    apiserver.create("services", service("default", "after", "10.96.0.3"))
    wait_for(lambda: "default/after" in rec.keys("services"), what="the good service after bad ones")
    assert rec.keys("services") == {"default/after"}
    assert rs.status().malformed == 5
    assert len(apiserver.lists("services")) == 1


def test_malformed_line_reconnects_from_last_resource_version(apiserver, api, running, caplog):
    caplog.set_level(logging.WARNING, logger="exporter.kube.client")
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec))
    assert r.wait_synced(10)
    wait_for(lambda: apiserver.open_watches, what="an open watch")
    apiserver.create("services", service("default", "a", "10.96.0.1"))
    wait_for(lambda: "default/a" in rec.keys("services"))
    rv_a = r.resource_version
    apiserver.inject_line("services", '{"type": "ADDED", "object": {"metadata": ')
    apiserver.create("services", service("default", "b", "10.96.0.2"))
    wait_for(lambda: "default/b" in rec.keys("services"), what="service b after the bad line")
    assert "not JSON" in caplog.text
    assert any(w.params["resourceVersion"] == rv_a for w in apiserver.watches("services")[1:])
    assert len(apiserver.lists("services")) == 1


def test_a_line_past_the_bound_breaks_the_stream_not_the_exporter(apiserver, api, running, monkeypatch):
    import exporter.kube.transport as transport

    monkeypatch.setattr(transport, "MAX_LINE", 4096)
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec))
    assert r.wait_synced(10)
    wait_for(lambda: apiserver.open_watches, what="an open watch")
    apiserver.inject_line("services", json.dumps({"type": "ADDED", "object": {"metadata": {"name": "x" * 10000}}}))
    wait_for(lambda: "longer than 4096 bytes" in (r.status().last_error or ""), what="the bound")
    apiserver.create("services", service("default", "b", "10.96.0.2"))
    wait_for(lambda: "default/b" in rec.keys("services"), what="service b on the next watch")
    assert len(apiserver.lists("services")) == 1  # resumed from its resourceVersion, no relist


def test_node_watch_uses_field_selector(apiserver, api, running):
    apiserver.create("nodes", node("other", zone="z2"))
    apiserver.create("nodes", node("me", zone="z1", addresses=("192.0.2.10",)))
    rec = Recorder()
    r = running(reflector(api, node_resource("me"), rec))
    assert r.wait_synced(10)
    assert rec.keys("nodes") == {"me"}
    assert rec.items["nodes"]["me"].zone == "z1"
    assert apiserver.lists("nodes")[0].params["fieldSelector"] == "metadata.name=me"
    apiserver.update("nodes", node("other", zone="z3"))
    apiserver.update("nodes", node("me", zone="z9"))
    wait_for(lambda: rec.items["nodes"]["me"].zone == "z9", what="the zone change")
    assert ("upsert", "nodes", "other") not in rec.calls
    assert apiserver.watches("nodes")[0].params["fieldSelector"] == "metadata.name=me"


def test_watch_up_follows_sync_and_connection(apiserver, api, running):
    rec = Recorder()
    apiserver.fail(10_000, resource="services", kind="list")
    r = running(reflector(api, services_resource(), rec, down_after=0.5,
                          backoff=Backoff(base=0.05, cap=0.2), watch_timeout=1))
    time.sleep(0.3)
    assert r.status().up is False and r.status().synced is False  # no synced state yet
    apiserver.failures.clear()
    assert r.wait_synced(10)
    wait_for(lambda: r.status().connected, what="connected")
    assert r.status().up is True
    # The watch cannot reconnect: up while reconnecting within down_after, then down.
    apiserver.fail(10_000, resource="services", kind="watch")
    wait_for(lambda: not r.status().connected, timeout=5, what="the stream to end")
    assert r.status().up is True
    wait_for(lambda: not r.status().up, timeout=5, what="watch_up 0 after down_after")
    assert r.status().synced  # the state is still the last synced one
    apiserver.failures.clear()
    wait_for(lambda: r.status().up, timeout=5, what="watch_up back to 1")
    # A 410 with a failing relist: no synced state, down at once.
    apiserver.fail(10_000, resource="services", kind="list")
    apiserver.create("services", service("default", "x", "10.96.0.1"))
    wait_for(lambda: r.resource_version == str(apiserver.rv))
    apiserver.fail(10_000, resource="services", kind="watch")
    wait_for(lambda: not r.status().connected, timeout=5, what="the stream to end")
    apiserver.create("services", service("default", "y", "10.96.0.1"))
    apiserver.compact()
    apiserver.failures = [f for f in apiserver.failures if f.kind == "list"]
    wait_for(lambda: not r.status().synced, timeout=5, what="the 410")
    assert r.status().up is False


def test_slow_responses_still_sync(apiserver, api, running):
    for i in range(3):
        apiserver.create("services", service("default", f"s{i}", "10.96.0.1"))
    apiserver.delay = 0.5
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, page_size=1))
    assert r.wait_synced(10)
    assert len(rec.keys("services")) == 3


def test_silent_watch_times_out_and_resumes_without_relist(apiserver, api, running):
    apiserver.hang_watches = True
    apiserver.create("services", service("default", "a", "10.96.0.1"))
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, watch_timeout=1, read_slack=0.5))
    assert r.wait_synced(10)
    listed_rv = r.resource_version
    wait_for(lambda: len(apiserver.watches("services")) >= 2, timeout=10, what="a reconnect after the read timeout")
    assert [w.params["resourceVersion"] for w in apiserver.watches("services")[:2]] == [listed_rv, listed_rv]
    assert "ReadTimeout" in (r.status().last_error or "")
    assert len(apiserver.lists("services")) == 1


def test_list_slower_than_its_timeout_is_retried(apiserver, api, running):
    apiserver.create("services", service("default", "a", "10.96.0.1"))
    apiserver.delay = 1.0
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, list_timeout=0.3))
    wait_for(lambda: len(apiserver.lists("services")) >= 2, what="a retried list")
    assert "ReadTimeout" in (r.status().last_error or "") and not r.status().synced
    apiserver.delay = 0
    assert r.wait_synced(10)
    assert rec.keys("services") == {"default/a"}


def test_stream_that_ends_at_once_backs_off(apiserver, api, running):
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec, backoff=Backoff(base=0.2, cap=0.2)))
    assert r.wait_synced(10)
    wait_for(lambda: apiserver.open_watches, what="an open watch")
    start = time.monotonic()
    for _ in range(3):
        count = len(apiserver.watches("services"))
        apiserver.end_watches()
        wait_for(lambda: len(apiserver.watches("services")) > count and apiserver.open_watches,
                 what="the next watch")
    # Three early, empty ends: each waits a backoff (>= 0.1 s) instead of reconnecting in a loop.
    assert time.monotonic() - start >= 0.3
    assert "ended early" in r.status().last_error


def test_stop_is_prompt_while_a_watch_blocks(apiserver, api):
    rec = Recorder()
    r = reflector(api, services_resource(), rec)
    r.start()
    assert r.wait_synced(10)
    wait_for(lambda: apiserver.open_watches, what="an open watch")
    start = time.monotonic()
    r.stop()
    assert time.monotonic() - start < 2
    assert not r._thread.is_alive()


def test_unauthorized_is_an_error_not_a_crash(apiserver, tmp_path, running):
    path = apiserver.write_kubeconfig(str(tmp_path / "bad-kubeconfig"), token="wrong")
    api = ApiClient.from_settings(path)
    rec = Recorder()
    r = running(reflector(api, services_resource(), rec))
    wait_for(lambda: r.status().last_error, what="an error")
    assert "HTTP 401" in r.status().last_error
    assert not r.status().up
    api.close()


def test_config_sources(tmp_path, apiserver, monkeypatch):
    with pytest.raises(KubeConfigError, match="not in a cluster"):
        load_config(None, environ={})
    with pytest.raises(KubeConfigError, match="KUBECONFIG"):
        load_config(None, environ={"KUBECONFIG": str(tmp_path / "missing")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [\n")
    with pytest.raises(KubeConfigError, match="--kubeconfig"):
        load_config(str(bad))
    good = apiserver.write_kubeconfig(str(tmp_path / "good.yaml"))
    config = load_config(None, environ={"KUBECONFIG": f"{tmp_path / 'missing'}:{good}"})
    assert config.server == apiserver.url
    # In-cluster: the service account directory and the service host variables.
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(apiserver.token)
    (sa / "namespace").write_text("kube-system")
    (sa / "ca.crt").write_text("")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = load_config(None, environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, service_account_dir=str(sa))
    assert config.server == "https://10.96.0.1:443" and config.namespace == "kube-system"


def test_tls_with_the_kubeconfig_ca_and_a_wrong_ca(tmp_path):
    from tests.apiserver import FakeApiServer

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    server = FakeApiServer(tls_dir=str(tmp_path / "a")).start()
    other = FakeApiServer(tls_dir=str(tmp_path / "b"))  # only for a CA that is not the server's
    other.httpd.server_close()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        server.create("services", service("default", "a", "10.96.0.1"))
        api = ApiClient.from_settings(server.write_kubeconfig(str(tmp_path / "kc")))
        r = reflector(api, services_resource(), Recorder())
        r.start()
        try:
            assert r.wait_synced(10)
            wait_for(lambda: server.open_watches, what="a watch over TLS")
            server.create("services", service("default", "b", "10.96.0.2"))
            wait_for(lambda: r.handler.keys("services") == {"default/a", "default/b"}, what="the event")
            start = time.monotonic()
        finally:
            r.stop()
        assert time.monotonic() - start < 2  # stop wakes a reader blocked on a TLS stream too
        api.close()

        wrong = ApiClient.from_settings(server.write_kubeconfig(str(tmp_path / "kc2"), ca_pem=other.ca_pem))
        r = reflector(wrong, services_resource(), Recorder())
        r.start()
        try:
            wait_for(lambda: r.status().last_error, what="a TLS error")
            assert "CERTIFICATE_VERIFY_FAILED" in r.status().last_error
            assert not r.status().up
        finally:
            r.stop()
            wrong.close()
    finally:
        server.stop()


def test_rate_limited_log_keeps_a_burst_then_summarises(caplog, monkeypatch):
    import exporter.kube.client as client

    logger = logging.getLogger("kubenode-test-ratelimit")
    caplog.set_level(logging.WARNING, logger=logger.name)
    now = [1000.0]
    monkeypatch.setattr(client.time, "monotonic", lambda: now[0])
    limited = client.RateLimitedLog(logger, burst=3, period=60)
    for i in range(10):
        limited.warning("bad object %d", i)
    assert [r.getMessage() for r in caplog.records] == ["bad object 0", "bad object 1", "bad object 2"]
    now[0] += 61
    limited.warning("bad object %d", 10)
    assert [r.getMessage() for r in caplog.records][3:] == ["7 more similar messages suppressed", "bad object 10"]


def test_a_server_name_whose_lookup_hangs_fails_at_the_connect_timeout(apiserver, tmp_path, monkeypatch):
    """getaddrinfo has no timeout: a dead DNS server must not hold a LIST or a WATCH past the
    connect timeout (the reflector's thread would sit there for the resolver's half minute,
    its status saying nothing); once the name resolves, the same transport gets its answer."""
    from exporter.kube.transport import ApiTransport, TransportError
    from tests.helpers import hang_lookups_of

    released = hang_lookups_of(monkeypatch, "kube-api.invalid")
    apiserver.create("services", service("default", "a", "10.96.0.1"))
    path = apiserver.write_kubeconfig(str(tmp_path / "kc"))
    with open(path) as fh:
        text = fh.read()
    assert "127.0.0.1" in text
    with open(path, "w") as fh:
        fh.write(text.replace("127.0.0.1", "kube-api.invalid"))
    transport = ApiTransport(load_config(path), connect_timeout=0.5)
    try:
        for ask in (lambda: transport.get("/api/v1/services", {}, 5.0),
                    lambda: transport.stream("/api/v1/services", {"watch": "1"}, 5.0)):
            start = time.monotonic()
            with pytest.raises(TransportError, match=r"ConnectTimeout: no answer looking up kube-api.invalid "
                                                     r"within 0.5 s"):
                ask()
            assert time.monotonic() - start < 5
        released.set()  # the name now resolves: the same transport is answered
        status, body = transport.get("/api/v1/services", {}, 5.0)
        assert status == 200 and json.loads(body)["items"][0]["metadata"]["name"] == "a"
    finally:
        released.set()
        transport.close()
