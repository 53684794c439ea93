"""Plain data for a load-balancing table: virtual servers and their real servers.

The same shapes describe the live IPVS table (``exporter.readers.ipvs``) and the
table a proxy should have programmed (``exporter.kube.desired``), so the diff
compares like with like. Nothing here knows about IPVS syscalls or Kubernetes.

Addresses are text in their compressed form (``10.0.0.1``, ``fd00::1``), which is
how ``ipaddress`` prints them, so desired and live keys hash the same.
"""

from __future__ import annotations

from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from typing import Iterable, Iterator, NamedTuple


class VirtualServerKey(NamedTuple):
    """Identity of a virtual server: (protocol, address, port), or a fwmark."""

    protocol: str | None  # "TCP", "UDP", "SCTP"; None for a fwmark service
    address: str | None
    port: int | None
    fwmark: int | None = None

    @classmethod
    def for_fwmark(cls, fwmark: int) -> "VirtualServerKey":
        return cls(None, None, None, fwmark)

    def sort_key(self) -> tuple:
        # Contract order: (protocol, address, port); fwmark services after the rest.
        if self.fwmark is not None:
            return (1, "", "", 0, self.fwmark)
        return (0, self.protocol, _address_order(self.address), self.port, 0)

    def __str__(self) -> str:
        if self.fwmark is not None:
            return f"FWM {self.fwmark}"
        host = f"[{self.address}]" if self.address and ":" in self.address else self.address
        return f"{self.protocol} {host}:{self.port}"


class RealServer(NamedTuple):
    address: str
    port: int
    weight: int = 1
    forward: str = "Masq"  # Masq, Local, Route, Tunnel (ipvsadm's names)
    # No connection counters: a live table keeps them apart (``IPVSTable.connections``)
    # so that a real server is the same object for as long as only its counters move.

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


_new_tuple = tuple.__new__  # NamedTuple construction without its Python-level __new__


class RealServers(Mapping):
    """Real servers of one virtual server, read as the mapping ``(address, port) -> RealServer``
    a table holds, desired or live.

    At 50,000 endpoints a dict of key tuples and RealServer tuples per virtual server cost
    11.75 MiB on the desired side and as much again on the live side, where one flat tuple
    ``(address, port, address, port, ...)`` per virtual server costs a fifth of it. The
    weight and forwarding method are kept once when all real servers agree (every desired
    table, nearly every live one); a live one whose real servers differ keeps a tuple of
    each (``weights``, ``forwards``) beside the flat one. Virtual servers of one Service
    share one (its NodePorts and external IPs). The ``RealServer`` values and key tuples
    are made when read. Immutable.

    Walking it (``for key in``, ``items()``, ``values()``, ``len``) is what the diff does;
    a lookup by key scans a small one and indexes a large one once (kept: only a reader
    that asks pays for it). Equal to any mapping with the same items, a dict included.
    """

    __slots__ = ("_flat", "weight", "forward", "_weights", "_forwards", "_index")

    def __init__(self, endpoints: Iterable[tuple[str, int]] = (), weight: int = 1,
                 forward: str = "Masq") -> None:
        flat: list = []
        for address, port in dict.fromkeys(endpoints):  # the first of duplicates, in order
            flat += (address, port)
        self._flat = tuple(flat)
        self.weight = weight
        self.forward = forward
        self._weights = self._forwards = None
        self._index: dict | None = None

    @classmethod
    def of_flat(cls, flat: tuple, weights: list[int], forwards: list[str]) -> "RealServers":
        """From a flat ``(address, port, ...)`` tuple without duplicates (the caller checked)
        and each real server's weight and forwarding method, in the same order: kept once
        when all agree. A parse's constructor: no copy, no check beyond that."""
        out = object.__new__(cls)
        out._flat = flat
        out._index = None
        first = weights[0] if weights else 1
        if weights.count(first) == len(weights):
            out.weight, out._weights = first, None
        else:
            out.weight, out._weights = first, tuple(weights)
        first = forwards[0] if forwards else "Masq"
        if forwards.count(first) == len(forwards):
            out.forward, out._forwards = first, None
        else:
            out.forward, out._forwards = first, tuple(forwards)
        return out

    def __len__(self) -> int:
        return len(self._flat) >> 1

    def __iter__(self) -> Iterator[tuple[str, int]]:
        flat = self._flat
        return zip(flat[::2], flat[1::2])

    def keys(self) -> "_Keys":  # type: ignore[override]
        return _Keys(self)

    def _real_server(self, i: int) -> RealServer:
        """The real server at position ``i`` of the flat tuple (its address)."""
        flat = self._flat
        weight = self.weight if self._weights is None else self._weights[i >> 1]
        forward = self.forward if self._forwards is None else self._forwards[i >> 1]
        return _new_tuple(RealServer, (flat[i], flat[i + 1], weight, forward))

    def _values(self) -> Iterator[RealServer]:
        flat = self._flat
        if self._weights is None and self._forwards is None:
            tail = (self.weight, self.forward)
            return (_new_tuple(RealServer, (flat[i], flat[i + 1]) + tail) for i in range(0, len(flat), 2))
        return map(self._real_server, range(0, len(flat), 2))

    def values(self) -> "_Values":  # type: ignore[override]
        return _Values(self)

    def items(self) -> "_Items":  # type: ignore[override]
        return _Items(self)

    def uniform_weight(self) -> int | None:
        """The weight every real server has, or None when they differ."""
        return self.weight if self._weights is None else None

    def same_keys(self, other: "RealServers") -> bool:
        """Whether ``other`` has the same real servers in the same order (one C-level compare)."""
        return self._flat == other._flat

    def _find(self, key) -> int:
        """Position of ``key``'s address in the flat tuple, or -1."""
        flat = self._flat
        if len(flat) <= 16:
            for i in range(0, len(flat), 2):
                if flat[i + 1] == key[1] and flat[i] == key[0]:
                    return i
            return -1
        if self._index is None:
            self._index = {k: 2 * i for i, k in enumerate(zip(flat[::2], flat[1::2]))}
        return self._index.get(key, -1)

    def __getitem__(self, key) -> RealServer:
        i = self._find(key) if isinstance(key, tuple) and len(key) == 2 else -1
        if i < 0:
            raise KeyError(key)
        return self._real_server(i)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        return isinstance(key, tuple) and len(key) == 2 and self._find(key) >= 0

    def __eq__(self, other) -> bool:
        if isinstance(other, RealServers) and self._flat == other._flat:
            return (self.weight == other.weight and self.forward == other.forward
                    and self._weights == other._weights and self._forwards == other._forwards)
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        return all(other.get(key) == rs for key, rs in self.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RealServers({dict(self.items())!r})"


class _Keys(KeysView):
    """A RealServers' keys, a set view as a dict's is."""

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._mapping)


class _Values(ValuesView):
    """A RealServers' values, made straight from its flat tuple (no lookup per key)."""

    def __iter__(self) -> Iterator[RealServer]:
        return self._mapping._values()


class _Items(ItemsView):
    """A RealServers' items, made straight from its flat tuple; a set view as a dict's is."""

    def __iter__(self) -> Iterator[tuple[tuple[str, int], RealServer]]:
        return ((rs[:2], rs) for rs in self._mapping._values())


NO_REAL_SERVERS = RealServers()


class VirtualServer(NamedTuple):
    key: VirtualServerKey
    scheduler: str = "rr"
    persistent_timeout: int | None = None  # seconds; None when not persistent
    # RealServers (desired and live tables), or any mapping by (address, port) (hand-made ones).
    real_servers: Mapping[tuple[str, int], RealServer] = {}
    service: str | None = None  # "namespace/name" where known (desired tables)
    flags: tuple[str, ...] = ()  # extra scheduler/service flags as the kernel names them
    persistent_netmask: str | None = None


# A whole table: virtual servers by key.
Table = dict[VirtualServerKey, VirtualServer]


class Interner:
    """One shared object for each distinct value handed to it: at 10,000 Services the same
    port spec or endpoint state repeats tens of thousands of times, and a tuple each is
    megabytes. The owner (a store, a parse) keeps it; nothing here is module-level.

    Past ``limit`` distinct values it starts over: later equal values share a new object,
    earlier ones keep theirs. Sharing is lost, never correctness (values are immutable and
    compared by value), and the table cannot grow with churn.
    """

    __slots__ = ("_values", "limit")

    def __init__(self, limit: int = 1 << 16) -> None:
        self._values: dict = {}
        self.limit = limit

    def __call__(self, value):
        found = self._values.get(value)
        if found is None:
            if len(self._values) >= self.limit:
                self._values.clear()
            self._values[value] = found = value
        return found

    def __len__(self) -> int:
        return len(self._values)


def _address_order(address: str | None) -> tuple:
    """Sort IPv4 before IPv6 and numerically within each, not as strings."""
    import ipaddress

    if address is None:
        return (0, 0)
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


def sorted_virtual_servers(table: Table) -> list[VirtualServer]:
    return sorted(table.values(), key=lambda vs: vs.key.sort_key())


def sorted_real_servers(vs: VirtualServer) -> list[RealServer]:
    return sorted(vs.real_servers.values(), key=lambda rs: (_address_order(rs.address), rs.port))


# --- The live dataplane, in any proxy mode ------------------------------------------------
# Drift is the same question in every kube-proxy mode (IPVS, nftables, iptables): a frontend
# is a virtual server, an endpoint a real server. One reader per mode answers it in these
# shapes; the drift collector and `diff` talk only to them.

MODES = ("ipvs", "nftables", "iptables")

# A live read this recent is this scrape's: collectors of one scrape (run side by side)
# share it, and scrapes are further apart than this.
SCRAPE_WINDOW = 0.5  # seconds


class DataplaneUnavailable(Exception):
    """This node does not run that dataplane (no ip_vs module, no kube-proxy table)."""


class LiveRead(NamedTuple):
    """One read of a node's live dataplane.

    ``unread`` non-empty means the read was not whole: no drift figures may be
    served over it (never "no drift" over what was not read).
    """

    table: Table  # every frontend that was read fully
    rejected: dict  # VirtualServerKey -> "reject" | "drop": frontends the rules refuse (empty for IPVS)
    unread: tuple[str, ...]  # one line per thing not read; the first is the reason given
    read_seconds: float  # this call's own work (a cheap "nothing changed" check included)


class DataplaneReader:
    """What the drift collector owns, one per mode.

    ``read(max_age)`` returns the live dataplane, reusing a read not older than
    ``max_age`` seconds (so collectors of one scrape share it), and raises
    ``DataplaneUnavailable`` when the node lacks the dataplane. Readers are
    objects: their caches belong to them, never to their module.
    """

    mode: str = ""

    def read(self, max_age: float = SCRAPE_WINDOW) -> LiveRead:
        raise NotImplementedError

    def read_following(self, max_age: float = SCRAPE_WINDOW) -> LiveRead:
        """``read`` for the latency follower, which waits on a change: a reader whose change
        check cannot see every change (iptables-legacy) looks sooner."""
        return self.read(max_age)

    def close(self) -> None:
        """Release sockets or threads."""
