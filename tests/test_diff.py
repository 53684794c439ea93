"""diff_tables on each kind, and DriftTracker: ages, grace, cap, stuck draining, forgetting."""

from __future__ import annotations

import pytest

from exporter.dataplane import VirtualServerKey
from exporter.kube import diff as d
from exporter.readers.ipvs import IPVSTable
from tests.kube_builders import live, vs


def table(*vss):
    """A table with the counters its real servers were built with (as the reader gives them)."""
    return live(*vss)


def only(result: d.Diff) -> dict[str, list]:
    """{kind: [(vs str, real)]} for the non-empty kinds."""
    return {kind: [(str(i.vs), i.real) for i in result.of(kind)] for kind in d.KINDS if result.of(kind)}


def test_identical_tables_have_no_drift():
    t = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080)]), vs("UDP", "10.0.0.1", 53, []))
    result = d.diff_tables(t, dict(t))
    assert only(result) == {} and not result.has_drift


def test_missing_virtual_server_lists_its_real_servers_once():
    want = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080), ("10.1.0.2", 8080)]))
    result = d.diff_tables(want, {})
    assert only(result) == {"missing_virtual_servers": [("TCP 10.0.0.1:80", None)]}
    item = result.missing_virtual_servers[0]
    assert item.service == "ns1/svc1" and dict(item.details)["real_servers"] == 2
    assert result.has_drift


def test_stale_virtual_server_lists_every_real_server_that_takes_traffic():
    """The contract: the real servers of a stale virtual server are listed, stale at
    weight > 0, draining at weight 0, each with its weight and connections."""
    have = table(vs("TCP", "10.0.0.9", 80, [("10.1.0.1", 8080, 1, 3, 4), ("10.1.0.2", 8080, 0, 0, 9),
                                             ("10.1.0.3", 8080, 5, 0, 0)], service=None),
                 vs("UDP", "10.0.0.9", 53, [], service=None))
    for result in (d.diff_tables({}, have), d.TableDiffer().diff({}, have)):
        assert only(result) == {
            "stale_virtual_servers": [("TCP 10.0.0.9:80", None), ("UDP 10.0.0.9:53", None)],
            "stale_real_servers": [("TCP 10.0.0.9:80", ("10.1.0.1", 8080)), ("TCP 10.0.0.9:80", ("10.1.0.3", 8080))],
            "draining_real_servers": [("TCP 10.0.0.9:80", ("10.1.0.2", 8080))],
        }
        assert result.stale_virtual_servers[0].service is None
        assert [(i.weight, i.active_connections, i.inactive_connections) for i in result.stale_real_servers] == \
            [(1, 3, 4), (5, 0, 0)]
        assert result.draining_real_servers[0].to_json() == {
            "protocol": "TCP", "address": "10.0.0.9", "port": 80, "fwmark": None, "real_address": "10.1.0.2",
            "real_port": 8080, "weight": 0, "service": None, "active_connections": 0, "inactive_connections": 9,
            "stale_virtual_server": True}
        assert result.has_drift
    # Counted in the drift metric, kind by kind, once past the grace period.
    tracker = d.DriftTracker(grace_period=10)
    tracker.update(d.diff_tables({}, have), now=0)
    counts = tracker.update(d.diff_tables({}, have), now=11).counts
    assert (counts["stale_virtual_servers"], counts["stale_real_servers"], counts["draining_real_servers"]) == (2, 2, 1)
    # Idle at weight 0 under a stale virtual server: stale, not a stuck graceful termination.
    idle = table(vs("TCP", "10.0.0.9", 80, [("10.1.0.2", 8080, 0, 0, 0)], service=None))
    tracker = d.DriftTracker(grace_period=0, stuck_after=5)
    tracker.update(d.diff_tables({}, idle), now=0)
    assert tracker.update(d.diff_tables({}, idle), now=60).stuck_draining == 0


def test_missing_real_server_carries_the_desired_weight():
    want = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080), ("10.1.0.2", 8080)]))
    have = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080)], service=None))
    result = d.diff_tables(want, have)
    assert only(result) == {"missing_real_servers": [("TCP 10.0.0.1:80", ("10.1.0.2", 8080))]}
    item = result.missing_real_servers[0]
    assert item.weight == 1 and item.service == "ns1/svc1"
    assert "active_connections" not in item.to_json()


def test_stale_zero_weight_and_draining_real_servers():
    want = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080), ("10.1.0.2", 8080)]))
    have = table(vs("TCP", "10.0.0.1", 80, [
        ("10.1.0.1", 8080, 1, 3, 4),   # fine
        ("10.1.0.2", 8080, 0, 0, 0),   # desired but weight 0: no traffic reaches a ready endpoint
        ("10.1.0.3", 8080, 1, 5, 0),   # not desired, weight 1: traffic to a gone endpoint
        ("10.1.0.4", 8080, 0, 2, 7),   # not desired, weight 0: graceful termination
    ], service=None))
    result = d.diff_tables(want, have)
    assert only(result) == {
        "stale_real_servers": [("TCP 10.0.0.1:80", ("10.1.0.3", 8080))],
        "zero_weight_real_servers": [("TCP 10.0.0.1:80", ("10.1.0.2", 8080))],
        "draining_real_servers": [("TCP 10.0.0.1:80", ("10.1.0.4", 8080))],
    }
    stale = result.stale_real_servers[0]
    assert (stale.weight, stale.active_connections, stale.inactive_connections, stale.service) == \
        (1, 5, 0, "ns1/svc1")
    assert result.draining_real_servers[0].to_json()["inactive_connections"] == 7
    assert result.has_drift


def test_only_draining_is_not_drift():
    want = table(vs("TCP", "10.0.0.1", 80, []))
    have = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.4", 8080, 0, 1, 0)]))
    result = d.diff_tables(want, have)
    assert [k for k in d.KINDS if result.of(k)] == ["draining_real_servers"]
    assert not result.has_drift


def test_scheduler_or_persistence_mismatch_is_its_own_kind():
    want = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080)], timeout=10800))
    have = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080)], scheduler="wrr", timeout=None))
    result = d.diff_tables(want, have)
    assert only(result) == {"mismatched_virtual_servers": [("TCP 10.0.0.1:80", None)]}
    j = result.mismatched_virtual_servers[0].to_json()
    assert (j["scheduler"], j["live_scheduler"], j["persistent_timeout"], j["live_persistent_timeout"]) == \
        ("rr", "wrr", 10800, None)
    assert result.has_drift


def test_fwmark_and_ipv6_keys():
    fw = vs("TCP", "1.1.1.1", 1, [("10.1.0.1", 80)])._replace(key=VirtualServerKey.for_fwmark(7))
    v6 = vs("TCP", "fd00::1", 80, [("fd00::10", 8080)])
    result = d.diff_tables(table(fw, v6), {})
    items = result.to_json()["missing_virtual_servers"]
    assert items[0]["address"] == "fd00::1" and items[0]["fwmark"] is None
    assert items[1]["fwmark"] == 7 and items[1]["protocol"] is None and items[1]["address"] is None


def test_json_has_every_kind_and_sorted_items():
    want = table(vs("TCP", "10.0.0.2", 80, [("10.1.0.10", 80), ("10.1.0.9", 80)]),
                 vs("TCP", "10.0.0.10", 80, []))
    j = d.diff_tables(want, {}).to_json()
    assert list(j)[:7] == list(d.CONTRACT_KINDS) and set(j) == set(d.KINDS)
    assert [i["address"] for i in j["missing_virtual_servers"]] == ["10.0.0.2", "10.0.0.10"]  # numeric order
    have = table(vs("TCP", "10.0.0.2", 80, [], service=None))
    rs = d.diff_tables(want, have).to_json()["missing_real_servers"]
    assert [i["real_address"] for i in rs] == ["10.1.0.9", "10.1.0.10"]


class CountingKey(VirtualServerKey):
    """A key that counts equality checks: each hashed lookup costs one, a scan costs many."""

    __slots__ = ()
    comparisons = 0

    def __eq__(self, other):
        CountingKey.comparisons += 1
        return tuple.__eq__(self, other)

    __hash__ = tuple.__hash__


def test_diff_is_linear_not_quadratic():
    # Counted, not timed: the first incident's O(n^2) loop compares every pair, a hashed
    # diff compares each key about once. 20x the entries must cost about 20x the comparisons.
    def comparisons(n):
        want, have = {}, {}
        for i in range(n):
            address = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            for side in (want, have):  # equal keys, distinct objects: a lookup must compare
                v = vs("TCP", address, 80, [(f"10.200.{i // 256 % 256}.{i % 256}", 8080)])
                key = CountingKey(*v.key)
                side[key] = v._replace(key=key)
        CountingKey.comparisons = 0
        d.diff_tables(want, have)
        return CountingKey.comparisons

    small, big = comparisons(500), comparisons(10_000)
    assert small >= 500, "the diff should look every desired key up in the live table"
    assert big / small < 40, (small, big)


def _random_side(rng, n_vs: int, service) -> dict:
    out = {}
    for i in rng.sample(range(n_vs + 5), n_vs):
        reals = [(f"10.1.{i}.{j}", 8080, rng.choice((0, 1, 1, 1)), rng.randrange(3), rng.randrange(3))
                 for j in rng.sample(range(6), rng.randrange(4))]
        scheduler = rng.choice(("rr", "rr", "rr", "wlc"))
        v = vs("TCP", f"10.0.0.{i}", 80, reals, service=service)._replace(scheduler=scheduler)
        out[v.key] = v
    return out


def _mutate(rng, side: dict, fresh: dict) -> dict:
    """A new table that keeps most objects of ``side`` and takes some from ``fresh``."""
    out = dict(side)
    for key in rng.sample(sorted(set(side) | set(fresh), key=str), 3):
        if key in fresh and rng.random() < 0.7:
            out[key] = fresh[key]
        else:
            out.pop(key, None)
    return out


def test_table_differ_gives_what_diff_tables_gives_as_tables_change():
    import random
    rng = random.Random(7)
    differ = d.TableDiffer()
    want = _random_side(rng, 20, "ns1/svc1")
    have = _random_side(rng, 20, None)
    for _ in range(60):
        if rng.random() < 0.5:
            want = _mutate(rng, want, _random_side(rng, 20, "ns1/svc1"))
        if rng.random() < 0.7:
            have = _mutate(rng, have, _random_side(rng, 20, None))
        assert differ.diff(want, have) == d.diff_tables(want, have)


def test_table_differ_compares_only_what_changed():
    want = table(*(vs("TCP", f"10.0.0.{i}", 80, [("10.1.0.1", 8080)]) for i in range(50)))
    have = table(*(vs("TCP", f"10.0.0.{i}", 80, [("10.1.0.1", 8080), ("10.1.0.2", 8080, 0, 0, 0)],
                      service=None) for i in range(50)))
    differ = d.TableDiffer()
    first = differ.diff(want, have)
    assert differ.compared == 50 and len(first.draining_real_servers) == 50
    assert differ.diff(want, have.copy()) == first and differ.compared == 0

    # A connection arrives on a draining real server: only a counter moved, so the
    # reader keeps every virtual server's object and nothing is compared again; the
    # item still carries the new counters.
    key = next(iter(have))
    moved = IPVSTable.of(dict(have), {(key, ("10.1.0.2", 8080)): (1, 0)})
    again = differ.diff(want, moved)
    assert differ.compared == 0
    assert [i.active_connections for i in again.draining_real_servers if i.vs == key] == [1]
    assert {i.active_connections for i in again.draining_real_servers if i.vs != key} == {0}

    # Its real server's weight changes: that virtual server is a new object, compared again.
    have = moved.copy()
    have[key] = vs("TCP", key.address, 80, [("10.1.0.1", 8080, 0), ("10.1.0.2", 8080, 0)], service=None)
    again = differ.diff(want, have)
    assert differ.compared == 1
    assert [i.vs for i in again.zero_weight_real_servers] == [key]

    # An equal but new desired object is compared again (identity, not equality, is the test).
    want = dict(want)
    want[key] = want[key]._replace()
    differ.diff(want, have)
    assert differ.compared == 1


# --- DriftTracker -----------------------------------------------------------


def drift_with(*draining_or_stale) -> d.Diff:
    want = table(vs("TCP", "10.0.0.1", 80, []))
    have = table(vs("TCP", "10.0.0.1", 80, list(draining_or_stale)))
    return d.diff_tables(want, have)


def test_grace_period_then_counted_with_its_age():
    tracker = d.DriftTracker(grace_period=60, max_service_series=10)
    stale = drift_with(("10.1.0.3", 8080, 1, 0, 0))
    r = tracker.update(stale, now=1000)
    assert r.counts["stale_real_servers"] == 0 and r.pending["stale_real_servers"] == 1
    r = tracker.update(stale, now=1059.9)
    assert r.counts["stale_real_servers"] == 0
    r = tracker.update(stale, now=1075)
    assert r.counts["stale_real_servers"] == 1 and r.oldest_seconds["stale_real_servers"] == 75
    assert r.services == [d.ServiceDrift("ns1", "svc1", "stale_real_servers", 1)]
    assert r.oldest_seconds["missing_virtual_servers"] == 0


def test_items_that_disappear_are_forgotten_and_restart_their_grace():
    tracker = d.DriftTracker(grace_period=60)
    stale = drift_with(("10.1.0.3", 8080, 1, 0, 0))
    tracker.update(stale, now=0)
    assert tracker.update(stale, now=100).counts["stale_real_servers"] == 1
    tracker.update(drift_with(), now=101)
    assert len(tracker) == 0
    r = tracker.update(stale, now=102)
    assert r.counts["stale_real_servers"] == 0 and r.pending["stale_real_servers"] == 1


def test_oldest_is_the_oldest_of_several():
    tracker = d.DriftTracker(grace_period=10)
    tracker.update(drift_with(("10.1.0.3", 8080, 1, 0, 0)), now=0)
    r = tracker.update(drift_with(("10.1.0.3", 8080, 1, 0, 0), ("10.1.0.4", 8080, 1, 0, 0)), now=50)
    assert r.counts["stale_real_servers"] == 1 and r.pending["stale_real_servers"] == 1
    r = tracker.update(drift_with(("10.1.0.3", 8080, 1, 0, 0), ("10.1.0.4", 8080, 1, 0, 0)), now=70)
    assert r.counts["stale_real_servers"] == 2 and r.oldest_seconds["stale_real_servers"] == 70


def test_service_series_capped_with_the_rest_counted():
    want, have = {}, {}
    for i in range(5):
        w = vs("TCP", f"10.0.0.{i}", 80, [(f"10.1.0.{j}", 80) for j in range(i + 1)], service=f"ns/s{i}")
        want[w.key] = w
        have[w.key] = w._replace(real_servers={})
    tracker = d.DriftTracker(grace_period=0, max_service_series=2)
    r = tracker.update(d.diff_tables(want, have), now=0)
    assert [(s.service, s.count) for s in r.services] == [("s4", 5), ("s3", 4)]
    assert r.services_not_shown == 3
    assert r.counts["missing_real_servers"] == 15


def test_stuck_graceful_termination():
    tracker = d.DriftTracker(grace_period=60, stuck_after=180)
    busy = drift_with(("10.1.0.4", 8080, 0, 2, 0))
    idle = drift_with(("10.1.0.4", 8080, 0, 0, 0))
    assert tracker.update(busy, now=0).stuck_draining == 0
    assert tracker.update(busy, now=500).stuck_draining == 0  # connections still draining: normal
    assert tracker.update(idle, now=600).stuck_draining == 0  # idle clock starts now
    r = tracker.update(idle, now=779)
    assert r.stuck_draining == 0 and r.counts["draining_real_servers"] == 1
    r = tracker.update(idle, now=780)
    assert r.stuck_draining == 1 and r.stuck_draining_items[0].real == ("10.1.0.4", 8080)
    # a connection comes back: no longer stuck, and the idle clock restarts
    assert tracker.update(busy, now=800).stuck_draining == 0
    assert tracker.update(idle, now=900).stuck_draining == 0


def test_tracker_caps_services_at_scale():
    want = {}
    for i in range(20_000):
        w = vs("TCP", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 80, [], service=f"ns/s{i}")
        want[w.key] = w
    result = d.diff_tables(want, {})
    tracker = d.DriftTracker(grace_period=0)
    r = tracker.update(result, now=1)
    assert r.counts["missing_virtual_servers"] == 20_000 and len(r.services) == 200
    assert r.services_not_shown == 19_800


@pytest.mark.parametrize("kind", d.KINDS)
def test_singular_label_values(kind):
    assert d.singular(kind) + "s" == kind


# --- the rules modes' no-endpoint verdicts (rejected_virtual_servers) ---------------------

def _key(address, port=80):
    return VirtualServerKey("TCP", address, port)


def test_a_frontend_with_usable_endpoints_refused_by_the_rules_is_rejected_not_missing():
    """A Service left in kube-proxy's no-endpoint map while it has ready endpoints: its
    traffic meets the verdict, so it is rejected (and not also missing)."""
    want = table(vs("TCP", "10.0.0.1", 80, [("10.1.0.1", 8080)]), vs("TCP", "10.0.0.2", 80, [("10.1.0.2", 8080)]))
    have = {k: v for k, v in want.items() if k != _key("10.0.0.1")}
    for differ in (d.diff_tables, d.TableDiffer().diff):
        result = differ(want, have, {}, {_key("10.0.0.1"): "reject", _key("10.0.0.2"): "drop"})
        assert only(result) == {"rejected_virtual_servers": [("TCP 10.0.0.1:80", None), ("TCP 10.0.0.2:80", None)]}
        assert [dict(i.details)["verdict"] for i in result.rejected_virtual_servers] == ["reject", "drop"]
        assert result.has_drift and result.to_json()["rejected_virtual_servers"][0]["verdict"] == "reject"


def test_kube_proxys_own_verdicts_are_not_drift():
    """No usable endpoint: reject; Local policy with none on this node: mapped to nothing and
    dropped. A verdict left for a frontend nothing desires refuses traffic no Service wants."""
    local = vs("TCP", "192.0.2.1", 80, [])
    want = table(local)
    desired_rejected = {_key("10.0.0.3"): "reject", _key("192.0.2.1"): "drop"}
    live_rejected = {**desired_rejected, _key("10.0.0.9"): "reject"}
    result = d.diff_tables(want, dict(want), desired_rejected, live_rejected)
    assert only(result) == {} and not result.has_drift


def test_a_desired_verdict_absent_from_the_rules_is_a_missing_frontend():
    services = {_key("10.0.0.3"): vs("TCP", "10.0.0.3", 80, [], service="ns1/gone")}
    result = d.diff_tables({}, {}, {_key("10.0.0.3"): "reject"}, {}, services)
    assert only(result) == {"missing_virtual_servers": [("TCP 10.0.0.3:80", None)]}
    assert result.missing_virtual_servers[0].service == "ns1/gone"
    assert dict(result.missing_virtual_servers[0].details)["verdict"] == "reject"
