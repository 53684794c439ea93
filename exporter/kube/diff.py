"""The desired dataplane table against the live one, in any proxy mode: what differs, and for how long.

``diff_tables`` is pure and O(desired + live): one dict lookup per virtual
server and per real server, never a scan of one table per entry of the other
(the first incident's exporter compared lists pairwise and took seconds at a
few thousand services). ``TableDiffer`` is the same comparison for a table
compared once per scrape: it compares again only the virtual servers whose
desired or live object changed since the last call.

The contract's six kinds, plus one of ours:

- ``missing_virtual_servers``: desired, absent from IPVS. Its real servers are
  not listed again as missing; the item says how many it should have.
- ``stale_virtual_servers``: in IPVS, not desired (a deleted Service still
  answering). Its real servers are listed too, each under ``stale_real_servers``
  (weight > 0) or ``draining_real_servers`` (weight 0), with its weight: the
  on-call engineer needs every address that still takes traffic (the contract).
- ``missing_real_servers``: desired in a present virtual server, absent.
- ``stale_real_servers``: in IPVS, not desired, weight > 0: traffic still goes
  to an endpoint that is gone.
- ``zero_weight_real_servers``: desired, present, weight 0: a ready endpoint
  gets no traffic (kubernetes issues 92019, 108319).
- ``draining_real_servers``: in IPVS, not desired, weight 0: graceful
  termination. Normal while connections drain; stuck when it lasts with no
  connections left (kubernetes issue 71071), which ``DriftTracker`` reports.
- ``rejected_virtual_servers``: a frontend whose Service has usable endpoints
  but whose traffic the rules reject or drop (a kube-proxy no-endpoint verdict
  left in place: nftables `no-endpoint-services` / `-nodeports`). Counted instead
  of ``missing_virtual_servers`` when the frontend is also absent from the
  service maps: the verdict is what its traffic meets. Not drift: the verdict
  kube-proxy itself gives a frontend without usable endpoints (reject, or drop
  under a Local traffic policy with no endpoint on this node), and a verdict
  left for a frontend nothing desires any more (it refuses traffic to an address
  no Service uses). A desired verdict absent from the rules, with the frontend
  not mapped either, is a missing virtual server. IPVS has no verdicts: the
  kind stays empty there.
- ``mismatched_virtual_servers`` (ours; the contract allows additions): a
  present virtual server whose scheduler or persistence timeout is not the
  desired one, e.g. ClientIP affinity set on the Service but the live virtual
  server not persistent. It is drift (session stickiness silently lost), so
  it counts for ``diff``'s exit status. The item carries both values. Real
  servers of a mismatched virtual server are still compared one by one.

Modes without weights (nftables, iptables) give every real server weight 1, so
``zero_weight_real_servers`` and ``draining_real_servers`` stay empty there.
Chains of a deleted Service that nothing references any more are not read at
all (the readers start from the service maps): they are never drift.

Real server weights other than 0 are not compared (both proxies use 1; an
operator's hand-tuned weight is not a fault the incidents were about), nor is
the forwarding method.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, NamedTuple

from exporter.dataplane import RealServer, Table, VirtualServer, VirtualServerKey, _address_order

MISSING_VS = "missing_virtual_servers"
STALE_VS = "stale_virtual_servers"
MISSING_RS = "missing_real_servers"
STALE_RS = "stale_real_servers"
ZERO_WEIGHT_RS = "zero_weight_real_servers"
DRAINING_RS = "draining_real_servers"
REJECTED_VS = "rejected_virtual_servers"
MISMATCHED_VS = "mismatched_virtual_servers"

# The contract's seven, in its order; then ours.
CONTRACT_KINDS = (MISSING_VS, STALE_VS, MISSING_RS, STALE_RS, ZERO_WEIGHT_RS, DRAINING_RS, REJECTED_VS)
KINDS = CONTRACT_KINDS + (MISMATCHED_VS,)
# Kinds that are drift as soon as they are seen by `diff` (draining is drift only if it lasts).
DRIFT_KINDS = tuple(k for k in KINDS if k != DRAINING_RS)


def singular(kind: str) -> str:
    """Metric label value: ``missing_virtual_servers`` -> ``missing_virtual_server``."""
    return kind[:-1] if kind.endswith("s") else kind


class DriftItem(NamedTuple):
    kind: str
    vs: VirtualServerKey
    real: tuple[str, int] | None = None  # (address, port) for real-server kinds
    weight: int | None = None  # as found in IPVS, or as desired when missing
    service: str | None = None  # namespace/name where known
    active_connections: int | None = None
    inactive_connections: int | None = None
    # mismatched_virtual_servers: what differs; VS kinds: how many real servers
    details: tuple[tuple[str, object], ...] = ()

    @property
    def identity(self) -> tuple:
        """What stays the same while the same difference lasts (the tracker's key)."""
        return (self.kind, self.vs, self.real)

    def to_json(self) -> dict:
        out: dict = {
            "protocol": self.vs.protocol,
            "address": self.vs.address,
            "port": self.vs.port,
            "fwmark": self.vs.fwmark,
        }
        if self.real is not None:
            out["real_address"], out["real_port"] = self.real
            out["weight"] = self.weight
        out["service"] = self.service
        if self.active_connections is not None:
            out["active_connections"] = self.active_connections
            out["inactive_connections"] = self.inactive_connections
        out.update(self.details)
        return out


class Diff(NamedTuple):
    missing_virtual_servers: list[DriftItem]
    stale_virtual_servers: list[DriftItem]
    missing_real_servers: list[DriftItem]
    stale_real_servers: list[DriftItem]
    zero_weight_real_servers: list[DriftItem]
    draining_real_servers: list[DriftItem]
    rejected_virtual_servers: list[DriftItem]
    mismatched_virtual_servers: list[DriftItem]

    def of(self, kind: str) -> list[DriftItem]:
        return getattr(self, kind)

    def items(self) -> Iterator[DriftItem]:
        for kind in KINDS:
            yield from self.of(kind)

    @property
    def has_drift(self) -> bool:
        """Anything but draining real servers (the contract's exit status 1)."""
        return any(self.of(kind) for kind in DRIFT_KINDS)

    def sorted(self) -> "Diff":
        """Each list in the contract's order: virtual server, then real server."""
        return Diff(*(sorted(self.of(kind), key=_item_order) for kind in KINDS))

    def to_json(self) -> dict:
        return {kind: [item.to_json() for item in sorted(self.of(kind), key=_item_order)] for kind in KINDS}


def _item_order(item: DriftItem) -> tuple:
    real = (_address_order(item.real[0]), item.real[1]) if item.real else ((0, 0), 0)
    return (item.vs.sort_key(), real)


def _rs_item(kind: str, vs: VirtualServer, rs: RealServer, service: str | None, weight: int) -> DriftItem:
    return DriftItem(kind, vs.key, rs.key, weight, service)


# Real-server kinds whose items say how many connections the live real server has.
_COUNTED_KINDS = (ZERO_WEIGHT_RS, STALE_RS, DRAINING_RS)


def _with_connections(out: "Diff", live: Table) -> "Diff":
    """Put the live counters into the real-server items that show them.

    Counters are not part of a virtual server (``IPVSTable.connections``): they
    move on every read, the comparison does not depend on them, and an item
    remembered from an earlier comparison must still show today's. Work: one
    lookup per such item, i.e. per thing that is wrong.
    """
    connections = getattr(live, "connections", None)
    if connections is None:
        return out
    by_vs: dict = {}
    for kind in _COUNTED_KINDS:
        items = out.of(kind)
        for i, item in enumerate(items):
            counts = by_vs.get(item.vs)
            if counts is None:
                counts = by_vs[item.vs] = connections(item.vs)
            found = counts.get(item.real)
            if found is not None:
                items[i] = item._replace(active_connections=found[0], inactive_connections=found[1])
    return out


def _vs_details(vs: VirtualServer) -> tuple[tuple[str, object], ...]:
    """What a whole missing or stale virtual server item says of it."""
    return (("real_servers", len(vs.real_servers)), ("scheduler", vs.scheduler),
            ("persistent_timeout", vs.persistent_timeout))


def _compare(key: VirtualServerKey, want: VirtualServer, have: VirtualServer | None) -> tuple[DriftItem, ...]:
    """Every difference of one desired virtual server with its live counterpart (or None)."""
    if have is None:
        return (DriftItem(MISSING_VS, key, service=want.service, details=_vs_details(want)),)
    items = []
    service = want.service
    want_rs = want.real_servers
    if want.scheduler != have.scheduler or want.persistent_timeout != have.persistent_timeout:
        items.append(DriftItem(
            MISMATCHED_VS, key, service=service,
            details=(("scheduler", want.scheduler), ("live_scheduler", have.scheduler),
                     ("persistent_timeout", want.persistent_timeout),
                     ("live_persistent_timeout", have.persistent_timeout))))
    have_rs = have.real_servers
    present = 0
    for rkey in want_rs:
        found = have_rs.get(rkey)
        if found is None:
            items.append(DriftItem(MISSING_RS, key, rkey, want_rs[rkey].weight, service))
        else:
            present += 1
            if found.weight == 0:
                items.append(_rs_item(ZERO_WEIGHT_RS, want, found, service, 0))
    if present != len(have_rs):
        # Live real servers nothing desires. Looked up in a set of the desired keys made
        # here (hashing, O(n)): a desired table's RealServers keeps no index of its own.
        wanted = want_rs if isinstance(want_rs, dict) else set(want_rs)
        for rkey, found in have_rs.items():
            if rkey not in wanted:
                kind = DRAINING_RS if found.weight == 0 else STALE_RS
                items.append(_rs_item(kind, want, found, service, found.weight))
    return tuple(items)


# Marks a real server listed because its virtual server is stale (an extra JSON field):
# not a graceful termination of the proxy's, so never "stuck draining".
_OF_STALE_VS = (("stale_virtual_server", True),)


def _stale_items(desired: Table, live: Table) -> tuple[DriftItem, ...]:
    """Live virtual servers that nothing desires, in the live table's order, each
    followed by its real servers (stale at weight > 0, draining at weight 0)."""
    stale = live.keys() - desired.keys()  # one C-level pass; usually empty
    if not stale:
        return ()
    items = []
    for key, have in live.items():
        if key in stale:
            items.append(DriftItem(STALE_VS, key, service=have.service, details=_vs_details(have)))
            for rs in have.real_servers.values():
                kind = DRAINING_RS if rs.weight == 0 else STALE_RS
                items.append(DriftItem(kind, key, rs.key, rs.weight, have.service, details=_OF_STALE_VS))
    return tuple(items)


def _collect(per_vs: Iterable[tuple[DriftItem, ...]]) -> Diff:
    out = Diff(*([] for _ in KINDS))
    for items in per_vs:
        for item in items:
            out.of(item.kind).append(item)
    return out


def _with_verdicts(out: Diff, desired: Table, desired_rejected: Mapping[VirtualServerKey, str],
                   live: Table, live_rejected: Mapping[VirtualServerKey, str],
                   services: Mapping[VirtualServerKey, VirtualServer] | None) -> Diff:
    """Add what the rules' no-endpoint verdicts say (module docstring). Work: one lookup
    per verdict on either side; both are usually a handful (Services without endpoints)."""
    if not live_rejected and not desired_rejected:
        return out
    rejected = []
    for key, verdict in live_rejected.items():
        if key in desired_rejected:
            continue  # kube-proxy's own verdict for a frontend without usable endpoints
        want = desired.get(key)
        if want is None:
            continue  # refuses traffic to a frontend nothing desires: harmless, not drift
        rejected.append(DriftItem(REJECTED_VS, key, service=want.service,
                                  details=(("verdict", verdict), ("real_servers", len(want.real_servers)))))
    if rejected:
        out.of(REJECTED_VS).extend(rejected)
        said = {item.vs for item in rejected}
        missing = out.of(MISSING_VS)
        missing[:] = [item for item in missing if item.vs not in said]
    for key, verdict in desired_rejected.items():
        if key not in live_rejected and key not in live and key not in desired:
            owner = services.get(key) if services is not None else None
            out.of(MISSING_VS).append(DriftItem(MISSING_VS, key, service=owner.service if owner else None,
                                                details=(("verdict", verdict), ("real_servers", 0))))
    return out


_NONE: Mapping = MappingProxyType({})


def diff_tables(desired: Table, live: Table, desired_rejected: Mapping[VirtualServerKey, str] = _NONE,
                live_rejected: Mapping[VirtualServerKey, str] = _NONE,
                services: Mapping[VirtualServerKey, VirtualServer] | None = None) -> Diff:
    """Classify every difference between the desired and the live table.

    ``desired_rejected`` / ``live_rejected``: the frontends the rules should and do
    refuse ("reject" or "drop"; empty for IPVS). ``services``: every desired frontend,
    verdict-only ones included, to name the Service of a missing verdict.
    """
    get = live.get
    per_vs = [_compare(key, want, get(key)) for key, want in desired.items()]
    per_vs.append(_stale_items(desired, live))
    out = _with_connections(_collect(per_vs), live)
    return _with_verdicts(out, desired, desired_rejected, live, live_rejected, services)


class TableDiffer:
    """``diff_tables`` for a table compared again and again (once per scrape).

    Both sides keep their objects while nothing changes: the desired store
    replaces only the virtual servers of a Service that changed, and the IPVS
    reader returns the same object for a record whose text, counters aside, is
    the same. So a virtual server whose desired and live objects are the ones of
    the last call has the same differences, and is not compared again: per scrape the work is
    two lookups and an identity check per virtual server, plus a real comparison
    of what changed. The memo holds only the current desired table's objects.
    """

    def __init__(self) -> None:
        # By id() of the desired object, which the entry keeps alive (so the id is not
        # reused): an int hashes for free, a VirtualServerKey tuple is hashed anew each time.
        self._memo: dict[int, tuple[VirtualServer, VirtualServer | None, tuple[DriftItem, ...]]] = {}
        self.compared = 0  # virtual servers compared for real in the last call (the rest reused)

    def diff(self, desired: Table, live: Table, desired_rejected: Mapping[VirtualServerKey, str] = _NONE,
             live_rejected: Mapping[VirtualServerKey, str] = _NONE,
             services: Mapping[VirtualServerKey, VirtualServer] | None = None) -> Diff:
        memo = self._memo
        get = live.get
        remembered = memo.get
        per_vs = []
        compared = 0
        # A hit writes nothing (no allocation): only what changed is compared and stored.
        for key, want in desired.items():
            have = get(key)
            last = remembered(id(want))
            if last is not None and last[1] is have:
                items = last[2]
            else:
                items = _compare(key, want, have)
                memo[id(want)] = (want, have, items)
                compared += 1
            if items:
                per_vs.append(items)
        if len(memo) > len(desired):  # replaced or removed virtual servers
            for gone in memo.keys() - set(map(id, desired.values())):
                del memo[gone]
        per_vs.append(_stale_items(desired, live))  # cheap to describe: nothing to remember
        self.compared = compared
        out = _with_connections(_collect(per_vs), live)
        return _with_verdicts(out, desired, desired_rejected, live, live_rejected, services)


# --- over time ----------------------------------------------------------------


class ServiceDrift(NamedTuple):
    namespace: str
    service: str
    kind: str
    count: int


class DriftReport(NamedTuple):
    """What the metrics show after one comparison (all past the grace period)."""

    counts: dict[str, int]  # kind -> items drifted past grace
    oldest_seconds: dict[str, float]  # kind -> age of the oldest of them (0 when none)
    pending: dict[str, int]  # kind -> items still within grace
    services: list[ServiceDrift]  # drifted services, most items first, capped
    services_not_shown: int  # (namespace, service, kind) series beyond the cap
    stuck_draining: int  # draining at weight 0 with no connections for stuck_after seconds
    stuck_draining_items: list[DriftItem]


class DriftTracker:
    """Remembers when each difference was first seen; applies the grace period.

    ``update(diff, now)`` takes the time explicitly (monotonic seconds) so it
    is testable without clocks. An item is identified by its kind, virtual
    server and real server; one that is no longer in the diff is forgotten at
    once, so a difference that comes back starts a new grace period.

    Grace period: a difference younger than ``grace_period`` is a proxy doing
    its job (kube-proxy's IPVS sync runs every 30 s by default and takes
    seconds to tens of seconds with thousands of services, kubernetes issues
    73382 and 88212; kube-router took ~16 s per resync at 2.7K services,
    kube-router issue 962). The default of 60 s covers one late sync of
    either; the exporter sees API changes at about the time the proxy does.

    Stuck graceful termination: kube-proxy's graceful-termination manager
    deletes a weight-0 real server once its active and inactive connections
    reach 0, checking every minute (pkg/proxy/ipvs/graceful_termination.go).
    One left at weight 0 with no connections for ``stuck_after`` seconds
    (default three checks) means that loop is not running: the hang of
    kubernetes issue 71071.
    """

    def __init__(self, grace_period: float = 60.0, max_service_series: int = 200,
                 stuck_after: float = 180.0) -> None:
        self.grace_period = grace_period
        self.max_service_series = max_service_series
        self.stuck_after = stuck_after
        self._first_seen: dict[tuple, float] = {}
        self._idle_since: dict[tuple, float] = {}  # draining items with no connections, since when

    def update(self, diff: Diff, now: float) -> DriftReport:
        first_seen: dict[tuple, float] = {}
        idle_since: dict[tuple, float] = {}
        counts = dict.fromkeys(KINDS, 0)
        pending = dict.fromkeys(KINDS, 0)
        oldest = dict.fromkeys(KINDS, 0.0)
        per_service: dict[tuple[str, str], int] = {}
        stuck: list[DriftItem] = []
        for item in diff.items():
            ident = item.identity
            seen = self._first_seen.get(ident, now)
            first_seen[ident] = seen
            age = now - seen
            kind = item.kind
            if age < self.grace_period:
                pending[kind] += 1
            else:
                counts[kind] += 1
                if age > oldest[kind]:
                    oldest[kind] = age
                if item.service:
                    key = (item.service, kind)
                    per_service[key] = per_service.get(key, 0) + 1
            if kind == DRAINING_RS and not item.active_connections and not item.inactive_connections \
                    and item.details is not _OF_STALE_VS:
                idle = self._idle_since.get(ident, now)
                idle_since[ident] = idle
                if now - idle >= self.stuck_after:
                    stuck.append(item)
        self._first_seen = first_seen
        self._idle_since = idle_since

        ranked = sorted(per_service.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ranked[: self.max_service_series]
        services = []
        for (service, kind), count in shown:
            namespace, _, name = service.partition("/")
            services.append(ServiceDrift(namespace, name, kind, count))
        return DriftReport(counts, oldest, pending, services, len(ranked) - len(shown), len(stuck), stuck)

    def __len__(self) -> int:
        return len(self._first_seen)
