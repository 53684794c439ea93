"""LatencyFollower unit by unit, with explicit clocks: matching, coalescing, the bounds on work."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from exporter.dataplane import RealServer, VirtualServer, VirtualServerKey
from exporter.kube.latency import BUCKETS, Histogram, LatencyFollower, service_programmed
from exporter.kube.store import ChangeEvent


def key(i: int) -> VirtualServerKey:
    return VirtualServerKey("TCP", f"10.96.0.{i}", 80)


def vs(i: int, reals: dict[str, int], **kw) -> VirtualServer:
    return VirtualServer(key(i), real_servers={(a, 8080): RealServer(a, 8080, w) for a, w in reals.items()},
                         service=f"ns/svc-{i}", **kw)


class Clock:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 50.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


class World:
    """A desired table (as the store's snapshot) and a live one, plus counts of reads."""

    def __init__(self) -> None:
        self.desired: dict = {}
        self.live: dict = {}
        self.table_reads = 0
        self.direct_reads: list[int] = []

    def set_desired(self, *servers: VirtualServer) -> None:
        for s in servers:
            self.desired[s.key] = s

    def snapshot(self):
        by_service: dict[str, tuple] = {}
        for k, s in self.desired.items():
            by_service[s.service] = by_service.get(s.service, ()) + (k,)
        return SimpleNamespace(table=self.desired, by_service=by_service)

    def read_table(self, max_age: float):
        self.table_reads += 1
        return self.live

    def read_one(self, keys):
        self.direct_reads.append(len(keys))
        return {k: self.live.get(k) for k in keys}


def follower(world: World, clock: Clock, **kw) -> LatencyFollower:
    return LatencyFollower(world.snapshot, world.read_table, world.read_one,
                           clock=lambda: clock.wall, monotonic=lambda: clock.mono, **kw)


def event(i: int, trigger: float | None, before=(), after=None) -> ChangeEvent:
    after = (key(i),) if after is None else after
    return ChangeEvent(f"ns/svc-{i}", trigger, trigger or 0.0, frozenset(before), frozenset(after))


def test_programmed_means_desired_present_extra_at_weight_zero_removed_gone():
    want = {key(1): vs(1, {"10.0.0.1": 1, "10.0.0.2": 1})}
    live = {key(1): vs(1, {"10.0.0.1": 1, "10.0.0.2": 1})}
    assert service_programmed([key(1)], want, (), live.get)
    live[key(1)].real_servers[("10.0.0.9", 8080)] = RealServer("10.0.0.9", 8080, 0)
    assert service_programmed([key(1)], want, (), live.get), "graceful termination: removal applied"
    live[key(1)].real_servers[("10.0.0.9", 8080)] = RealServer("10.0.0.9", 8080, 1)
    assert not service_programmed([key(1)], want, (), live.get), "old endpoint still takes traffic"
    live = {key(1): vs(1, {"10.0.0.1": 1, "10.0.0.2": 0})}
    assert not service_programmed([key(1)], want, (), live.get), "a desired endpoint at weight 0"
    live = {key(1): vs(1, {"10.0.0.1": 1, "10.0.0.2": 1}, persistent_timeout=10800)}
    assert not service_programmed([key(1)], want, (), live.get), "persistence differs"
    live = {key(1): vs(1, {"10.0.0.1": 1, "10.0.0.2": 1}), key(2): vs(2, {})}
    assert not service_programmed([key(1)], want, [key(2)], live.get), "a removed virtual server remains"
    del live[key(2)]
    assert service_programmed([key(1)], want, [key(2)], live.get)


def test_observes_now_minus_trigger_once_the_table_matches():
    world, clock = World(), Clock()
    f = follower(world, clock, interval=1.0)
    world.set_desired(vs(1, {"10.0.0.1": 1}))
    f.on_change(event(1, clock.wall - 0.3))
    assert f.tick() == 0 and f.pending() == 1  # not programmed yet
    clock.advance(2.0)
    world.live = {key(1): vs(1, {"10.0.0.1": 1})}
    assert f.tick() == 1 and f.pending() == 0
    buckets, total, count = f.histogram.snapshot()
    assert count == 1 and abs(total - 2.3) < 1e-6
    assert dict(buckets)["2.0"] == 0 and dict(buckets)["3.0"] == 1


def test_no_trigger_time_or_same_trigger_again_is_not_followed():
    world, clock = World(), Clock()
    f = follower(world, clock)
    f.on_change(event(1, None))
    assert f.pending() == 0
    t = clock.wall - 1
    f.on_change(event(1, t))
    world.set_desired(vs(1, {}))
    world.live = {key(1): vs(1, {})}
    assert f.tick() == 1
    f.on_change(event(1, t))  # the same slice re-sent (a relist, a label change)
    assert f.pending() == 0
    f.on_change(event(2, clock.wall - 3600))  # older than the timeout: not a fresh change
    assert f.pending() == 0 and f.stale_triggers == 1


def test_changes_to_one_service_coalesce_keeping_the_earliest_trigger():
    world, clock = World(), Clock()
    f = follower(world, clock)
    first = clock.wall - 5
    f.on_change(event(1, first))
    f.on_change(event(1, first + 2))
    f.on_change(event(1, first + 4))
    assert f.pending() == 1
    world.set_desired(vs(1, {}))
    world.live = {key(1): vs(1, {})}
    f.tick()
    _, total, count = f.histogram.snapshot()
    assert count == 1 and abs(total - 5) < 1e-6


def test_pending_is_capped_dropping_the_oldest():
    world, clock = World(), Clock()
    f = follower(world, clock, max_pending=100)
    for i in range(1, 351):
        f.on_change(event(i, clock.wall - 1))
    assert f.pending() == 100 and f.dropped == 250
    world.set_desired(*(vs(i, {}) for i in range(1, 351)))
    world.live = dict(world.desired)
    assert f.tick() == 100
    assert world.table_reads == 1, "many pending: one whole-table read for the tick, not one per service"


def test_few_pending_read_directly_many_read_the_table_once():
    world, clock = World(), Clock()
    f = follower(world, clock, direct_limit=4)
    world.set_desired(*(vs(i, {"10.0.0.1": 1}) for i in range(1, 11)))
    f.on_change(event(1, clock.wall - 1))
    f.tick()
    assert world.direct_reads == [1] and world.table_reads == 0
    for i in range(2, 11):
        f.on_change(event(i, clock.wall - 1))
    f.tick()
    assert world.direct_reads == [1] and world.table_reads == 1


def test_gives_up_after_the_timeout():
    world, clock = World(), Clock()
    f = follower(world, clock, timeout=30)
    world.set_desired(vs(1, {"10.0.0.1": 1}))
    f.on_change(event(1, clock.wall))
    clock.advance(29)
    f.tick()
    assert f.pending() == 1 and f.timed_out == 0
    clock.advance(2)
    f.tick()
    assert f.pending() == 0 and f.timed_out == 1
    assert f.histogram.snapshot()[2] == 0


def test_read_errors_keep_following():
    world, clock = World(), Clock()
    calls = []

    def broken(max_age):
        calls.append(max_age)
        raise OSError("ip_vs went away")
    f = LatencyFollower(world.snapshot, broken, None, clock=lambda: clock.wall, monotonic=lambda: clock.mono)
    world.set_desired(vs(1, {}))
    f.on_change(event(1, clock.wall))
    assert f.tick() == 0 and f.pending() == 1 and f.read_errors == 1 and "went away" in f.last_error


def test_thousands_of_changes_stay_bounded_and_coalesce():
    # (What one event costs is measured by the benchmarks, not asserted here.)
    world, clock = World(), Clock()
    f = follower(world, clock, max_pending=5000)
    for i in range(20_000):
        f.on_change(event(i % 8000, clock.wall - 1 + i * 1e-6))
    # 8,000 services cycling through a cap of 5,000: each newcomer pushes out the oldest.
    assert f.pending() == 5000 and f.dropped == 15_000
    g = follower(world, clock, max_pending=5000)
    for i in range(20_000):
        g.on_change(event(i % 3000, clock.wall - 1 + i * 1e-6))
    assert g.pending() == 3000 and g.dropped == 0, "repeated changes of one service coalesce"


def test_thread_starts_ticks_on_change_and_stops():
    world, clock = World(), Clock()
    world.set_desired(vs(1, {}))
    world.live = {key(1): vs(1, {})}
    done = threading.Event()
    f = LatencyFollower(world.snapshot, world.read_table, None, interval=0.05)
    original = f.histogram.observe
    f.histogram.observe = lambda v: (original(v), done.set())
    f.start()
    try:
        f.on_change(event(1, time.time() - 0.2))
        assert done.wait(5), "the thread observed the change"
    finally:
        f.stop()
    assert not f._thread.is_alive()
    assert 0.2 <= f.histogram.snapshot()[1] < 2


def test_histogram_is_cumulative_with_the_documented_buckets():
    h = Histogram()
    for v in (0.05, 0.1, 0.3, 299, 301):
        h.observe(v)
    buckets, total, count = h.snapshot()
    assert [le for le, _ in buckets] == [repr(float(b)) for b in BUCKETS] + ["+Inf"]
    got = dict(buckets)
    assert (got["0.1"], got["0.5"], got["300.0"], got["+Inf"]) == (2, 3, 4, 5) and count == 5
    fam = h.metric("kubenode_dataplane_programming_latency_seconds", "help")
    assert fam.type == "histogram" and abs(total - 600.45) < 1e-9
