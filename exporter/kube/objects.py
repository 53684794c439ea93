"""Compact, validated forms of the API objects the exporter keeps.

The watch and the offline commands both turn each Service, EndpointSlice and
Node into these small tuples at once and drop the rest of the object: at
10,000 Services what is kept per object decides the exporter's footprint.
A malformed object raises ``MalformedObject`` with a one-line reason; callers
log it and skip that object, never the whole list.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from exporter.dataplane import Interner

PROTOCOLS = ("TCP", "UDP", "SCTP")
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds; the API's default for ClientIP affinity
# Annotations some proxies read (topology mode, kube-router's per-service knobs).
KEPT_ANNOTATION_PREFIXES = ("service.kubernetes.io/", "kube-router.io/")


_PROTOCOL_CONSTANTS = {p: p for p in PROTOCOLS}
# One string each, not the decoder's copy per Service.
_SERVICE_TYPES = {t: t for t in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")}


def _intern(text: str) -> str:
    """One shared string for values repeated across thousands of objects (node
    names, zones, namespaces, port names): at 50,000 endpoints, a copy each
    from the JSON decoder is megabytes."""
    return sys.intern(text)


# Shares equal tuples (ports, endpoint states) among the objects one owner keeps:
# the store's, or one per ``parse_objects`` call.
Intern = Callable[[Any], Any]


class MalformedObject(ValueError):
    """An API object that cannot be used; the message names it and why."""


class ServicePort(NamedTuple):
    name: str
    protocol: str
    port: int
    node_port: int | None = None


class Service(NamedTuple):
    namespace: str
    # "namespace/name", interned: the store keys several maps and every virtual server by it,
    # and a slice's ``service_key`` is this same string. The name alone is read from it (one
    # string per Service kept, not three).
    key: str
    type: str = "ClusterIP"  # ClusterIP, NodePort, LoadBalancer, ExternalName
    cluster_ips: tuple[str, ...] = ()  # empty when headless or ExternalName
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    # status.loadBalancer.ingress IPs with their ipMode ("VIP", "Proxy" or None)
    load_balancer_ingress: tuple[tuple[str, str | None], ...] = ()
    # spec.loadBalancerSourceRanges as network text ("203.0.113.0/25"); unparsable ones dropped
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity_timeout: int | None = None  # seconds, when sessionAffinity is ClientIP
    external_traffic_local: bool = False
    internal_traffic_local: bool = False
    health_check_node_port: int | None = None
    traffic_distribution: str | None = None
    labels: tuple[tuple[str, str], ...] = ()  # only the labels proxies act on
    annotations: tuple[tuple[str, str], ...] = ()  # only KEPT_ANNOTATION_PREFIXES

    @property
    def name(self) -> str:
        return self.key[len(self.namespace) + 1:]

    def annotation(self, name: str) -> str | None:
        for key, value in self.annotations:  # a handful at most: a scan beats building a dict
            if key == name:
                return value
        return None

    def label(self, name: str) -> str | None:
        for key, value in self.labels:
            if key == name:
                return value
        return None


class EndpointPort(NamedTuple):
    name: str
    protocol: str
    port: int | None


class EndpointState(NamedTuple):
    """Everything about an endpoint but its addresses. A few distinct values cover a
    cluster (conditions x node x zone x hints), so the parse shares one per value."""

    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    hint_zones: tuple[str, ...] | None = None  # None: the endpoint has no zone hints
    hint_nodes: tuple[str, ...] | None = None  # None: the endpoint has no node hints
    # The object itself says ready: true or serving: true. ``ready``/``serving`` above carry the
    # API's defaults for an absent condition (absent ready = ready), as kube-proxy reads them;
    # kube-router reads an absent condition as false and needs this instead.
    stated_ready_or_serving: bool = True


class Endpoint(tuple):
    """An endpoint as one flat tuple ``(state, address, ...)``: a shared ``EndpointState``
    and its addresses, two slots for the usual one address where a tuple of ten fields and
    an addresses tuple took 168 bytes (at 50,000 endpoints, 5 MB). The state's fields
    read as the endpoint's own; ``addresses`` is a tuple, as before."""

    __slots__ = ()

    def __new__(cls, addresses: Iterable[str], state: EndpointState = EndpointState()) -> "Endpoint":
        return tuple.__new__(cls, (state, *addresses))

    @classmethod
    def of(cls, addresses: Iterable[str], **state: Any) -> "Endpoint":
        """An endpoint from the state's fields by name (tests, tools)."""
        return cls(addresses, EndpointState(**state))

    def __repr__(self) -> str:
        return f"Endpoint(addresses={self[1:]!r}, state={self[0]!r})"

    addresses = property(lambda self: self[1:])
    state = property(lambda self: self[0])
    ready = property(lambda self: self[0][0])
    serving = property(lambda self: self[0][1])
    terminating = property(lambda self: self[0][2])
    node_name = property(lambda self: self[0][3])
    zone = property(lambda self: self[0][4])
    hint_zones = property(lambda self: self[0][5])
    hint_nodes = property(lambda self: self[0][6])
    stated_ready_or_serving = property(lambda self: self[0][7])


class EndpointList(tuple):
    """A slice's endpoints as one flat tuple ``(state, address, ..., state, address, ...)``:
    each ``EndpointState`` followed by that endpoint's addresses. Read as a sequence of
    ``Endpoint`` (made when read): a tuple per endpoint on top of the slice's own was 72
    bytes each, 3.2 MB at 50,000 endpoints. Immutable; compares equal to a tuple of the
    same endpoints."""

    __slots__ = ()

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint]) -> "EndpointList":
        flat: list = []
        for ep in endpoints:
            flat += ep
        return tuple.__new__(cls, flat)

    def __iter__(self) -> Iterator[Endpoint]:
        new, one = tuple.__new__, None
        for item in tuple.__iter__(self):
            if type(item) is EndpointState:
                if one is not None:
                    yield new(Endpoint, one)
                one = [item]
            else:
                one.append(item)
        if one is not None:
            yield new(Endpoint, one)

    def __len__(self) -> int:
        return sum(1 for item in tuple.__iter__(self) if type(item) is EndpointState)

    def __getitem__(self, index):
        return tuple(self)[index]

    def __contains__(self, endpoint) -> bool:
        return any(ep == endpoint for ep in self)

    def __eq__(self, other) -> bool:
        if isinstance(other, EndpointList):
            return tuple.__eq__(self, other)
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __ne__(self, other) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return f"EndpointList({list(self)!r})"


class EndpointSlice(NamedTuple):
    namespace: str
    key: str  # "namespace/name": the name alone is read from it
    # "namespace/<the kubernetes.io/service-name label>", the same interned string as that
    # Service's key; None without the label.
    service_key: str | None
    address_type: str  # IPv4, IPv6, FQDN
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()  # an EndpointList when parsed
    trigger_time: float | None = None  # last-change-trigger-time, Unix seconds

    @property
    def name(self) -> str:
        return self.key[len(self.namespace) + 1:]

    @property
    def service_name(self) -> str | None:
        return None if self.service_key is None else self.service_key[len(self.namespace) + 1:]


class Node(NamedTuple):
    name: str
    zone: str | None = None
    addresses: tuple[str, ...] = ()  # status.addresses: InternalIPs, then ExternalIPs


# --- parsing -----------------------------------------------------------------


def _meta(obj: dict, kind: str) -> tuple[str, str, dict]:
    if not isinstance(obj, dict):
        raise MalformedObject(f"{kind} is not an object")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise MalformedObject(f"{kind} has no metadata.name")
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str):
        raise MalformedObject(f"{kind} {meta['name']} has a bad metadata.namespace")
    return _intern(namespace), meta["name"], meta


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedObject(f"{what} is not a mapping")
    return value


def _list(value: Any, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedObject(f"{what} is not a list")
    return value


def canonical_ip(text: Any, what: str) -> str:
    """Compressed text form of an IP address, or MalformedObject."""
    if not isinstance(text, str):
        raise MalformedObject(f"{what}: {text!r} is not an IP address")
    # Fast path for the common case (tens of thousands of endpoint addresses
    # per list): a dotted quad already in canonical form round-trips exactly.
    try:
        if socket.inet_ntoa(socket.inet_pton(socket.AF_INET, text)) == text:
            return text
    except OSError:
        pass
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise MalformedObject(f"{what}: {text!r} is not an IP address") from None


def _port(value: Any, what: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise MalformedObject(f"{what}: {value!r} is not a port number")
    return value


def _protocol(value: Any, what: str) -> str:
    proto = "TCP" if value is None else value
    if proto not in PROTOCOLS:
        raise MalformedObject(f"{what}: unknown protocol {value!r}")
    return _PROTOCOL_CONSTANTS[proto]  # the shared constant, not one string per port


def _kept(mapping: dict, prefixes: tuple[str, ...] | None = None, names: tuple[str, ...] = ()) -> tuple:
    return tuple(sorted(
        (k, str(v)) for k, v in mapping.items()
        if isinstance(k, str) and (k in names or (prefixes and k.startswith(prefixes)))
    ))


def parse_time(text: Any) -> float | None:
    """RFC 3339 (with or without fractional seconds, any precision) -> Unix seconds."""
    if not isinstance(text, str) or not text:
        return None
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    frac = ""
    head, dot, rest = value.partition(".")
    if dot:
        digits = ""
        for i, ch in enumerate(rest):
            if not ch.isdigit():
                digits, tail = rest[:i], rest[i:]
                break
        else:
            digits, tail = rest, ""
        frac = digits
        value = head + tail
    try:
        seconds = datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
    return seconds + (float("0." + frac) if frac else 0.0)


def _source_ranges(values: list) -> tuple[str, ...]:
    """loadBalancerSourceRanges as kube-proxy reads them (newBaseServiceInfo, serviceport.go):
    blanks trimmed (validation once let them through), a value that is not a CIDR ignored
    (MapCIDRsByIPFamily skips it) rather than the whole Service refused."""
    out = []
    for value in values:
        if not isinstance(value, str):
            continue
        try:
            out.append(_intern(str(ipaddress.ip_network(value.strip(), strict=False))))
        except ValueError:
            continue
    return tuple(dict.fromkeys(out))


def parse_service(obj: dict, intern: Intern | None = None) -> Service:
    """``intern``: shares equal port specs with the other objects of its owner."""
    intern = Interner() if intern is None else intern
    namespace, name, meta = _meta(obj, "Service")
    what = f"Service {namespace}/{name}"
    spec = _mapping(obj.get("spec"), f"{what} spec")
    status = _mapping(obj.get("status"), f"{what} status")
    raw_type = spec.get("type") or "ClusterIP"
    svc_type = _SERVICE_TYPES.get(raw_type) if isinstance(raw_type, str) else None
    if svc_type is None:
        raise MalformedObject(f"{what}: unknown type {raw_type!r}")

    raw_ips = _list(spec.get("clusterIPs"), f"{what} spec.clusterIPs") or (
        [spec["clusterIP"]] if spec.get("clusterIP") else [])
    cluster_ips: tuple[str, ...] = ()
    if svc_type != "ExternalName" and raw_ips and raw_ips[0] not in ("None", ""):
        cluster_ips = tuple(canonical_ip(ip, f"{what} clusterIP") for ip in raw_ips)

    ports = []
    for i, p in enumerate(_list(spec.get("ports"), f"{what} spec.ports")):
        p = _mapping(p, f"{what} port {i}")
        ports.append(intern(ServicePort(
            name=_intern(str(p.get("name") or "")),
            protocol=_protocol(p.get("protocol"), f"{what} port {i}"),
            port=_port(p.get("port"), f"{what} port {i}"),
            node_port=_port(p.get("nodePort"), f"{what} port {i} nodePort", optional=True),
        )))

    external_ips = tuple(canonical_ip(ip, f"{what} externalIPs")
                         for ip in _list(spec.get("externalIPs"), f"{what} spec.externalIPs"))
    ingress = []
    lb = _mapping(status.get("loadBalancer"), f"{what} status.loadBalancer")
    for ing in _list(lb.get("ingress"), f"{what} status.loadBalancer.ingress"):
        ing = _mapping(ing, f"{what} ingress")
        if ing.get("ip"):  # hostname-only ingress programs nothing
            mode = ing.get("ipMode")
            mode = _intern(mode) if isinstance(mode, str) else mode
            ingress.append((canonical_ip(ing["ip"], f"{what} ingress"), mode))

    distribution = spec.get("trafficDistribution")
    source_ranges = _source_ranges(_list(spec.get("loadBalancerSourceRanges"),
                                         f"{what} spec.loadBalancerSourceRanges"))

    affinity_timeout = None
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = _mapping(spec.get("sessionAffinityConfig"), f"{what} sessionAffinityConfig")
        client_ip = _mapping(cfg.get("clientIP"), f"{what} sessionAffinityConfig.clientIP")
        timeout = client_ip.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise MalformedObject(f"{what}: bad sessionAffinity timeoutSeconds {timeout!r}")
        affinity_timeout = timeout

    return Service(
        namespace=namespace,
        key=_intern(f"{namespace}/{name}"),
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=intern(tuple(ports)),
        external_ips=external_ips,
        load_balancer_ingress=tuple(ingress),
        load_balancer_source_ranges=source_ranges,
        session_affinity_timeout=affinity_timeout,
        external_traffic_local=spec.get("externalTrafficPolicy") == "Local",
        internal_traffic_local=spec.get("internalTrafficPolicy") == "Local",
        health_check_node_port=_port(spec.get("healthCheckNodePort"), f"{what} healthCheckNodePort", optional=True),
        traffic_distribution=_intern(distribution) if isinstance(distribution, str) else distribution,
        labels=_kept(_mapping(meta.get("labels"), f"{what} labels"), None,
                     (SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL)),
        annotations=_kept(_mapping(meta.get("annotations"), f"{what} annotations"), KEPT_ANNOTATION_PREFIXES),
    )


def _condition(conditions: dict, name: str, default: bool) -> bool:
    value = conditions.get(name)
    return default if value is None else bool(value)


def parse_endpoint_slice(obj: dict, intern: Intern | None = None) -> EndpointSlice:
    """``intern``: shares equal ports and endpoint states with the other objects of its owner."""
    intern = Interner() if intern is None else intern
    namespace, name, meta = _meta(obj, "EndpointSlice")
    what = f"EndpointSlice {namespace}/{name}"
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise MalformedObject(f"{what}: unknown addressType {address_type!r}")
    labels = _mapping(meta.get("labels"), f"{what} labels")
    annotations = _mapping(meta.get("annotations"), f"{what} annotations")

    ports = []
    for i, p in enumerate(_list(obj.get("ports"), f"{what} ports")):
        p = _mapping(p, f"{what} port {i}")
        ports.append(intern(EndpointPort(
            name=_intern(str(p.get("name") or "")),
            protocol=_protocol(p.get("protocol"), f"{what} port {i}"),
            port=_port(p.get("port"), f"{what} port {i}", optional=True),
        )))

    endpoints = []
    for i, ep in enumerate(_list(obj.get("endpoints"), f"{what} endpoints")):
        ep = _mapping(ep, f"{what} endpoint {i}")
        raw_addresses = _list(ep.get("addresses"), f"{what} endpoint {i} addresses")
        if not raw_addresses:
            raise MalformedObject(f"{what}: endpoint {i} has no addresses")
        if address_type == "FQDN":
            addresses = tuple(str(a) for a in raw_addresses)
        else:
            addresses = tuple(canonical_ip(a, f"{what} endpoint {i}") for a in raw_addresses)
        conditions = _mapping(ep.get("conditions"), f"{what} endpoint {i} conditions")
        ready = _condition(conditions, "ready", True)
        hints = ep.get("hints")
        hint_zones = hint_nodes = None
        if isinstance(hints, dict):
            if "forZones" in hints:
                hint_zones = tuple(_intern(str(z.get("name"))) for z in _list(hints["forZones"], f"{what} hints")
                                   if isinstance(z, dict))
            if "forNodes" in hints:
                hint_nodes = tuple(_intern(str(n.get("name"))) for n in _list(hints["forNodes"], f"{what} hints")
                                   if isinstance(n, dict))
        endpoints.append(intern(EndpointState(
            ready=ready,
            serving=_condition(conditions, "serving", ready),
            terminating=_condition(conditions, "terminating", False),
            node_name=_intern(ep["nodeName"]) if isinstance(ep.get("nodeName"), str) else None,
            zone=_intern(ep["zone"]) if isinstance(ep.get("zone"), str) else None,
            hint_zones=hint_zones,
            hint_nodes=hint_nodes,
            stated_ready_or_serving=bool(conditions.get("ready")) or bool(conditions.get("serving")),
        )))
        endpoints += addresses

    service_name = labels.get(SERVICE_NAME_LABEL)
    return EndpointSlice(
        namespace=namespace,
        key=f"{namespace}/{name}",
        service_key=_intern(f"{namespace}/{service_name}") if isinstance(service_name, str) and service_name else None,
        address_type=_intern(address_type),
        ports=intern(tuple(ports)),
        endpoints=tuple.__new__(EndpointList, endpoints),
        trigger_time=parse_time(annotations.get(TRIGGER_TIME_ANNOTATION)),
    )


def parse_node(obj: dict) -> Node:
    _, name, meta = _meta(obj, "Node")
    labels = _mapping(meta.get("labels"), f"Node {name} labels")
    status = _mapping(obj.get("status"), f"Node {name} status")
    internal, external = [], []
    for a in _list(status.get("addresses"), f"Node {name} status.addresses"):
        if isinstance(a, dict) and a.get("type") in ("InternalIP", "ExternalIP"):
            ip = canonical_ip(a.get("address"), f"Node {name} address")
            (internal if a["type"] == "InternalIP" else external).append(ip)
    # InternalIPs first: kube-router's primary node IP is the first InternalIP,
    # else the first ExternalIP (utils.GetPrimaryNodeIP).
    addresses = list(dict.fromkeys(internal + external))
    zone = labels.get(ZONE_LABEL)
    return Node(name=name, zone=zone if isinstance(zone, str) else None, addresses=tuple(addresses))


PARSERS = {
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Node": parse_node,
}


class ObjectSet(NamedTuple):
    services: dict[str, Service]  # by namespace/name
    slices: dict[str, EndpointSlice]  # by namespace/name
    nodes: dict[str, Node]  # by name
    errors: list[str]  # one line per object skipped


def iter_items(doc: Any) -> Iterator[dict]:
    """Items of a ``List`` (or a single object, or a YAML stream of either)."""
    if isinstance(doc, list):
        for d in doc:
            yield from iter_items(d)
    elif isinstance(doc, dict):
        if isinstance(doc.get("items"), list):
            for item in doc["items"]:
                yield from iter_items(item)
        else:
            yield doc


def parse_objects(docs: Iterable[Any]) -> ObjectSet:
    """Parse ``kubectl get services,endpointslices -A -o yaml`` output; skip what is malformed."""
    result = ObjectSet({}, {}, {}, [])
    intern = Interner()
    targets = {"Service": result.services, "EndpointSlice": result.slices, "Node": result.nodes}
    for doc in docs:
        for item in iter_items(doc):
            kind = item.get("kind") if isinstance(item, dict) else None
            parser = PARSERS.get(kind)
            if parser is None:
                continue  # other kinds (Endpoints, Pods) are not ours to read
            try:
                obj = parser(item, intern) if parser is not parse_node else parser(item)
            except MalformedObject as err:
                result.errors.append(str(err))
                continue
            targets[kind][obj.key if kind != "Node" else obj.name] = obj
    return result
