"""Network programming latency, measured from outside the proxy.

When an EndpointSlice changes, the store sends a ``ChangeEvent`` carrying the
slice's ``endpoints.kubernetes.io/last-change-trigger-time``. The follower
keeps that Service pending and, every ``interval`` seconds, checks only the
pending Services' virtual servers (frontends) against the live dataplane, in
any proxy mode; when they match the desired ones it observes ``now - trigger time`` into a cumulative
histogram (the sig-scalability SLI kube-proxy measures on itself).

Cost is bounded whatever the churn:
- ``on_change`` (called on a reflector thread) is a dict update under a lock;
  a Service already pending keeps its earliest trigger time (coalescing);
- at most ``max_pending`` Services are followed; a new one beyond that drops
  the oldest (counted);
- a Service not matched after ``timeout`` seconds is given up (counted);
- one tick reads each pending virtual server over netlink when few are
  pending (IPVS), else the whole live table once through the mode's
  ``DataplaneReader`` (shared with the scrapes; nftables' generation check
  makes a read with nothing changed cost one netlink round trip).

"Matches" means: every desired virtual server present with the desired
scheduler and persistence, every desired real server present at weight > 0,
any other real server at weight 0 (graceful termination is the proxy having
applied the removal), and virtual servers the change removed gone. In the
rules modes also: a frontend with usable endpoints no longer refused by a
no-endpoint verdict, and one kube-proxy should refuse (``unmapped`` with a
verdict, ``desired_rules``) out of the service maps and refused as desired.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, NamedTuple

from prometheus_client.core import HistogramMetricFamily

from exporter.dataplane import LiveRead, VirtualServer, VirtualServerKey
from exporter.kube.desired_rules import UNMAPPED, VERDICTS

log = logging.getLogger("exporter.kube.latency")

# 0.1 s to 5 min: kube-proxy's own histogram spans a similar range; a healthy
# proxy lands in the first few seconds, a hung one past the last bucket.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
           60.0, 90.0, 120.0, 180.0, 240.0, 300.0)


class Histogram:
    """A cumulative histogram kept across scrapes (thread-safe)."""

    def __init__(self, buckets: Iterable[float] = BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # last: +Inf only
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float, int]:
        """(cumulative buckets as (le, count) including +Inf, sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out, total, running

    def metric(self, name: str, help_text: str) -> HistogramMetricFamily:
        buckets, total, _ = self.snapshot()
        return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=total)


class Pending(NamedTuple):
    service: str
    trigger_time: float  # Unix seconds, the earliest of the coalesced changes
    removed: frozenset[VirtualServerKey]  # virtual servers the changes took away
    since: float  # monotonic time it started being followed


_NO_VERDICTS: Mapping = {}


def service_programmed(keys: Iterable[VirtualServerKey], desired: Mapping[VirtualServerKey, VirtualServer],
                       removed: Iterable[VirtualServerKey],
                       live: Callable[[VirtualServerKey], VirtualServer | None],
                       rejected: Mapping[VirtualServerKey, str] = _NO_VERDICTS) -> bool:
    """Whether the live dataplane holds what is desired for one Service (pure; see module doc).

    ``rejected``: the live rules' no-endpoint verdicts (empty for IPVS, whose desired
    virtual servers carry no rule flags)."""
    for key in keys:
        want = desired.get(key)
        if want is None:
            continue  # changed again meanwhile; the next event covers it
        verdict = next((flag for flag in want.flags if flag in VERDICTS), None) if want.flags else None
        if verdict is None and key in rejected:
            return False  # usable endpoints, still refused
        if verdict is not None and rejected.get(key) != verdict:
            return False
        have = live(key)
        if want.flags and UNMAPPED in want.flags:
            if have is not None:
                return False  # still mapped to the endpoints it lost
            continue
        if have is None or have.scheduler != want.scheduler \
                or have.persistent_timeout != want.persistent_timeout:
            return False
        want_rs, have_rs = want.real_servers, have.real_servers
        for rkey in want_rs:
            found = have_rs.get(rkey)
            if found is None or found.weight <= 0:
                return False
        if len(have_rs) != len(want_rs):  # more live ones: only those at weight 0 may stay
            wanted = want_rs if isinstance(want_rs, dict) else set(want_rs)
            for rkey, found in have_rs.items():
                if rkey not in wanted and found.weight > 0:
                    return False
    for key in removed:
        if key not in desired and live(key) is not None:
            return False
    return True


class LatencyFollower:
    """Follows changed Services until the live dataplane matches them; one background thread.

    ``snapshot()`` returns the store's ``DesiredSnapshot``; ``read_table(max_age)``
    the live dataplane: a ``LiveRead`` (a ``DataplaneReader.read``, any mode) or a
    plain table; ``read_one(keys)`` reads a few IPVS virtual servers directly
    ({key: VirtualServer or None}) or is None when there is no such reader (a
    fixture procfs, another mode).
    """

    def __init__(self, snapshot: Callable[[], object], read_table: Callable[[float], Mapping],
                 read_one: Callable[[list[VirtualServerKey]], dict] | None = None, *,
                 interval: float = 1.0, timeout: float = 600.0, max_pending: int = 5000,
                 direct_limit: int = 16, histogram: Histogram | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.snapshot = snapshot
        self.read_table = read_table
        self.read_one = read_one
        self.interval = interval
        self.timeout = timeout
        self.max_pending = max_pending
        self.direct_limit = direct_limit  # at most this many virtual servers: read each one directly
        self.histogram = histogram or Histogram()
        self.clock = clock
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        # Last trigger time taken per Service: a slice re-sent with the same
        # annotation (a label change, a relist) is not a new change.
        self._seen_trigger: dict[str, float] = {}
        self.dropped = 0  # followed Services dropped because too many were pending
        self.timed_out = 0  # given up after ``timeout``
        self.stale_triggers = 0  # events whose trigger time was older than ``timeout``
        self.read_errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- events (reflector threads) -------------------------------------------

    def on_change(self, event) -> None:
        trigger = event.trigger_time
        if trigger is None:
            return  # a Service change: no trigger time to measure from
        removed = event.before - event.after
        with self._lock:
            if self._seen_trigger.get(event.service, float("-inf")) >= trigger:
                return
            if len(self._seen_trigger) > 4 * self.max_pending + 100_000:
                self._seen_trigger.clear()
            self._seen_trigger[event.service] = trigger
            if self.clock() - trigger > self.timeout:
                self.stale_triggers += 1
                return
            old = self._pending.get(event.service)
            if old is not None:
                self._pending[event.service] = old._replace(
                    trigger_time=min(old.trigger_time, trigger),
                    removed=(old.removed | removed) - event.after)
                return
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)  # the oldest
                self.dropped += 1
            self._pending[event.service] = Pending(event.service, trigger, frozenset(removed), self.monotonic())
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # --- checking ----------------------------------------------------------------

    def tick(self) -> int:
        """Check every pending Service once; return how many were observed."""
        with self._lock:
            pending = list(self._pending.values())
        if not pending:
            return 0
        now_mono = self.monotonic()
        snap = self.snapshot()
        desired, by_service = snap.table, snap.by_service
        wanted: dict[str, tuple] = {p.service: by_service.get(p.service, ()) for p in pending}
        keys = [k for p in pending for k in (*wanted[p.service], *p.removed)]
        try:
            live, rejected = self._live(keys)
        except Exception as err:  # noqa: BLE001 - keep following; say why once per change of reason
            self.read_errors += 1
            if str(err) != self.last_error:
                log.warning("programming latency: live table not read: %s", err)
            self.last_error = str(err)
            return 0
        self.last_error = None
        now = self.clock()
        done: list[Pending] = []
        expired: list[Pending] = []
        for item in pending:
            if service_programmed(wanted[item.service], desired, item.removed, live, rejected):
                done.append(item)
            elif now_mono - item.since >= self.timeout:
                expired.append(item)
        with self._lock:
            for item in done + expired:
                # Only if not replaced meanwhile by a coalesced, different entry.
                if self._pending.get(item.service) == item:
                    del self._pending[item.service]
            self.timed_out += len(expired)
        for item in done:
            self.histogram.observe(max(0.0, now - item.trigger_time))
        return len(done)

    def _live(self, keys: list[VirtualServerKey]) -> tuple[Callable[[VirtualServerKey], VirtualServer | None],
                                                          Mapping[VirtualServerKey, str]]:
        if self.read_one is not None and len(keys) <= self.direct_limit:
            found = self.read_one(keys)
            return found.get, _NO_VERDICTS
        live = self.read_table(self.interval / 2)
        if isinstance(live, LiveRead):
            if live.unread:
                # A table not read whole could match by accident: not "programmed".
                raise RuntimeError(f"live rules not read whole: {live.unread[0]}")
            return live.table.get, live.rejected
        return live.get, _NO_VERDICTS

    # --- thread ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="programming-latency", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pending():
                self._wake.wait(self.interval)  # sleep until a change arrives
                self._wake.clear()
                continue
            started = self.monotonic()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the thread must survive a bug in one tick
                log.exception("programming latency tick failed")
            self._stop.wait(max(0.0, self.interval - (self.monotonic() - started)))


def netlink_reader() -> Callable[[list[VirtualServerKey]], dict]:
    """Read a few virtual servers over one netlink socket (the real kernel only)."""
    from exporter.readers.ipvs import IPVSNetlink

    def read(keys: list[VirtualServerKey]) -> dict:
        with IPVSNetlink() as nl:
            return {key: nl.read_virtual_server(key) for key in set(keys)}
    return read
