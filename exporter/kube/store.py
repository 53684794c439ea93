"""The cluster as this node needs it, kept compactly, and the desired table kept incrementally.

Public surface (what the drift collector and the latency follower use):

- ``KubeStore(api, node_name, proxy, node_ips)`` or ``KubeStore.from_settings(settings)``
  (raises ``KubeConfigError`` when there is no API access): ``start()`` (idempotent), ``stop()``,
  ``synced()``, ``wait_synced(timeout)``, ``snapshot()`` (the desired table,
  read-only, no copy), ``watch_status()`` (one ``WatchStatus`` per resource, for
  ``kubenode_kube_watch_up``), ``subscribe(callback)`` (``ChangeEvent`` per
  changed service: before/after virtual server keys and the slice's trigger time),
  ``refresh_node_addresses()``; ``watch_up_family(store.watch_status())`` for the metric.

  A collector would hold one store for the process:
  ``store = ctx.service("kube", lambda: KubeStore.from_settings(ctx.settings)); store.start()``,
  and per scrape read ``snap = store.snapshot()`` (``snap.synced`` False: do not
  report drift yet) and ``snap.table`` / ``snap.by_service`` / ``snap.real_servers``.
- ``ClusterState``: the same state without any I/O; reflectors feed it through
  ``replace``/``upsert``/``delete``. Tests and the offline tools can use it alone.

What is kept: Services and EndpointSlices as the compact tuples of
``exporter.kube.objects``, slices indexed by their Service, this node's zone,
and the desired virtual servers with the keys each Service owns. A change to
one Service or one of its slices recomputes that Service's virtual servers
only (the model's ``virtual_servers_for_service``), never the whole table;
a change of this node's zone or addresses recomputes every Service.

Snapshots are copy-on-write: ``snapshot()`` hands out the current dicts
read-only and marks them shared; the next change copies them once before
writing. A scrape therefore costs nothing when nothing changed, and at most
one dict copy per scrape when something did.

If two Services claim the same virtual server (a shared externalIP:port), the
one with the smallest ``namespace/name`` owns it, as in ``desired.desired_table``
(so the live and the offline tables agree); when the owner lets go, the next
claimant takes over without a recompute.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, Iterable, NamedTuple

from prometheus_client.core import GaugeMetricFamily

from exporter.dataplane import Interner, VirtualServer, VirtualServerKey
from exporter.kube import objects
from exporter.kube.client import (ApiClient, Backoff, RateLimitedLog, Reflector, WatchStatus,
                                  endpointslices_resource, node_resource, services_resource)
from exporter.kube import desired, desired_rules
from exporter.readers import netaddrs

log = logging.getLogger("exporter.kube.store")

SERVICES, ENDPOINTSLICES, NODES = "services", "endpointslices", "nodes"
RESOURCES = (SERVICES, ENDPOINTSLICES, NODES)

# model(service, slices, node_facts, proxy, fwmarks=...) -> list[VirtualServer], the proxy's in its
# mode: desired_rules.model_for(proxy, mode). In nftables/iptables mode the virtual servers carry
# rule flags; desired_rules.rules_view(snapshot.table.values()) is the live reader's shape.
Model = Callable[..., list]


class ChangeEvent(NamedTuple):
    """One Service whose desired virtual servers may have changed."""

    service: str  # namespace/name
    trigger_time: float | None  # the slice's last-change-trigger-time (Unix s), when a slice changed
    observed: float  # Unix time the store applied the change
    before: frozenset[VirtualServerKey]  # the Service's virtual servers before the change
    after: frozenset[VirtualServerKey]  # and after it


class DesiredSnapshot(NamedTuple):
    """The desired table at one moment. Read-only views: do not hold them across many scrapes."""

    table: Mapping[VirtualServerKey, VirtualServer]
    by_service: Mapping[str, tuple[VirtualServerKey, ...]]  # namespace/name -> its virtual servers
    real_servers: int  # sum of real servers over the table
    generation: int  # increases with every applied change
    synced: bool  # every resource has been listed and the table built


def _keys_of(found: VirtualServerKey | tuple[VirtualServerKey, ...]) -> tuple[VirtualServerKey, ...]:
    return (found,) if type(found) is VirtualServerKey else found


class KeysByService(Mapping):
    """Read-only ``namespace/name -> tuple of its virtual server keys`` over the store's dict,
    which keeps a Service's only key bare."""

    __slots__ = ("_keys",)

    def __init__(self, keys: dict) -> None:
        self._keys = keys

    def __getitem__(self, service: str) -> tuple[VirtualServerKey, ...]:
        return _keys_of(self._keys[service])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ClusterState:
    """Services, slices and this node; the desired table per Service. Thread-safe.

    Implements the reflectors' ``Handler``. Until each of services,
    endpointslices and nodes has been listed once, changes are only stored; the
    table is built once when the last of them arrives (one model call per Service).
    """

    def __init__(self, node_name: str, proxy: str = "kube-proxy",
                 node_addresses: Iterable[str] = (), *,
                 model: Model = desired.virtual_servers_for_service,
                 wait_for: Iterable[str] = RESOURCES) -> None:
        self._model = model
        self.node_name = node_name
        self.proxy = proxy
        self._lock = threading.Lock()
        self._services: dict[str, objects.Service] = {}
        self._slices: dict[str, objects.EndpointSlice] = {}
        # Most Services have one slice: kept bare, else a tuple of them (10,000 small dicts
        # cost 2 MB, 1-tuples 0.6 MB, bare slices nothing). Read with _service_slices.
        self._slices_by_service: dict[str, objects.EndpointSlice | tuple[objects.EndpointSlice, ...]] = {}
        self._node: objects.Node | None = None
        # Empty: the model's choice from the Node object (kube-router: its primary IP).
        self._node_addresses: tuple[str, ...] = tuple(node_addresses)
        self._facts = self._make_facts()
        self._pending = set(wait_for)  # resources not listed yet
        self._built = False
        # desired state; _table and _vs_keys are shared with snapshots (copy on write)
        self._table: dict[VirtualServerKey, VirtualServer] = {}
        # A Service's one virtual server kept bare, more as a tuple (10,000 1-tuples: 0.6 MB);
        # read with _keys_of, handed out as KeysByService.
        self._vs_keys: dict[str, VirtualServerKey | tuple[VirtualServerKey, ...]] = {}
        # Who owns a virtual server of the table is its own ``service`` (the models name
        # their Service): kept apart only where a model said otherwise, not a dict entry each.
        self._other_owner: dict[VirtualServerKey, str] = {}
        # Only virtual servers two or more Services claim: every claimant's version.
        self._contested: dict[VirtualServerKey, dict[str, VirtualServer]] = {}
        self._fwmarks: dict[int, str] = {}  # kube-router DSR marks handed out (desired.kube_router_fwmark)
        self._real_servers = 0
        self._shared = False
        self._generation = 0
        self._last_snapshot: DesiredSnapshot | None = None
        self._subscribers: list[Callable[[ChangeEvent], None]] = []
        self._model_errors = 0
        self._model_log = RateLimitedLog(log)

    # --- public ---------------------------------------------------------------

    def snapshot(self) -> DesiredSnapshot:
        """The current desired table; never waits behind a long update.

        While a writer holds the state (the initial build, a relist, a zone change
        recomputing every Service: seconds at 10,000 Services) the previous
        snapshot is returned, consistent and at most that update old.
        """
        if not self._lock.acquire(blocking=self._last_snapshot is None):
            return self._last_snapshot
        try:
            self._shared = True
            self._last_snapshot = DesiredSnapshot(
                MappingProxyType(self._table), KeysByService(self._vs_keys),
                self._real_servers, self._generation, self._built)
            return self._last_snapshot
        finally:
            self._lock.release()

    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` after each change (on a reflector thread: keep it cheap).

        Events start after the table is first built; the initial build is not a change.
        Returns a function that unsubscribes.
        """
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def slices_by_service(self) -> dict[str, list[objects.EndpointSlice]]:
        """Every Service's slices, as ``desired.slices_by_service`` gives them (a copy: tests, benches)."""
        with self._lock:
            return {key: list(self._service_slices(key)) for key in self._slices_by_service}

    def services(self) -> list[objects.Service]:
        """Every Service now (a copy of the list; the objects are immutable)."""
        with self._lock:
            return list(self._services.values())

    def built(self) -> bool:
        return self._built

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"services": len(self._services), "endpointslices": len(self._slices),
                    "virtual_servers": len(self._table), "real_servers": self._real_servers,
                    "model_errors": self._model_errors}

    def node(self) -> Any:
        """The NodeFacts the model is called with now."""
        return self._facts

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        """This host's addresses for NodePort virtual servers; a change recomputes every Service."""
        new = tuple(addresses)
        with self._lock:
            if new == self._node_addresses:
                return
            self._node_addresses = new
            events = self._node_changed()
        self._emit(events)

    # --- Handler (called by reflectors) ---------------------------------------

    def replace(self, resource: str, items: dict[str, Any]) -> None:
        with self._lock:
            if resource == NODES:
                node = items.get(self.node_name)
                if node is None:
                    # Local traffic policies and topology depend on knowing which node this is.
                    log.warning("Node %r not found in the API: check --node-name (or NODE_NAME); "
                                "endpoints will not be recognised as local", self.node_name)
                self._node = node
                affected: set[str] | None = None
            else:
                affected = set()
                kept = self._services if resource == SERVICES else self._slices
                for key in [k for k in kept if k not in items]:
                    affected |= self._remove(resource, key)
                for key, item in items.items():
                    old = kept.get(key)
                    if old is not None and old == item:
                        # Compared by what is kept, not by resourceVersion (not kept: a string
                        # per object): a relist recomputes only what changed for the model.
                        continue
                    affected |= self._put(resource, key, item)
            self._pending.discard(resource)
            if not self._built:
                events = self._build_if_ready()
            elif affected is None:
                events = self._node_changed()
            else:
                events = [self._recompute(key, None) for key in affected]
        self._emit(events)

    def upsert(self, resource: str, key: str, item: Any) -> None:
        with self._lock:
            if resource == NODES:
                if key != self.node_name:
                    return
                self._node = item
                events = self._node_changed() if self._built else []
            else:
                affected = self._put(resource, key, item)
                trigger = item.trigger_time if resource == ENDPOINTSLICES else None
                events = [self._recompute(k, trigger) for k in affected] if self._built else []
        self._emit(events)

    def delete(self, resource: str, key: str) -> None:
        with self._lock:
            if resource == NODES:
                if key != self.node_name:
                    return
                self._node = None
                events = self._node_changed() if self._built else []
            else:
                old = self._slices.get(key) if resource == ENDPOINTSLICES else None
                affected = self._remove(resource, key)
                trigger = old.trigger_time if old is not None else None
                events = [self._recompute(k, trigger) for k in affected] if self._built else []
        self._emit(events)

    # --- internals (lock held) --------------------------------------------------

    def _put(self, resource: str, key: str, item: Any) -> set[str]:
        """Store an object; return the Service keys whose desired state it affects."""
        if resource == SERVICES:
            self._services[key] = item
            return {key}
        affected = self._remove_slice(key)
        self._slices[key] = item
        service_key = item.service_key
        if service_key is not None:
            siblings = self._service_slices(service_key)
            self._slices_by_service[service_key] = siblings + (item,) if siblings else item
            affected.add(service_key)
        return affected

    def _remove(self, resource: str, key: str) -> set[str]:
        if resource == SERVICES:
            return {key} if self._services.pop(key, None) is not None else set()
        return self._remove_slice(key)

    def _remove_slice(self, key: str) -> set[str]:
        old = self._slices.pop(key, None)
        if old is None or old.service_key is None:
            return set()
        siblings = self._service_slices(old.service_key)
        if siblings:
            rest = tuple(s for s in siblings if s.key != old.key)
            if len(rest) > 1:
                self._slices_by_service[old.service_key] = rest
            elif rest:
                self._slices_by_service[old.service_key] = rest[0]
            else:
                del self._slices_by_service[old.service_key]
        return {old.service_key}

    def _make_facts(self) -> desired.NodeFacts:
        return desired.node_facts(self.node_name, self._node, self._node_addresses, self.proxy)

    def _node_changed(self) -> list[ChangeEvent]:
        facts = self._make_facts()
        if facts == self._facts:
            return []
        self._facts = facts
        if not self._built:
            return []
        return [self._recompute(key, None) for key in set(self._services) | set(self._vs_keys)]

    def _build_if_ready(self) -> list[ChangeEvent]:
        if self._pending:
            return []
        self._facts = self._make_facts()
        for key in self._services:
            self._recompute(key, None)
        self._built = True
        log.info("desired table built: %d services, %d virtual servers, %d real servers",
                 len(self._services), len(self._table), self._real_servers)
        return []

    def _writable(self) -> None:
        if self._shared:
            self._table = dict(self._table)
            self._vs_keys = dict(self._vs_keys)
            self._shared = False

    def _recompute(self, key: str, trigger_time: float | None) -> ChangeEvent:
        service = self._services.get(key)
        new: list[VirtualServer] = []
        if service is not None:
            slices = list(self._service_slices(key))
            try:
                new = self._model(service, slices, self._facts, self.proxy, fwmarks=self._fwmarks)
            except Exception as err:  # noqa: BLE001 - one odd Service must not stop the others
                self._model_errors += 1
                self._model_log.warning("desired state of %s not computed: %s: %s",
                                        key, type(err).__name__, err)
                new = []
        self._writable()
        old_keys = _keys_of(self._vs_keys.get(key, ()))
        for vs_key in old_keys:
            self._release(vs_key, key)
        new_keys = []
        for vs in new:
            if vs.key in new_keys:
                continue
            self._claim(vs, key)
            new_keys.append(vs.key)
        if new_keys:
            self._vs_keys[key] = new_keys[0] if len(new_keys) == 1 else tuple(new_keys)
        else:
            self._vs_keys.pop(key, None)
        self._generation += 1
        return ChangeEvent(key, trigger_time, time.time(), frozenset(old_keys), frozenset(new_keys))

    def _service_slices(self, key: str) -> tuple[objects.EndpointSlice, ...]:
        found = self._slices_by_service.get(key, ())
        return (found,) if type(found) is objects.EndpointSlice else found

    def _owner(self, vs_key: VirtualServerKey) -> str | None:
        """The Service whose virtual server the table holds for ``vs_key``, or None."""
        vs = self._table.get(vs_key)
        if vs is None:
            return None
        return self._other_owner.get(vs_key, vs.service)

    def _set(self, vs_key: VirtualServerKey, vs: VirtualServer | None, owner: str | None) -> None:
        previous = self._table.get(vs_key)
        if previous is not None:
            self._real_servers -= len(previous.real_servers)
        if vs is None:
            self._table.pop(vs_key, None)
            self._other_owner.pop(vs_key, None)
        else:
            self._table[vs_key] = vs
            if vs.service == owner:
                self._other_owner.pop(vs_key, None)
            else:
                self._other_owner[vs_key] = owner
            self._real_servers += len(vs.real_servers)

    def _claim(self, vs: VirtualServer, key: str) -> None:
        owner = self._owner(vs.key)
        if owner is None:
            self._set(vs.key, vs, key)
            return
        claims = self._contested.setdefault(vs.key, {owner: self._table[vs.key]})
        claims[key] = vs
        winner = min(claims)
        self._set(vs.key, claims[winner], winner)

    def _release(self, vs_key: VirtualServerKey, key: str) -> None:
        claims = self._contested.get(vs_key)
        if claims is None:
            if self._owner(vs_key) == key:
                self._set(vs_key, None, None)
            return
        claims.pop(key, None)
        if self._owner(vs_key) == key:
            winner = min(claims)
            self._set(vs_key, claims[winner], winner)
        if len(claims) == 1:
            del self._contested[vs_key]

    def _emit(self, events: list[ChangeEvent]) -> None:
        if not events:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            for event in events:
                try:
                    callback(event)
                except Exception:  # noqa: BLE001 - a subscriber's bug must not stop the watch
                    log.exception("change subscriber failed")


def _configured_mode(settings: Any) -> str:
    values = getattr(settings, "values", {})
    mode = values.get("proxy-mode") if isinstance(values, dict) else None
    return mode if mode in desired_rules.MODES else desired_rules.MODE_IPVS


class KubeStore:
    """ClusterState fed by three reflectors: Services, EndpointSlices and this node's Node.

    The model is the proxy's in its mode (``desired_rules.model_for(proxy, mode)``;
    mode ipvs, nftables or iptables); one table per store whatever the mode.

    NodePort addresses: ``node_ips`` (``--node-ip``) when given; else for
    kube-proxy in IPVS mode this host's addresses (``readers.netaddrs``), re-read
    every ``address_refresh`` seconds; else the Node's (kube-router: its primary
    IP, ``desired.node_facts``). The nftables and iptables models match NodePorts
    on every node-port address and need none of them.
    """

    def __init__(self, api: ApiClient, node_name: str, proxy: str = "kube-proxy",
                 node_ips: Iterable[str] = (), *, mode: str = desired_rules.MODE_IPVS,
                 model: Model | None = None,
                 page_size: int = 500,
                 watch_timeout: int = 300, backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 down_after: float = 60.0, address_refresh: float = 30.0,
                 host_addresses: Callable[[], tuple[str, ...]] = netaddrs.host_nodeport_addresses) -> None:
        self.api = api
        self.mode = mode
        if model is None:
            model = desired_rules.model_for(proxy, mode)
        node_ips = tuple(node_ips)
        self._host_addresses = (host_addresses if not node_ips and proxy == "kube-proxy"
                                and mode == desired_rules.MODE_IPVS else None)
        initial = node_ips
        if self._host_addresses is not None:
            # Unreadable interfaces leave it empty: the model then falls back to the Node's addresses.
            initial = self._read_host_addresses() or ()
        self.state = ClusterState(node_name, proxy, initial, model=model)
        self.address_refresh = address_refresh
        self._stopped = threading.Event()
        self._refresher: threading.Thread | None = None
        malformed_log = RateLimitedLog(logging.getLogger("exporter.kube.client"))
        # Equal port specs and endpoint states of every kept object share one tuple.
        self._intern = Interner()
        self.reflectors = {
            resource.name: Reflector(api, resource, self.state, page_size=page_size,
                                     watch_timeout=watch_timeout,
                                     backoff=Backoff(backoff_base, backoff_cap),
                                     down_after=down_after, malformed_log=malformed_log)
            for resource in (services_resource(self._intern), endpointslices_resource(self._intern),
                             node_resource(node_name))
        }

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "KubeStore":
        """Built from the exporter's settings; KubeConfigError when there is no API access.

        ``mode``: the proxy mode found on this node; without it, the settings' concrete
        ``proxy-mode`` (ipvs, nftables, iptables), else ipvs. An ``auto`` mode is the
        caller's to resolve before building the store.
        """
        proxy = settings.get("proxy")
        mode = kwargs.pop("mode", None) or _configured_mode(settings)
        if "model" not in kwargs:
            flags = (desired.kube_router_flags_from(settings.get) if proxy == desired.KUBE_ROUTER
                     else desired.KUBE_ROUTER_DEFAULT_FLAGS)
            kwargs["model"] = desired_rules.model_for(proxy, mode, flags)
        kwargs["mode"] = mode
        api = ApiClient.from_settings(settings.get("kubeconfig"))
        return cls(api, resolve_node_name(settings.get("node-name")), settings.get("proxy"),
                   settings.get("node-ip") or (), **kwargs)

    def _read_host_addresses(self) -> tuple[str, ...] | None:
        try:
            return self._host_addresses()
        except Exception as err:  # noqa: BLE001 - keep the last known addresses
            log.warning("NodePort addresses not refreshed: %s", err)
            return None

    def refresh_node_addresses(self) -> None:
        """Re-read this host's addresses now (kube-proxy without --node-ip); else nothing."""
        if self._host_addresses is None:
            return
        addresses = self._read_host_addresses()
        if addresses is not None:
            self.state.set_node_addresses(addresses)

    def _refresh_loop(self) -> None:
        while not self._stopped.wait(self.address_refresh):
            self.refresh_node_addresses()

    def start(self) -> None:
        for reflector in self.reflectors.values():
            reflector.start()
        if self._host_addresses is not None and self.address_refresh > 0 and self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop, name="node-addresses", daemon=True)
            self._refresher.start()

    def stop(self) -> None:
        self._stopped.set()
        for reflector in self.reflectors.values():
            reflector._stop.set()  # all at once, then wait for each
        for reflector in self.reflectors.values():
            reflector.stop()
        if self._refresher is not None:
            self._refresher.join(5)
        self.api.close()

    def synced(self) -> bool:
        """Every resource listed, its state current (no relist pending), the table built."""
        return self.state.built() and all(r.status().synced for r in self.reflectors.values())

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.synced():
                return True
            time.sleep(0.02)
        return self.synced()

    def snapshot(self) -> DesiredSnapshot:
        snap = self.state.snapshot()
        return snap._replace(synced=snap.synced and self.synced())

    def services(self) -> list[objects.Service]:
        return self.state.services()

    def watch_status(self) -> dict[str, WatchStatus]:
        return {name: r.status() for name, r in self.reflectors.items()}

    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Callable[[], None]:
        return self.state.subscribe(callback)


def watch_up_family(statuses: Mapping[str, WatchStatus]) -> GaugeMetricFamily:
    """``kubenode_kube_watch_up{resource}`` from ``KubeStore.watch_status()``.

    1 when the resource's last LIST succeeded and its watch is connected or
    reconnecting within the reflector's ``down_after``; 0 when there is no
    synced state (never listed, or a 410 whose relist has not succeeded yet)
    or the watch has been failing for longer than that.
    """
    family = GaugeMetricFamily(
        "kubenode_kube_watch_up",
        "1 when the resource is listed and its watch connected or reconnecting within backoff, else 0.",
        labels=["resource"])
    for name in sorted(statuses):
        family.add_metric([name], 1.0 if statuses[name].up else 0.0)
    return family


def resolve_node_name(configured: str | None, environ: Mapping[str, str] | None = None) -> str:
    """--node-name, else $NODE_NAME, else the host name (the contract's order)."""
    env = os.environ if environ is None else environ
    return configured or env.get("NODE_NAME") or socket.gethostname()
