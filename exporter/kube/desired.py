"""The IPVS table a proxy should have programmed on this node, from API objects.

Pure functions over the compact objects of ``exporter.kube.objects``: no I/O,
no clock. Two models, each following its proxy's own code (newest release,
default flags), not a reading of the docs:

``kube-proxy`` (kubernetes/kubernetes pkg/proxy):
  - which Services: the informer's label selector drops services with the
    ``service.kubernetes.io/service-proxy-name`` or ``.../headless`` label
    (cmd/kube-proxy/app/server.go); ``ServiceChangeTracker`` drops headless
    (clusterIP None) and ExternalName services, and per IP family a service
    with no cluster IP of that family (one proxier per family).
  - which virtual servers: ``Proxier.syncProxyRules`` (pkg/proxy/ipvs/proxier.go)
    makes one per service port for the cluster IP, each externalIP, each
    LoadBalancer VIP (``newBaseServiceInfo`` in serviceport.go keeps only
    ingress IPs with ipMode VIP or unset, of the proxier's family), and each
    node address x nodePort (addresses of that family, no loopback, no IPv6
    link-local: ``netlinkHandle.isValidForSet``). Scheduler ``rr``
    (``--ipvs-scheduler`` default); ClientIP affinity sets the persistent
    flag with the timeout. A virtual server exists whether or not it has
    endpoints (``syncService`` runs before ``syncEndpoint``).
  - which real servers: ``EndpointSliceCache`` (endpointslicecache.go) joins
    slice ports to service ports by (name, protocol), takes each endpoint's
    first address of the proxier's family, dedups by ip:port.
    ``CategorizeEndpoints`` (topology.go) picks ready endpoints, or
    serving+terminating ones when none are ready; topology hints
    (PreferSameNode, then PreferSameZone) only when every ready endpoint
    carries them and one is for this node/zone. ``syncEndpoint`` uses the
    Local set for Local policies (internal for the cluster IP, external for
    the rest) and falls back to the Cluster set when no local endpoint
    exists (kubernetes PR 97081). Weight 1, masquerade.
  - ``kube_proxy_port_plans`` (which Services, families, addresses, policies)
    and ``categorize_endpoints`` are kube-proxy's for every mode: the nftables
    and iptables model (``exporter.kube.desired_rules``) builds on the same
    two; only what each mode programs from them differs.

``kube-router`` (cloudnativelabs/kube-router pkg/controllers/proxy; read at
v2.8.0's a1f0b2eea3ee, service_endpoints_sync.go also at the later 87d2bcd9fdd9):
  - ``buildServicesInfo`` (network_services_controller.go): skips clusterIP
    None/blank, ExternalName, a service-proxy-name label other than
    ``kube-router``, the headless label. Annotations: ``service.scheduler``
    (rr, lc, dh, sh, mh; else rr), ``service.dsr``, ``service.skiplbips``,
    ``service.local`` ("true" sets the internal policy to Cluster and the
    external one to Local, whatever the spec says).
  - externalIPs and LoadBalancer ingress IPs pass ``svcip.Validator``
    (pkg/svcip/validator.go ``FilterExternalIPs`` / ``FilterLoadBalancerIPs``).
    Default flags (pkg/options/options.go): ``--strict-external-ip-validation``
    true with no ``--service-external-ip-range`` / ``--loadbalancer-ip-range``,
    so every one is rejected; with a range, an address is kept when inside it
    and outside ``--service-cluster-ip-range`` (default 10.96.0.0/12).
    ``KubeRouterFlags`` holds these flags.
  - ``buildEndpointSliceInfo``: IPv4/IPv6 slices only, endpoints whose
    ``ready`` or ``serving`` is stated true (an absent condition is false
    there, not the API's "absent ready = ready"), every address, joined to
    service ports by port name. A serving+terminating endpoint is a real
    server beside ready ones (no kube-proxy style fallback).
  - ``setupClusterIPServices`` / ``setupNodePortServices`` /
    ``setupExternalIPServices`` (service_endpoints_sync.go): one virtual
    server per cluster IP, per node address x nodePort (default
    ``--nodeport-bindon-all-ip`` false: the node's primary IP only), per
    admitted externalIP and LoadBalancer IP (all ipModes). A Local policy with
    no local endpoint (``hasActiveEndpoints``) skips the virtual server
    entirely; with local endpoints only those are real servers. DSR
    (``service.dsr: tunnel``) makes the external ones fwmark services
    (``generateUniqueFWMark``: FNV-1a of "ip-proto-port" masked to 14 bits)
    with tunnel real servers; it touches nothing else, so under default flags
    (no admitted external IP) it changes nothing. Only TCP and UDP: other
    protocols map to IPPROTO_NONE, which IPVS refuses.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

from exporter.dataplane import RealServers, Table, VirtualServer, VirtualServerKey
from exporter.kube.objects import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    EndpointSlice,
    Node,
    Service,
    ServicePort,
)

KUBE_PROXY = "kube-proxy"
KUBE_ROUTER = "kube-router"

# kube-router's per-service annotations (network_services_controller.go constants)
KR_DSR = "kube-router.io/service.dsr"
KR_SCHEDULER = "kube-router.io/service.scheduler"
KR_LOCAL = "kube-router.io/service.local"
KR_SKIP_LB_IPS = "kube-router.io/service.skiplbips"
KR_SCHEDULERS = ("rr", "lc", "dh", "sh", "mh")
KR_FWMARK_MASK = 0x3FFF
KR_FWMARK_MAX_TRIES = 16380

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class KubeRouterFlags(NamedTuple):
    """The kube-router flags the model depends on; the defaults are kube-router's own
    (pkg/options/options.go ``NewKubeRouterConfig`` / ``AddFlags``)."""

    strict_external_ip_validation: bool = True
    service_external_ip_ranges: tuple[_Network, ...] = ()
    loadbalancer_ip_ranges: tuple[_Network, ...] = ()
    service_cluster_ip_ranges: tuple[_Network, ...] = (ipaddress.ip_network("10.96.0.0/12"),)

    @classmethod
    def parse(cls, strict_external_ip_validation: bool = True, service_external_ip_ranges: Iterable[str] = (),
              loadbalancer_ip_ranges: Iterable[str] = (),
              service_cluster_ip_ranges: Iterable[str] = ("10.96.0.0/12",)) -> "KubeRouterFlags":
        """From CIDR text, refused as ``svcip.NewValidator`` refuses it (ValueError naming the flag)."""
        def cidrs(values: Iterable[str], flag: str) -> tuple[_Network, ...]:
            try:
                return tuple(ipaddress.ip_network(v, strict=False) for v in values)
            except ValueError as exc:
                raise ValueError(f"{flag}: {exc}") from None
        cluster = cidrs(service_cluster_ip_ranges, "--service-cluster-ip-range")
        if not 1 <= len(cluster) <= 2:
            raise ValueError("--service-cluster-ip-range: one or two CIDRs (one per family)")
        return cls(bool(strict_external_ip_validation),
                   cidrs(service_external_ip_ranges, "--service-external-ip-range"),
                   cidrs(loadbalancer_ip_ranges, "--loadbalancer-ip-range"), cluster)


KUBE_ROUTER_DEFAULT_FLAGS = KubeRouterFlags()


def kube_router_flags_from(get: Callable[[str], Any]) -> KubeRouterFlags:
    """From the exporter's ``kube-router.*`` options (exporter/config.py), read with ``get``."""
    return KubeRouterFlags.parse(get("kube-router.strict-external-ip-validation"),
                                 get("kube-router.service-external-ip-range") or (),
                                 get("kube-router.loadbalancer-ip-range") or (),
                                 get("kube-router.service-cluster-ip-range") or ("10.96.0.0/12",))


class NodeFacts(NamedTuple):
    """What the model needs to know about this node."""

    name: str
    zone: str | None = None
    addresses: tuple[str, ...] = ()  # where NodePort virtual servers go (compressed text)


def node_facts(name: str, node: Node | None, node_ips: Iterable[str] = (), proxy: str = KUBE_PROXY) -> NodeFacts:
    """NodeFacts from explicit ``--node-ip`` values, else from the Node object.

    From a Node, kube-proxy would use every local address; the API knows only
    InternalIP/ExternalIP, so those stand in for them. kube-router binds
    NodePorts on the primary IP only (``GetPrimaryNodeIP``: the first
    InternalIP, else the first ExternalIP); the Node parser keeps InternalIPs
    first, so that is ``addresses[0]``.
    """
    zone = node.zone if node else None
    ips = tuple(str(ipaddress.ip_address(ip)) for ip in node_ips)
    if not ips and node is not None:
        ips = node.addresses[:1] if proxy == KUBE_ROUTER else node.addresses
    return NodeFacts(name=name, zone=zone, addresses=_unique(ips))


def _unique(items: Iterable) -> tuple:
    return tuple(dict.fromkeys(items))


def _family(address: str) -> int:
    return 6 if ":" in address else 4


# --- kube-proxy ---------------------------------------------------------------


class _Endpoint(NamedTuple):
    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    local: bool
    hint_zones: tuple[str, ...]
    hint_nodes: tuple[str, ...]


def _kube_proxy_endpoints(port: ServicePort, slices: Iterable[EndpointSlice], family: int,
                          node_name: str) -> list[_Endpoint]:
    """EndpointSliceCache.endpointInfoByServicePort + addEndpoints, for one service port and family."""
    by_key: dict[tuple[str, int], _Endpoint] = {}
    address_type = f"IPv{family}"
    for es in slices:
        if es.address_type != address_type:
            continue
        for sp in es.ports:
            if sp.name != port.name or sp.protocol != port.protocol or not sp.port:
                continue
            for ep in es.endpoints:
                ip = ep.addresses[0]  # kube-proxy uses only the first address
                local = bool(node_name) and ep.node_name == node_name
                key = (ip, sp.port)
                if key in by_key and not local:
                    continue  # duplicates: the local copy wins
                by_key[key] = _Endpoint(ip, sp.port, ep.ready, ep.serving, ep.terminating, local,
                                        ep.hint_zones or (), ep.hint_nodes or ())
    return list(by_key.values())


def _topology_mode(endpoints: list[_Endpoint], node_name: str, zone: str) -> str:
    """topology.go topologyModeFromHints (PreferSameTrafficDistribution on by default)."""
    ready = [ep for ep in endpoints if ep.ready]
    if not ready:
        return ""
    if all(ep.hint_nodes for ep in ready) and any(node_name in ep.hint_nodes for ep in ready):
        return "PreferSameNode"
    if all(ep.hint_zones for ep in ready) and any(zone in ep.hint_zones for ep in ready):
        return "PreferSameZone"
    return ""


def _available(ep: _Endpoint, mode: str, node_name: str, zone: str) -> bool:
    if mode == "PreferSameNode":
        return node_name in ep.hint_nodes
    if mode == "PreferSameZone":
        return zone in ep.hint_zones
    return True


class Categorized(NamedTuple):
    """topology.go CategorizeEndpoints for one service port: what every mode builds on."""

    cluster: list[_Endpoint]  # usable under Cluster policy (topology applied); [] if never used
    local: list[_Endpoint]  # this node's usable endpoints; [] if Local policy is never used
    has_any: bool  # a usable endpoint exists anywhere (hasAnyEndpoints), even if neither list has one


def categorize_endpoints(endpoints: list[_Endpoint], uses_cluster: bool, uses_local: bool, node: NodeFacts
                         ) -> Categorized:
    """topology.go CategorizeEndpoints: ready endpoints, else serving+terminating ones,
    independently for the Cluster and the Local list; hints only under a topology mode."""
    cluster: list[_Endpoint] = []
    local: list[_Endpoint] = []
    if not endpoints:
        return Categorized(cluster, local, False)
    zone = node.zone or ""
    if uses_cluster:
        mode = _topology_mode(endpoints, node.name, zone)
        cluster = [ep for ep in endpoints if ep.ready and _available(ep, mode, node.name, zone)]
        if not cluster:
            cluster = [ep for ep in endpoints if ep.serving and ep.terminating]
    has_any = bool(cluster)
    if uses_local:
        # The pre-scan: any ready or serving+terminating endpoint anywhere counts.
        has_any = has_any or any(ep.ready or (ep.serving and ep.terminating) for ep in endpoints)
        local = [ep for ep in endpoints if ep.local and ep.ready]
        if not local:
            local = [ep for ep in endpoints if ep.local and ep.serving and ep.terminating]
    return Categorized(cluster, local, has_any)


def real_servers_for(endpoints: Iterable[tuple[str, int]], forward: str = "Masq") -> RealServers:
    """Weight-1 real servers by (ip, port), the first of duplicates kept; one compact
    ``RealServers`` that virtual servers of the same endpoints may share (immutable)."""
    return RealServers(endpoints, 1, forward)


class PortPlan(NamedTuple):
    """One service port as one of kube-proxy's per-family proxiers sees it
    (newBaseServiceInfo in pkg/proxy/serviceport.go), with its endpoints categorised."""

    family: int
    cluster_ip: str
    port: ServicePort
    external_ips: list[str]  # spec.externalIPs of this family
    lb_vips: list[str]  # LoadBalancer ingress IPs of this family, ipMode VIP or unset
    source_ranges: list[str]  # loadBalancerSourceRanges of this family
    internal_local: bool  # InternalPolicyLocal
    external_local: bool  # ExternalPolicyLocal (only for an externally accessible service)
    endpoints: Categorized


def kube_proxy_port_plans(service: Service, slices: list[EndpointSlice], node: NodeFacts) -> Iterator[PortPlan]:
    """Every (family, service port) kube-proxy programs for ``service``, in every mode.

    Which services: the informer's label selector and ServiceChangeTracker (see the
    module docstring); one cluster IP per family (GetClusterIPByFamily).
    """
    if (service.label(SERVICE_PROXY_NAME_LABEL) is not None or service.label(HEADLESS_LABEL) is not None
            or service.type == "ExternalName" or not service.cluster_ips):
        return
    # apiservice.ExternallyAccessible / ExternalPolicyLocal: the external policy
    # only counts for a service that takes external traffic at all.
    external_capable = service.type in ("NodePort", "LoadBalancer") or bool(service.external_ips)
    external_local = service.external_traffic_local and external_capable
    internal_local = service.internal_traffic_local
    seen_families: set[int] = set()
    for cluster_ip in service.cluster_ips:
        family = _family(cluster_ip)
        if family in seen_families:
            continue  # one cluster IP per family (GetClusterIPByFamily)
        seen_families.add(family)
        external_ips = [ip for ip in service.external_ips if _family(ip) == family]
        lb_vips = list(_unique(ip for ip, mode in service.load_balancer_ingress
                               if _family(ip) == family and mode in (None, "VIP")))
        source_ranges = [cidr for cidr in service.load_balancer_source_ranges if _family(cidr) == family]
        for port in service.ports:
            # BaseServicePortInfo.ExternallyAccessible / UsesClusterEndpoints / UsesLocalEndpoints
            accessible = bool(port.node_port or lb_vips or external_ips)
            uses_cluster = not internal_local or accessible
            uses_local = internal_local or (external_local and accessible)
            endpoints = _kube_proxy_endpoints(port, slices, family, node.name)
            yield PortPlan(family, cluster_ip, port, external_ips, lb_vips, source_ranges, internal_local,
                           external_local, categorize_endpoints(endpoints, uses_cluster, uses_local, node))


def _kube_proxy_service(service: Service, slices: list[EndpointSlice], node: NodeFacts,
                        scheduler: str) -> list[VirtualServer]:
    """IPVS mode's virtual servers for one Service (pkg/proxy/ipvs/proxier.go)."""
    timeout = service.session_affinity_timeout
    service_key = service.key  # one string shared by all its virtual servers
    out: list[VirtualServer] = []
    node_ips_by_family: dict[int, list[str]] = {}
    for plan in kube_proxy_port_plans(service, slices, node):
        port = plan.port
        node_ips = node_ips_by_family.get(plan.family)
        if node_ips is None:
            node_ips = node_ips_by_family[plan.family] = [
                ip for ip in node.addresses if _family(ip) == plan.family and _node_port_address_ok(ip)]
        cluster_eps, local_eps = plan.endpoints.cluster, plan.endpoints.local

        def chosen(only_local: bool) -> RealServers:
            # syncEndpoint: a Local policy without a local endpoint falls back to the Cluster set.
            eps = (local_eps or cluster_eps) if only_local else cluster_eps
            return real_servers_for((ep.ip, ep.port) for ep in eps)

        def vs(address: str, vport: int, real_servers: RealServers) -> VirtualServer:
            return VirtualServer(VirtualServerKey(port.protocol, address, vport), scheduler, timeout,
                                 real_servers, service_key)

        internal_rs = chosen(plan.internal_local)
        out.append(vs(plan.cluster_ip, port.port, internal_rs))
        # The same endpoints behind every external frontend: one shared (immutable) RealServers.
        external_rs = internal_rs if plan.external_local == plan.internal_local else chosen(plan.external_local)
        for ip in _unique(plan.external_ips + plan.lb_vips):
            out.append(vs(ip, port.port, external_rs))
        if port.node_port:
            for ip in node_ips:
                out.append(vs(ip, port.node_port, external_rs))
    return out


@functools.lru_cache(maxsize=1024)
def _node_port_address_ok(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return not addr.is_loopback and not (addr.version == 6 and addr.is_link_local)


# --- kube-router --------------------------------------------------------------


class _KrEndpoint(NamedTuple):
    ip: str
    port: int
    family: int
    local: bool


def _kube_router_endpoints(port_name: str, slices: Iterable[EndpointSlice], node_name: str) -> list[_KrEndpoint]:
    """buildEndpointSliceInfo for one service port: ready or serving as stated (an absent
    condition is false there), every address."""
    out: list[_KrEndpoint] = []
    for es in slices:
        if es.address_type not in ("IPv4", "IPv6"):
            continue
        family = 4 if es.address_type == "IPv4" else 6
        for sp in es.ports:
            if sp.name != port_name or not sp.port:
                continue
            for ep in es.endpoints:
                if not ep.stated_ready_or_serving:
                    continue
                local = ep.node_name is not None and ep.node_name == node_name
                out.extend(_KrEndpoint(ip, sp.port, family, local) for ip in ep.addresses)
    return out


def kube_router_fwmark(ip: str, protocol: str, port: int, taken: Mapping[int, str] | None = None) -> int:
    """generateUniqueFWMark: FNV-1a 32 of "ip-proto-port" (then "-N" on a clash) & 0x3FFF."""
    key = f"{ip}-{protocol.lower()}-{port}"
    taken = taken or {}
    for increment in range(KR_FWMARK_MAX_TRIES):
        text = key if increment == 0 else f"{key}-{increment}"
        mark = _fnv1a32(text.encode()) & KR_FWMARK_MASK
        if taken.get(mark, key) == key:
            return mark
    raise ValueError(f"no free fwmark for {key}")


def _fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def _kube_router_admitted(ips: Iterable[str], allowed: tuple[_Network, ...], flags: KubeRouterFlags) -> list[str]:
    """svcip ``FilterExternalIPs`` / ``FilterLoadBalancerIPs``: under strict validation an address
    is kept only inside one of ``allowed`` and outside the cluster IP ranges; no range, none kept."""
    if not flags.strict_external_ip_validation:
        return list(ips)
    if not allowed:
        return []
    kept = []
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        if not any(addr in net for net in flags.service_cluster_ip_ranges) and any(addr in net for net in allowed):
            kept.append(ip)
    return kept


def _kube_router_service(service: Service, slices: list[EndpointSlice], node: NodeFacts,
                         fwmarks: dict[int, str] | None = None,
                         flags: KubeRouterFlags = KUBE_ROUTER_DEFAULT_FLAGS) -> list[VirtualServer]:
    proxy_name = service.label(SERVICE_PROXY_NAME_LABEL)
    if (not service.cluster_ips or service.type == "ExternalName"
            or (proxy_name is not None and proxy_name != KUBE_ROUTER)
            or service.label(HEADLESS_LABEL) is not None):
        return []
    if service.annotation(KR_LOCAL) == "true":
        # buildServicesInfo: the annotation overrides the spec, internal Cluster, external Local.
        internal_local, external_local = False, True
    else:
        internal_local, external_local = service.internal_traffic_local, service.external_traffic_local
    scheduler = service.annotation(KR_SCHEDULER)
    scheduler = scheduler if scheduler in KR_SCHEDULERS else "rr"
    dsr = service.annotation(KR_DSR) == "tunnel"
    timeout = service.session_affinity_timeout
    external_ips = _kube_router_admitted(service.external_ips, flags.service_external_ip_ranges, flags)
    if service.annotation(KR_SKIP_LB_IPS) is None:
        external_ips += _kube_router_admitted((ip for ip, _mode in service.load_balancer_ingress),
                                              flags.loadbalancer_ip_ranges, flags)
    external_ips = list(_unique(external_ips))
    fwmarks = {} if fwmarks is None else fwmarks
    service_key = service.key

    out: list[VirtualServer] = []
    for port in service.ports:
        if port.protocol not in ("TCP", "UDP"):
            continue  # convertSvcProtoToSysCallProto: IPPROTO_NONE
        endpoints = _kube_router_endpoints(port.name, slices, node.name)
        has_local = any(ep.local for ep in endpoints)  # hasActiveEndpoints

        def rs_for(family: int, only_local: bool, forward: str = "Masq") -> RealServers:
            return real_servers_for(((ep.ip, ep.port) for ep in endpoints
                                  if ep.family == family and (ep.local or not only_local)), forward)

        def vs(key: VirtualServerKey, real_servers: RealServers) -> VirtualServer:
            return VirtualServer(key, scheduler, timeout, real_servers, service_key)

        if not (internal_local and not has_local):
            for ip in _unique(service.cluster_ips):
                out.append(vs(VirtualServerKey(port.protocol, ip, port.port), rs_for(_family(ip), internal_local)))
        if external_local and not has_local:
            continue  # NodePort and external VSs are skipped entirely
        if port.node_port:
            for ip in node.addresses:
                out.append(vs(VirtualServerKey(port.protocol, ip, port.node_port),
                              rs_for(_family(ip), external_local)))
        for ip in external_ips:
            if dsr:
                mark = kube_router_fwmark(ip, port.protocol, port.port, fwmarks)
                fwmarks[mark] = f"{ip}-{port.protocol.lower()}-{port.port}"
                out.append(vs(VirtualServerKey.for_fwmark(mark), rs_for(_family(ip), external_local, "Tunnel")))
            else:
                out.append(vs(VirtualServerKey(port.protocol, ip, port.port), rs_for(_family(ip), external_local)))
    return out


# --- entry points -------------------------------------------------------------


def virtual_servers_for_service(service: Service, slices: Iterable[EndpointSlice], node: NodeFacts,
                                proxy: str = KUBE_PROXY, scheduler: str = "rr",
                                fwmarks: dict[int, str] | None = None,
                                kube_router_flags: KubeRouterFlags = KUBE_ROUTER_DEFAULT_FLAGS) -> list[VirtualServer]:
    """The virtual servers one Service should have on this node.

    One service at a time, so a watch can recompute only the service that
    changed. ``slices`` are that service's EndpointSlices. ``fwmarks``
    (kube-router DSR only) is the table of marks already handed out, which
    ``generateUniqueFWMark`` consults to avoid clashes; it is updated.
    ``kube_router_flags``: the kube-router flags modelled (default: its defaults).
    """
    slices = list(slices)
    if proxy == KUBE_ROUTER:
        return _kube_router_service(service, slices, node, fwmarks, kube_router_flags)
    if proxy != KUBE_PROXY:
        raise ValueError(f"unknown proxy {proxy!r}")
    return _kube_proxy_service(service, slices, node, scheduler)


def slices_by_service(slices: Iterable[EndpointSlice]) -> dict[str, list[EndpointSlice]]:
    """Group EndpointSlices by their service's ``namespace/name`` (slices with no service label dropped)."""
    out: dict[str, list[EndpointSlice]] = {}
    for es in slices:
        if es.service_key:
            out.setdefault(es.service_key, []).append(es)
    return out


def desired_table(services: Iterable[Service], slices_by_service: Mapping[str, list[EndpointSlice]],
                  node: NodeFacts, proxy: str = KUBE_PROXY, scheduler: str = "rr",
                  kube_router_flags: KubeRouterFlags = KUBE_ROUTER_DEFAULT_FLAGS,
                  model: Callable[..., list[VirtualServer]] | None = None) -> Table:
    """The whole table. Services are visited in key order so that, where two
    claim the same virtual server (a shared externalIP:port), the result does
    not depend on dict order: the first claim keeps it, as the proxy's own
    later add fails with "exists". ``model``: another per-Service model with
    ``virtual_servers_for_service``'s signature (``desired_rules.model_for``)."""
    table: Table = {}
    fwmarks: dict[int, str] = {}
    model = model or virtual_servers_for_service
    for service in sorted(services, key=lambda s: s.key):
        for vs in model(service, slices_by_service.get(service.key, ()), node, proxy,
                        scheduler, fwmarks, kube_router_flags):
            table.setdefault(vs.key, vs)
    return table
