"""The cluster store: incremental recompute per Service, copy-on-write snapshots, events, memory."""

from __future__ import annotations

import gc
import logging
import os
import tracemalloc

import pytest

from exporter.dataplane import Interner, VirtualServerKey
from exporter.kube import objects
from exporter.kube.desired import NodeFacts, desired_table
from exporter.kube.client import ApiClient
from exporter.kube.store import ClusterState, KubeStore, watch_up_family
from tests.apiserver import endpoint_slice, node, service
from tests.kube_helpers import CountingModel, api, apiserver, wait_for  # noqa: F401


def svc(ns, name, ip, ports=(("http", "TCP", 80),), **spec):
    return objects.parse_service(service(ns, name, ip, ports=ports, **spec))


def eps(ns, name, service_name, addresses, rv="", trigger=None, ports=(("http", "TCP", 8080),)):
    raw = endpoint_slice(ns, name, service_name, addresses, ports=ports, trigger_time=trigger)
    raw["metadata"]["resourceVersion"] = rv
    return objects.parse_endpoint_slice(raw)


def state(model, **kw) -> ClusterState:
    return ClusterState("node-a", "kube-proxy", ("192.0.2.1",), model=model, **kw)


def built_state(model, services=50):
    st = state(model)
    st.replace("services", {f"ns/s{i}": svc("ns", f"s{i}", f"10.96.0.{i + 1}") for i in range(services)})
    st.replace("endpointslices", {f"ns/s{i}-x": eps("ns", f"s{i}-x", f"s{i}", [f"10.244.0.{i + 1}"], rv="1")
                                  for i in range(services)})
    st.replace("nodes", {"node-a": objects.Node("node-a", "zone-1")})
    return st


def test_table_is_built_once_when_every_resource_is_listed():
    model = CountingModel()
    st = state(model)
    st.replace("services", {"ns/a": svc("ns", "a", "10.96.0.1")})
    st.replace("endpointslices", {"ns/a-1": eps("ns", "a-1", "a", ["10.244.0.1"])})
    assert model.total() == 0 and not st.built() and not st.snapshot().synced
    st.replace("nodes", {"node-a": objects.Node("node-a", "zone-1")})
    assert st.built() and model.calls == {"ns/a": 1}
    snap = st.snapshot()
    vs = snap.table[VirtualServerKey("TCP", "10.96.0.1", 80)]
    assert set(vs.real_servers) == {("10.244.0.1", 8080)}
    assert snap.by_service["ns/a"] == (VirtualServerKey("TCP", "10.96.0.1", 80),)
    assert snap.real_servers == 1 and snap.synced
    assert st.node() == NodeFacts("node-a", "zone-1", ("192.0.2.1",))


def test_a_slice_change_recomputes_only_its_service():
    model = CountingModel()
    st = built_state(model)
    assert model.total() == 50
    events = []
    st.subscribe(events.append)
    st.upsert("endpointslices", "ns/s7-x", eps("ns", "s7-x", "s7", ["10.244.9.1", "10.244.9.2"], rv="2",
                                                 trigger="2026-11-22T04:00:00.123456789Z"))
    assert model.total() == 51 and model.calls["ns/s7"] == 2
    key = VirtualServerKey("TCP", "10.96.0.8", 80)
    assert set(st.snapshot().table[key].real_servers) == {("10.244.9.1", 8080), ("10.244.9.2", 8080)}
    assert st.snapshot().real_servers == 51
    [event] = events
    assert event.service == "ns/s7" and event.before == event.after == frozenset({key})
    assert event.trigger_time == pytest.approx(1795320000.123456789, abs=1e-6)

    # A second slice for the same Service: still one call, both slices' endpoints.
    st.upsert("endpointslices", "ns/s7-y", eps("ns", "s7-y", "s7", ["10.244.9.3"], rv="3"))
    assert model.calls["ns/s7"] == 3 and model.total() == 52
    assert len(st.snapshot().table[key].real_servers) == 3

    # A slice moved to another Service (label change) recomputes both, nothing else.
    st.upsert("endpointslices", "ns/s7-y", eps("ns", "s7-y", "s8", ["10.244.9.3"], rv="4"))
    assert model.calls["ns/s7"] == 4 and model.calls["ns/s8"] == 2 and model.total() == 54

    # Deleting a slice: the Service's endpoints shrink; event carries the slice's trigger time.
    st.delete("endpointslices", "ns/s7-x")
    assert model.calls["ns/s7"] == 5 and model.total() == 55
    assert st.snapshot().table[key].real_servers == {}
    assert events[-1].trigger_time == pytest.approx(1795320000.123456789, abs=1e-6)


def test_service_add_update_delete():
    model = CountingModel()
    st = built_state(model, services=3)
    events = []
    st.subscribe(events.append)
    st.upsert("services", "ns/s1", svc("ns", "s1", "10.96.1.1", ports=(("http", "TCP", 80), ("https", "TCP", 443))))
    old, new80, new443 = (VirtualServerKey("TCP", "10.96.0.2", 80), VirtualServerKey("TCP", "10.96.1.1", 80),
                          VirtualServerKey("TCP", "10.96.1.1", 443))
    table = st.snapshot().table
    assert old not in table and new80 in table and new443 in table
    assert events[-1].before == {old} and events[-1].after == {new80, new443}
    st.delete("services", "ns/s1")
    snap = st.snapshot()
    assert new80 not in snap.table and "ns/s1" not in snap.by_service
    assert len(snap.table) == 2 and model.total() == 3 + 1  # a deleted Service needs no model call
    # Slices of a deleted Service are kept: the Service may come back.
    st.upsert("services", "ns/s1", svc("ns", "s1", "10.96.1.1"))
    assert set(st.snapshot().table[new80].real_servers) == {("10.244.0.2", 8080)}


def test_relist_recomputes_only_what_changed_and_forgets_deletions():
    model = CountingModel()
    st = built_state(model, services=20)
    events = []
    st.subscribe(events.append)
    services = {f"ns/s{i}": svc("ns", f"s{i}", f"10.96.0.{i + 1}") for i in range(20)}
    slices = {f"ns/s{i}-x": eps("ns", f"s{i}-x", f"s{i}", [f"10.244.0.{i + 1}"], rv="1") for i in range(20)}
    st.replace("services", services)  # same objects: nothing recomputed
    st.replace("endpointslices", slices)
    assert model.total() == 20 and events == []
    del services["ns/s3"]  # deleted while the watch was away
    slices["ns/s4-x"] = eps("ns", "s4-x", "s4", ["10.244.4.4"], rv="9")
    del slices["ns/s5-x"]
    st.replace("services", services)
    st.replace("endpointslices", slices)
    assert {e.service for e in events} == {"ns/s3", "ns/s4", "ns/s5"}
    assert model.total() == 20 + 2  # s3 is gone, no model call for it
    snap = st.snapshot()
    assert VirtualServerKey("TCP", "10.96.0.4", 80) not in snap.table
    assert set(snap.table[VirtualServerKey("TCP", "10.96.0.5", 80)].real_servers) == {("10.244.4.4", 8080)}
    assert snap.table[VirtualServerKey("TCP", "10.96.0.6", 80)].real_servers == {}


def test_node_zone_or_address_change_recomputes_every_service():
    model = CountingModel()
    st = built_state(model, services=10)
    st.upsert("nodes", "node-a", objects.Node("node-a", "zone-1"))  # unchanged
    assert model.total() == 10
    st.upsert("nodes", "node-a", objects.Node("node-a", "zone-2"))
    assert model.total() == 20 and st.node().zone == "zone-2"
    st.upsert("nodes", "node-b", objects.Node("node-b", "zone-9"))  # not this node
    assert model.total() == 20
    st.set_node_addresses(["192.0.2.1"])  # unchanged
    assert model.total() == 20
    st.set_node_addresses(["192.0.2.1", "198.51.100.7"])
    assert model.total() == 30 and st.node().addresses == ("192.0.2.1", "198.51.100.7")


def test_snapshot_is_copy_on_write():
    model = CountingModel()
    st = built_state(model, services=5)
    first = st.snapshot()
    second = st.snapshot()
    assert first.table is not second.table  # separate read-only views ...
    assert first.table == second.table
    with pytest.raises(TypeError):
        first.table[VirtualServerKey("TCP", "1.1.1.1", 1)] = None  # type: ignore[index]
    before = dict(first.table)
    st.upsert("services", "ns/s0", svc("ns", "s0", "10.96.7.7"))
    assert dict(first.table) == before  # a taken snapshot never changes
    third = st.snapshot()
    assert VirtualServerKey("TCP", "10.96.7.7", 80) in third.table
    assert third.generation > first.generation
    # Without a snapshot in between, changes write in place (no copy per change).
    internal = st._table
    st.upsert("services", "ns/s1", svc("ns", "s1", "10.96.7.8"))
    assert st._table is not internal  # copied once, because `third` shares it
    internal = st._table
    st.upsert("services", "ns/s2", svc("ns", "s2", "10.96.7.9"))
    assert st._table is internal


def test_snapshot_does_not_wait_behind_a_long_update():
    import threading
    import time

    model = CountingModel()
    st = built_state(model, services=5)
    before = st.snapshot()
    release = threading.Event()
    slow = CountingModel()

    def slow_model(*args, **kwargs):
        release.wait(10)
        return slow(*args, **kwargs)
    st._model = slow_model
    writer = threading.Thread(target=st.upsert, args=("nodes", "node-a", objects.Node("node-a", "zone-9")))
    writer.start()  # a zone change: every Service recomputed, the slow model holds the state
    try:
        time.sleep(0.1)
        start = time.monotonic()
        during = st.snapshot()
        # Blocked, it would wait for the writer, which waits 10 s for release.
        assert time.monotonic() - start < 5
        assert during.generation == before.generation and dict(during.table) == dict(before.table)
    finally:
        release.set()
        writer.join()
    after = st.snapshot()
    assert after.generation == before.generation + 5 and slow.total() == 5


def test_a_missing_node_is_logged(caplog):
    caplog.set_level(logging.WARNING, logger="exporter.kube.store")
    st = state(CountingModel())
    st.replace("nodes", {"someone-else": objects.Node("someone-else", "z")})
    assert "Node 'node-a' not found" in caplog.text and st.node().zone is None


def test_a_model_failure_skips_that_service_only(caplog):
    caplog.set_level(logging.WARNING, logger="exporter.kube.store")
    model = CountingModel()
    model.fail_for = {"ns/s2"}
    st = built_state(model, services=4)
    assert len(st.snapshot().table) == 3
    assert "ns/s2" in caplog.text and st.counts()["model_errors"] == 1


def test_two_services_claiming_one_virtual_server():
    model = CountingModel()
    st = built_state(model, services=3)
    shared = VirtualServerKey("TCP", "10.96.0.2", 80)  # s1's
    st.upsert("services", "ns/s2", svc("ns", "s2", "10.96.0.2"))  # s2 claims it too
    snap = st.snapshot()
    assert snap.table[shared].service == "ns/s1"  # the smallest key keeps it, as desired_table does
    assert snap.by_service["ns/s2"] == (shared,) and VirtualServerKey("TCP", "10.96.0.3", 80) not in snap.table
    assert snap.real_servers == 2  # s2's endpoints are not in the table while s1 owns the key
    st.upsert("services", "ns/s0", svc("ns", "s0", "10.96.0.2"))  # and s0, which is smaller
    assert st.snapshot().table[shared].service == "ns/s0"
    calls = model.total()
    st.delete("services", "ns/s0")
    st.delete("services", "ns/s1")  # the next claimant takes over without a recompute
    snap = st.snapshot()
    assert snap.table[shared].service == "ns/s2" and model.total() == calls
    assert set(snap.table[shared].real_servers) == {("10.244.0.3", 8080)}
    assert snap.real_servers == 1 and len(snap.table) == 1
    offline = desired_table(st._services.values(), st.slices_by_service(),
                            st.node())
    assert offline == dict(snap.table)


def test_kube_store_end_to_end_with_the_api_stand_in(apiserver, api):
    apiserver.create("nodes", node("node-a", zone="zone-1"))
    for i in range(30):
        apiserver.create("services", service("ns", f"s{i}", f"10.96.0.{i + 1}"))
        apiserver.create("endpointslices", endpoint_slice("ns", f"s{i}-abc", f"s{i}", [f"10.244.0.{i + 1}"]))
    model = CountingModel()
    host = ["192.0.2.1"]
    store = KubeStore(api, "node-a", model=model, page_size=7,
                      backoff_base=0.05, backoff_cap=0.2, host_addresses=lambda: tuple(host))
    events = []
    store.subscribe(events.append)
    store.start()
    try:
        assert store.wait_synced(10)
        assert model.total() == 30  # one call per Service for the whole initial build
        snap = store.snapshot()
        assert snap.synced and len(snap.table) == 30 and snap.real_servers == 30
        assert store.state.node().zone == "zone-1"
        status = store.watch_status()
        assert set(status) == {"services", "endpointslices", "nodes"}
        wait_for(lambda: all(s.up and s.connected for s in store.watch_status().values()), what="watches")
        family = watch_up_family(store.watch_status())
        assert family.name == "kubenode_kube_watch_up"
        assert {s.labels["resource"]: s.value for s in family.samples} == \
            {"services": 1.0, "endpointslices": 1.0, "nodes": 1.0}

        apiserver.update("endpointslices", endpoint_slice("ns", "s4-abc", "s4", ["10.244.4.1", "10.244.4.2"],
                                                          trigger_time="2026-11-22T04:00:00Z"))
        wait_for(lambda: events, what="a change event")
        assert model.total() == 31 and model.calls["ns/s4"] == 2
        assert events[0].service == "ns/s4" and events[0].trigger_time == 1795320000.0
        assert len(store.snapshot().table[VirtualServerKey("TCP", "10.96.0.5", 80)].real_servers) == 2

        apiserver.update("nodes", node("node-a", zone="zone-2"))
        wait_for(lambda: model.total() == 61, what="a full recompute on the zone change")
        assert store.state.node() == NodeFacts("node-a", "zone-2", ("192.0.2.1",))
        host.append("198.51.100.9")
        store.refresh_node_addresses()
        assert model.total() == 91 and store.state.node().addresses == ("192.0.2.1", "198.51.100.9")
    finally:
        store.stop()
    assert not any(r._thread.is_alive() for r in store.reflectors.values())


def test_watch_up_is_zero_per_resource_without_synced_state(apiserver, api):
    apiserver.fail(10_000, resource="endpointslices", kind="list")
    store = KubeStore(api, "node-a", node_ips=["192.0.2.1"], backoff_base=0.05, backoff_cap=0.1)
    store.start()
    try:
        wait_for(lambda: store.watch_status()["services"].up and store.watch_status()["nodes"].up)
        values = {s.labels["resource"]: s.value for s in watch_up_family(store.watch_status()).samples}
        assert values == {"services": 1.0, "endpointslices": 0.0, "nodes": 1.0}
        assert not store.synced() and not store.snapshot().synced
        apiserver.failures.clear()
        assert store.wait_synced(10) and store.snapshot().synced
    finally:
        store.stop()


def test_node_addresses_by_proxy(apiserver, api):
    apiserver.create("nodes", node("node-a", addresses=("192.0.2.7", "2001:db8::7", "192.0.2.8")))
    called = []

    def host():
        called.append(1)
        return ("203.0.113.1",)
    common = dict(model=CountingModel(), host_addresses=host)
    fixed = KubeStore(api, "node-a", "kube-proxy", ["10.1.1.1"], **common)
    assert fixed.state.node().addresses == ("10.1.1.1",) and not called  # --node-ip wins
    router = KubeStore(api, "node-a", "kube-router", **common)
    router.start()
    try:
        assert router.wait_synced(10)
        assert router.state.node().addresses == ("192.0.2.7",)  # the Node's primary IP (desired.node_facts)
        assert not called
    finally:
        router.stop()
    proxy = KubeStore(ApiClient(api.http), "node-a", "kube-proxy", **common)
    assert proxy.state.node().addresses == ("203.0.113.1",) and called


def test_from_settings_resolves_node_name(apiserver, tmp_path, monkeypatch):
    from exporter.cli import settings_from_args
    from exporter.kube.client import KubeConfigError
    from exporter.kube.store import resolve_node_name

    assert resolve_node_name("given", {"NODE_NAME": "env"}) == "given"
    assert resolve_node_name(None, {"NODE_NAME": "env"}) == "env"
    assert resolve_node_name(None, {}) == os.uname().nodename
    path = apiserver.write_kubeconfig(str(tmp_path / "kc"))
    settings = settings_from_args(["--kubeconfig", path, "--node-name", "n1", "--node-ip", "10.0.0.9",
                                   "--proxy", "kube-router"])
    store = KubeStore.from_settings(settings, model=CountingModel())
    try:
        assert store.state.node_name == "n1" and store.state.proxy == "kube-router"
        assert store.state.node().addresses == ("10.0.0.9",)
        assert store.reflectors["nodes"].resource.field_selector == "metadata.name=n1"
    finally:
        store.stop()
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError):
        KubeStore.from_settings(settings_from_args([]), model=CountingModel())


def _build(n: int, endpoints_per_slice: int, model) -> ClusterState:
    st = state(model)
    services, slices = {}, {}
    shared = Interner()  # as the store's reflectors parse: equal ports and endpoint states shared
    for i in range(n):
        raw = service(f"ns{i % 50}", f"svc-{i}", f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
                      ports=(("http", "TCP", 80), ("https", "TCP", 443)))
        raw["metadata"]["resourceVersion"] = str(1000 + i)
        s = objects.parse_service(raw, shared)
        services[s.key] = s
        addrs = [f"10.{(i * endpoints_per_slice + j) // 65536 % 256 + 128}."
                 f"{(i * endpoints_per_slice + j) // 256 % 256}.{(i * endpoints_per_slice + j) % 256}"
                 for j in range(endpoints_per_slice)]
        raw = endpoint_slice(f"ns{i % 50}", f"svc-{i}-abcde", f"svc-{i}", addrs,
                             ports=(("http", "TCP", 8080), ("https", "TCP", 8443)),
                             trigger_time="2026-11-22T04:00:00.000000001Z", node_name=f"node-{i % 100}")
        raw["metadata"]["resourceVersion"] = str(500000 + i)
        e = objects.parse_endpoint_slice(raw, shared)
        slices[e.key] = e
    st.replace("services", services)
    st.replace("endpointslices", slices)
    st.replace("nodes", {"node-a": objects.Node("node-a", "zone-1")})
    return st


def _traced(build):
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        result = build()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return result, sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_memory_per_thousand_services_and_slices():
    """What the store keeps per Service + its slice (5 endpoints, 2 ports), measured and reported."""
    objects_only, kept_objects = _traced(lambda: _build(1000, 5, lambda *a: []))
    with_table, kept_all = _traced(lambda: _build(1000, 5, CountingModel()))
    table = with_table.snapshot()
    print(f"\nstore memory per 1,000 Services + 1,000 EndpointSlices (5 endpoints, 2 ports each): "
          f"objects {kept_objects / 1024:.0f} KiB ({kept_objects / 1000:.0f} B per Service+slice); "
          f"with a desired table of {len(table.table)} virtual servers / {table.real_servers} real servers "
          f"{kept_all / 1024:.0f} KiB ({kept_all / 1000:.0f} B per Service+slice)")
    assert objects_only.counts()["services"] == 1000 and objects_only.counts()["virtual_servers"] == 0
    assert with_table.counts()["real_servers"] == 10000
    # Whole API objects as a client library's models cost kilobytes each; the compact form must not.
    # Measured 1,151 / 1,914 B with a slice's endpoints one flat tuple, one key string per object,
    # no resourceVersion, and a virtual server's real servers one flat RealServers shared by its
    # Service's frontends; 1,942 / 4,400 B with a tuple per endpoint and a dict of RealServer
    # tuples per virtual server; 2,885 / 5,349 B with a tuple of ten fields per endpoint and a
    # port tuple per slice.
    assert kept_objects / 1000 < 1300, kept_objects
    assert kept_all / 1000 < 2100, kept_all


def test_the_store_keeps_one_tuple_per_distinct_port_and_endpoint_state(apiserver, api):
    """At 50,000 endpoints a tuple per endpoint's conditions/node/zone and per slice's port
    spec is megabytes: the store's parse shares equal ones across every object it keeps."""
    apiserver.create("nodes", node("node-a", zone="zone-1"))
    for i in range(40):
        apiserver.create("services", service("ns", f"s{i}", f"10.96.0.{i + 1}"))
        apiserver.create("endpointslices", endpoint_slice("ns", f"s{i}-abc", f"s{i}",
                                                          [f"10.244.{i}.1", f"10.244.{i}.2"],
                                                          node_name=f"node-{i % 2}"))
    store = KubeStore(api, "node-a", node_ips=["192.0.2.1"], page_size=7)
    store.start()
    try:
        assert store.wait_synced(10)
        slices = list(store.state._slices.values())
        services = list(store.state._services.values())
    finally:
        store.stop()
    assert len(slices) == 40 and len(services) == 40
    assert len({id(p) for es in slices for p in es.ports}) == 1
    assert len({id(p) for s in services for p in s.ports}) == 1
    states = {id(ep.state) for es in slices for ep in es.endpoints}
    assert len(states) == 2  # ready on node-0, ready on node-1
    ep = slices[0].endpoints[0]
    assert (ep.ready, ep.serving, ep.terminating, ep.node_name) == (True, True, False, ep.state.node_name)
    assert ep.node_name in ("node-0", "node-1") and ep.hint_zones is None and ep.stated_ready_or_serving
    # And the desired table still has every endpoint.
    assert store.snapshot().real_servers == 80


def test_interner_shares_equal_values_and_starts_over_past_its_limit():
    intern = Interner(limit=3)
    a = intern(("http", "TCP", 80))
    assert intern(("http", "TCP", 80)) is a and len(intern) == 1
    for port in (81, 82):
        intern(("http", "TCP", port))
    assert len(intern) == 3
    fresh = ("http", "TCP", 83)
    assert intern(fresh) is fresh and len(intern) == 1  # started over: bounded, still correct
    assert intern(("http", "TCP", 80)) == a
