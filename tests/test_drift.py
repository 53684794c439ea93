"""The drift collector (IPVS mode) end to end on the host: the production client against the API stand-in, the live
table from a fixture procfs, the real Runner and HTTP server; every check is a scrape."""

from __future__ import annotations

import os
import time

import pytest

from exporter.dataplane import RealServer, VirtualServer, VirtualServerKey
from tests.apiserver import FakeApiServer
from tests.drift_rig import (KINDS, NAMESPACE, NODE, DriftRig, add_service, cluster_ip, copy_table, drift,
                             drifted_services, set_endpoints, wait_until)
from tests.helpers import value
from tests import apiserver as api_objects

GRACE = 1.5


@pytest.fixture
def apiserver():
    server = FakeApiServer().start()
    server.create("nodes", api_objects.node(NODE, zone="zone-a"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rig(apiserver, tmp_path):
    rigs = []

    def make(**kw):
        kubeconfig = kw.pop("kubeconfig", None) or apiserver.write_kubeconfig(
            str(tmp_path / f"kubeconfig-drift-{os.getpid()}"))
        r = DriftRig(tmp_path, kubeconfig, **kw)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def success(s, collector="drift"):
    return value(s, "kubenode_collector_success", collector=collector)


def all_zero(s):
    return {k: drift(s, k) for k in KINDS} == dict.fromkeys(KINDS, 0.0)


def test_each_fault_reported_with_its_kind_and_service_after_grace(apiserver, rig):
    for i in range(1, 8):
        add_service(apiserver, i, endpoints=2)
    r = rig(grace=GRACE)
    r.wait_synced()
    good = r.desired()
    assert len(good) == 7 and sum(len(vs.real_servers) for vs in good.values()) == 14
    r.write_table(good)
    s = r.scrape()
    assert success(s) == 1 and value(s, "kubenode_dataplane_drift_synced") == 1
    assert value(s, "kubenode_dataplane_desired_virtual_servers") == 7
    assert value(s, "kubenode_dataplane_desired_real_servers") == 14
    assert all_zero(s) and drifted_services(s) == {}
    for resource in ("services", "endpointslices", "nodes"):
        assert value(s, "kubenode_kube_watch_up", resource=resource) == 1

    # Faults behind the proxy's back, one per kind, each in its own Service.
    live = copy_table(good)
    key = {i: VirtualServerKey("TCP", cluster_ip(i), 80) for i in range(1, 8)}
    del live[key[1]]                                                   # missing virtual server
    live[VirtualServerKey("TCP", "10.96.9.9", 80)] = VirtualServer(    # stale virtual server
        VirtualServerKey("TCP", "10.96.9.9", 80), real_servers={("10.244.99.1", 8080): RealServer("10.244.99.1", 8080)})
    del live[key[2]].real_servers[("10.244.2.1", 8080)]                # missing real server
    live[key[3]].real_servers[("10.244.3.77", 8080)] = RealServer("10.244.3.77", 8080, 1)  # stale real server
    live[key[4]].real_servers[("10.244.4.1", 8080)] = RealServer("10.244.4.1", 8080, 0)    # zero weight
    live[key[5]].real_servers[("10.244.5.50", 8080)] = RealServer("10.244.5.50", 8080, 0)  # draining
    r.write_table(live, {(key[5], ("10.244.5.50", 8080)): (2, 5)})  # still has connections
    s = r.scrape()
    first_seen_by = time.monotonic()  # the scrape that first saw the faults ended by now
    assert all_zero(s), "within the grace period nothing counts"
    assert sum(value(s, "kubenode_dataplane_drift_pending", kind=k) for k in KINDS) == 7  # six kinds, the stale one twice

    time.sleep(max(0.0, GRACE - (time.monotonic() - first_seen_by)))
    s = r.scrape()  # the first scrape after the grace period
    # The stale virtual server's real server counts as stale too (it still takes traffic).
    assert {k: drift(s, k) for k in KINDS} == {**dict.fromkeys(KINDS, 1.0), "stale_real_server": 2.0}
    assert drifted_services(s) == {
        (NAMESPACE, "svc-1", "missing_virtual_server"): 1,
        (NAMESPACE, "svc-2", "missing_real_server"): 1,
        (NAMESPACE, "svc-3", "stale_real_server"): 1,
        (NAMESPACE, "svc-4", "zero_weight_real_server"): 1,
        (NAMESPACE, "svc-5", "draining_real_server"): 1,
    }  # the stale virtual server belongs to no Service: counted, no per-Service series
    for k in KINDS:
        assert GRACE <= value(s, "kubenode_dataplane_drift_oldest_seconds", kind=k) < GRACE + 5
    assert value(s, "kubenode_ipvs_stuck_graceful_termination_real_servers") == 0

    # Put right: everything clears on the next scrape.
    r.write_table(good)
    s = r.scrape()
    assert all_zero(s) and drifted_services(s) == {}


def test_idle_weight_zero_left_for_long_is_stuck_graceful_termination(apiserver, rig):
    add_service(apiserver, 1)
    r = rig(grace=0.5, extra=("--drift.stuck-draining-after", "1"))
    r.wait_synced()
    live = r.desired()
    live[VirtualServerKey("TCP", cluster_ip(1), 80)].real_servers[("10.244.1.9", 8080)] = \
        RealServer("10.244.1.9", 8080, 0)  # weight 0, no connections
    r.write_table(live)
    assert r.scrape()[("kubenode_ipvs_stuck_graceful_termination_real_servers", ())] == 0
    time.sleep(1.1)
    s = r.scrape()
    assert value(s, "kubenode_ipvs_stuck_graceful_termination_real_servers") == 1
    assert drift(s, "draining_real_server") == 1


def test_normal_churn_within_grace_raises_nothing(apiserver, rig):
    for i in range(1, 6):
        add_service(apiserver, i)
    r = rig(grace=GRACE)
    r.wait_synced()
    r.write_table(r.desired())
    seen_pending = 0
    generation = r.store.snapshot().generation
    for round_ in range(3):
        # The cluster changes; the "proxy" catches up 0.5 s later, well within grace.
        for i in range(1, 6):
            set_endpoints(apiserver, i, [f"10.244.{i}.{10 * round_ + j}" for j in range(1, 4)])
        generation += 5
        wait_until(lambda: r.store.snapshot().generation >= generation, what="changes applied")
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            s = r.scrape()
            assert success(s) == 1 and all_zero(s), s
            seen_pending = max(seen_pending, sum(value(s, "kubenode_dataplane_drift_pending", kind=k) for k in KINDS))
            time.sleep(0.1)
        r.write_table(r.desired())
        time.sleep(1.05)
        s = r.scrape()
        assert all_zero(s) and sum(value(s, "kubenode_dataplane_drift_pending", kind=k) for k in KINDS) == 0
    assert seen_pending > 0, "the churn was seen (pending), just not counted"


def test_per_service_series_are_capped_and_the_rest_counted(apiserver, rig):
    for i in range(1, 11):
        add_service(apiserver, i)
    r = rig(grace=0.3, extra=("--drift.max-service-series", "3"))
    r.wait_synced()
    live = r.desired()
    for i in range(1, 11):
        del live[VirtualServerKey("TCP", cluster_ip(i), 80)]
    r.write_table(live)
    r.scrape()
    time.sleep(0.4)
    s = r.scrape()
    assert drift(s, "missing_virtual_server") == 10
    assert len(drifted_services(s)) == 3
    assert value(s, "kubenode_dataplane_service_drift_series_dropped") == 7


def test_watch_down_sets_watch_up_zero_and_back(apiserver, rig):
    add_service(apiserver, 1)
    r = rig()
    r.wait_synced()
    r.write_table(r.desired())
    assert value(r.scrape(), "kubenode_kube_watch_up", resource="endpointslices") == 1
    apiserver.fail(10**6)  # every request from now on: 500
    apiserver.end_watches()
    s = wait_until(lambda: (lambda s: s if value(s, "kubenode_kube_watch_up", resource="endpointslices") == 0
                            else None)(r.scrape()), what="kube_watch_up 0")
    assert value(s, "kubenode_kube_watch_up", resource="services") == 0
    assert success(s) == 1, "kept state still serves drift figures; the watch metric says it is stale"
    apiserver.failures.clear()
    wait_until(lambda: value(r.scrape(), "kubenode_kube_watch_up", resource="endpointslices") == 1,
               what="kube_watch_up back to 1")


def test_no_api_access_is_one_collector_down_others_serve(apiserver, rig, tmp_path):
    r = rig(kubeconfig=str(tmp_path / "no-such-kubeconfig"))
    r.write_table({})
    s = r.scrape()
    assert success(s) == 0
    assert success(s, "ipvs") == 1 and value(s, "kubenode_ipvs_virtual_servers") == 0
    assert not any(name.startswith("kubenode_dataplane_drift") for name, _ in s)


def test_unauthorized_is_no_api_access_with_watch_up_zero(apiserver, rig, tmp_path, caplog):
    kubeconfig = apiserver.write_kubeconfig(str(tmp_path / f"kubeconfig-bad-{os.getpid()}"), token="wrong")
    r = rig(kubeconfig=kubeconfig)
    r.write_table({})
    s = wait_until(lambda: (lambda s: s if success(s) == 0 else None)(r.scrape()), what="collector down")
    assert value(s, "kubenode_kube_watch_up", resource="services") == 0
    assert value(s, "kubenode_dataplane_drift_synced") == 0
    assert drift(s, "missing_virtual_server") is None
    assert any("no Kubernetes API access" in rec.getMessage() for rec in caplog.records)
    assert success(s, "ipvs") == 1


def test_no_drift_figures_before_the_first_full_list(apiserver, rig):
    add_service(apiserver, 1)
    apiserver.delay = 1.0  # a slow API: the first scrape comes before the list
    r = rig(grace=0.0)
    r.write_table({VirtualServerKey("TCP", "10.96.50.50", 80): VirtualServer(VirtualServerKey("TCP", "10.96.50.50", 80))})
    s = r.scrape()
    assert success(s) == 1 and value(s, "kubenode_dataplane_drift_synced") == 0
    assert drift(s, "stale_virtual_server") is None and drift(s, "missing_virtual_server") is None
    apiserver.delay = 0.0
    r.wait_synced()
    s = r.scrape()
    assert value(s, "kubenode_dataplane_drift_synced") == 1
    assert drift(s, "stale_virtual_server") == 1 and drift(s, "missing_virtual_server") == 1


def bucket(s, le):
    return value(s, "kubenode_dataplane_programming_latency_seconds_bucket", le=le)


def test_programming_latency_observed_when_the_table_arrives(apiserver, rig):
    add_service(apiserver, 1)
    add_service(apiserver, 2)
    follow = 0.1
    r = rig(follow=follow)
    r.wait_synced()
    r.write_table(r.desired())
    s = r.scrape()
    assert value(s, "kubenode_dataplane_programming_latency_seconds_count") == 0

    # The slice changes with a trigger time 0.5 s in the past; the table arrives 1.5 s later.
    trigger = time.time() - 0.5
    set_endpoints(apiserver, 1, ["10.244.1.1", "10.244.1.2", "10.244.1.3"], trigger)
    wait_until(lambda: len(r.desired()[VirtualServerKey("TCP", cluster_ip(1), 80)].real_servers) == 3,
               what="change applied")
    assert value(r.scrape(), "kubenode_dataplane_programming_latency_pending") == 1
    time.sleep(1.5)
    arrived = time.time() - trigger  # the file is replaced right after this
    r.write_table(r.desired())
    wait_until(lambda: value(r.scrape(), "kubenode_dataplane_programming_latency_seconds_count") == 1,
               what="latency observed")
    s = r.scrape()
    observed = value(s, "kubenode_dataplane_programming_latency_seconds_sum")
    assert arrived <= observed <= arrived + follow + 0.3, (arrived, observed)
    assert bucket(s, "1.0") == 0 and bucket(s, "3.0") == 1 and bucket(s, "+Inf") == 1
    assert value(s, "kubenode_dataplane_programming_latency_pending") == 0

    # A change already programmed when seen: observed at once; kept across scrapes (cumulative).
    trigger = time.time()
    set_endpoints(apiserver, 2, ["10.244.2.1"], trigger)
    wait_until(lambda: len(r.desired()[VirtualServerKey("TCP", cluster_ip(2), 80)].real_servers) == 1,
               what="second change applied")
    r.write_table(r.desired())
    wait_until(lambda: value(r.scrape(), "kubenode_dataplane_programming_latency_seconds_count") == 2,
               what="second latency observed")
    s = r.scrape()
    assert bucket(s, "1.0") == 1 and bucket(s, "+Inf") == 2


def test_collector_listed_and_on_by_default():
    from exporter.collector import load_collectors

    assert load_collectors()["drift"].default_enabled


def test_ip_vs_not_loaded_is_collector_down_with_what_is_known(apiserver, rig):
    add_service(apiserver, 1, endpoints=3)
    r = rig()
    r.wait_synced()  # no net/ip_vs in the fixture procfs: the module is not loaded
    s = r.scrape()
    assert success(s) == 0 and success(s, "ipvs") == 0
    assert value(s, "kubenode_dataplane_desired_virtual_servers") == 1
    assert value(s, "kubenode_dataplane_desired_real_servers") == 3
    assert value(s, "kubenode_kube_watch_up", resource="services") == 1
    assert drift(s, "missing_virtual_server") is None, "no live table, no drift figures"


def test_a_table_not_read_whole_gives_no_drift_figures_and_says_why(apiserver, rig, caplog):
    """A line of /proc/net/ip_vs the reader does not understand: the drift collector is
    down with the line named (not a clean table), the ipvs collector counts it."""
    add_service(apiserver, 1, endpoints=2)
    r = rig(grace=0.2)
    r.wait_synced()
    good = r.desired()
    r.write_table(good)
    assert success(r.scrape()) == 1
    path = r.procfs / "net" / "ip_vs"
    text = path.read_text()
    # After the only real server line of the table: its virtual server is dropped with it.
    path.write_text(text + "  -> 0AF40105:1F90 Masq 1 0 0 trailing junk\n")
    time.sleep(1.1)  # past the shared read's reuse window (the ipvs collector's: 1 s)
    s = r.scrape()
    assert success(s) == 0 and success(s, "ipvs") == 1
    assert value(s, "kubenode_ipvs_unparsed_lines") == 4  # the record it sits in: service, 2 real servers, it
    assert drift(s, "missing_virtual_server") is None, "no drift figures over a table not read whole"
    assert value(s, "kubenode_dataplane_desired_virtual_servers") == 1
    n = len(text.splitlines()) + 1
    assert f"not read whole, no drift figures: line {n} is not IPVS text" in caplog.text
    r.write_table(good)
    s = r.scrape()
    assert success(s) == 1 and all_zero(s)


def test_malloc_gives_pages_back_after_each_diff_of_a_table_read_anew(apiserver, rig, monkeypatch):
    """The list's decode, the first whole read and the first full diff are transients: once
    they are freed, malloc's free pages go back to the kernel (exporter/allocator.py), not
    before the store has synced; again after each diff of a live table read anew (a change:
    bench soak found RSS 15-50 MB above a still table's under churn), never on a scrape
    whose table did not change."""
    from exporter import allocator

    trims = []
    monkeypatch.setattr(allocator, "trim", lambda: trims.append(time.monotonic()) or True)
    for i in range(1, 4):
        add_service(apiserver, i)
    r = rig(grace=GRACE)
    r.wait_synced()
    r.write_table(r.desired())
    for _ in range(3):
        s = r.scrape()
        assert success(s) == 1 and all_zero(s)
    assert len(trims) == 1
    add_service(apiserver, 4)
    deadline = time.monotonic() + 10
    while len(r.desired()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    r.write_table(r.desired())
    for _ in range(3):
        s = r.scrape()
        assert success(s) == 1 and all_zero(s)
    assert len(trims) == 2
