"""The rules kube-proxy's nftables and iptables modes should have on this node, from API objects.

Pure functions over the compact objects of ``exporter.kube.objects``, like the IPVS
model beside them (``exporter.kube.desired``), and built on the same per-port plan
(``desired.kube_proxy_port_plans``: which Services, families, addresses, and the one
endpoint categorisation of pkg/proxy/topology.go). What differs between the modes is
only what a frontend gets when it has no usable endpoint; the shapes are the live
nftables reader's (``exporter.readers.nftables``), so that desired and live compare
equal on a node whose rules are right.

Followed (kubernetes/kubernetes, newest release; pkg/proxy/nftables/proxier.go
``syncProxyRules``; pkg/proxy/iptables/proxier.go ``syncProxyRules`` decides the same
things the same way, into KUBE-SERVICES / KUBE-EXTERNAL-SERVICES instead of maps):

- ``hasEndpoints`` is CategorizeEndpoints' "a usable endpoint anywhere";
  ``hasInternalEndpoints`` is false when internalTrafficPolicy is Local and this node
  has none, ``hasExternalEndpoints`` likewise for externalTrafficPolicy.
- The cluster IP is in `service-ips` (going to the Cluster or, for internal Local, the
  Local endpoint chain) only with internal endpoints; otherwise it is in
  `no-endpoint-services` with `goto reject-chain` when the Service has no usable
  endpoint at all, else `drop`.
- ExternalIPs, LoadBalancer VIPs (`service-ips`) and the NodePort (`service-nodeports`)
  are mapped to the external chain whenever ``hasEndpoints``; without external
  endpoints they are also in the no-endpoint maps (reject or drop as above). So with
  externalTrafficPolicy Local and no endpoint on this node, a frontend is both mapped
  (to an external chain that only short-circuits pod and node-local traffic, so the
  reader sees it with no endpoints) and dropped. No fallback to the Cluster endpoints,
  unlike IPVS mode's syncEndpoint.
- LoadBalancer VIPs of a Service with source ranges of that family are in
  `firewall-ips`, with or without endpoints. iptables mode differs here, and only
  here: its `KUBE-FW-` chain and `KUBE-PROXY-FIREWALL` drop exist only while the
  Service has endpoints (pkg/proxy/iptables/proxier.go: ``usesFWChain := hasEndpoints
  && len(LoadBalancerVIPs) > 0 && len(LoadBalancerSourceRanges) > 0``); without
  endpoints its VIPs are rejected like any other frontend, not firewalled.
- A NodePort is matched on protocol and port alone, on every node-port address
  (`nodeport-ips`, the primary node IPs: the nftables mode's default
  `--nodeport-addresses`; or all local addresses, iptables mode's default): its frontend
  has address None, whatever this node's addresses are. A dual-stack Service's NodePort
  is one frontend over both families' tables, merged as the reader merges it.
- Session affinity: the endpoint chains' affinity sets carry the timeout, so a frontend
  with endpoints reports it and one without reports none (nothing to read it from).
- Scheduler "random" (`numgen random`); every endpoint a real server of weight 1.

Inside the store (``exporter.kube.store``), which keeps one list of virtual servers
per Service for every mode, a frontend's rule facts ride in ``VirtualServer.flags``:
``reject`` / ``drop`` (its no-endpoint verdict), ``unmapped`` (absent from the service
maps: kube-proxy writes no chain for it) and ``firewalled``. ``rules_view`` turns such
a table into the reader's shape.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from exporter.dataplane import RealServers, Table, VirtualServer, VirtualServerKey
from exporter.kube import desired
from exporter.kube.objects import EndpointSlice, Service

MODE_IPVS, MODE_NFTABLES, MODE_IPTABLES = "ipvs", "nftables", "iptables"
MODES = (MODE_IPVS, MODE_NFTABLES, MODE_IPTABLES)
RULES_MODES = (MODE_NFTABLES, MODE_IPTABLES)  # the modes this module models

# A frontend's scheduler in these modes: `numgen random`, as the nftables reader reports it.
SCHEDULER = "random"
# Rule facts a desired frontend carries in VirtualServer.flags (see the module docstring).
REJECT, DROP = "reject", "drop"
UNMAPPED = "unmapped"
FIREWALLED = "firewalled"
VERDICTS = (REJECT, DROP)


class DesiredRules(NamedTuple):
    """The desired side in the live nftables reader's shape (``NftablesRead``)."""

    table: Table  # frontends the service maps send somewhere, with their endpoints
    rejected: dict[VirtualServerKey, str]  # frontends in the no-endpoint maps: "reject" or "drop"
    firewalled: frozenset[VirtualServerKey]  # frontends in firewall-ips (LoadBalancer source ranges)


class _Frontend(NamedTuple):
    """One family's view of one frontend, before families are merged."""

    family: int
    key: VirtualServerKey
    endpoints: list  # the categorised endpoints it sends traffic to
    verdict: str | None  # REJECT / DROP when in a no-endpoint map
    mapped: bool  # in service-ips / service-nodeports
    firewalled: bool


def _port_frontends(plan: desired.PortPlan, mode: str = MODE_NFTABLES) -> list[_Frontend]:
    """One family's frontends of one service port (syncProxyRules, per service port)."""
    port, categorized = plan.port, plan.endpoints
    local = categorized.local
    has_endpoints = categorized.has_any
    has_internal = has_endpoints and not (plan.internal_local and not local)
    has_external = has_endpoints and not (plan.external_local and not local)
    # No usable endpoint anywhere: reject; some, but none this policy may use here: drop.
    verdict = REJECT if not has_endpoints else DROP
    internal_eps = local if plan.internal_local else categorized.cluster
    external_eps = local if plan.external_local else categorized.cluster
    protocol, family = port.protocol, plan.family
    out = [_Frontend(family, VirtualServerKey(protocol, plan.cluster_ip, port.port),
                     internal_eps if has_internal else [], None if has_internal else verdict, has_internal, False)]
    external = external_eps if has_external else []
    external_verdict = None if has_external else verdict
    # iptables mode writes its firewall chain only for a Service with endpoints (module docstring).
    firewall = plan.source_ranges and (has_endpoints or mode != MODE_IPTABLES)
    firewalled_vips = set(plan.lb_vips) if firewall else set()
    for ip in dict.fromkeys(plan.external_ips + plan.lb_vips):
        out.append(_Frontend(family, VirtualServerKey(protocol, ip, port.port), external, external_verdict,
                             has_endpoints, ip in firewalled_vips))
    if port.node_port:
        out.append(_Frontend(family, VirtualServerKey(protocol, None, port.node_port), external, external_verdict,
                             has_endpoints, False))
    return out


def _virtual_server(frontend: _Frontend, real_servers: RealServers, service: Service) -> VirtualServer:
    flags = tuple(flag for flag, on in ((frontend.verdict, frontend.verdict is not None),
                                        (UNMAPPED, not frontend.mapped), (FIREWALLED, frontend.firewalled)) if on)
    timeout = service.session_affinity_timeout if real_servers else None
    return VirtualServer(frontend.key, SCHEDULER, timeout, real_servers, service.key, flags)


def frontends_for_service(service: Service, slices: Iterable[EndpointSlice], node: desired.NodeFacts,
                          mode: str = MODE_NFTABLES) -> list[VirtualServer]:
    """Every frontend one Service should have in kube-proxy's nftables or iptables rules.

    Flags say what else the rules hold for it (module docstring); ``rules_view`` of the
    result is what the live reader reports for this Service.
    """
    by_key: dict[VirtualServerKey, list[_Frontend]] = {}
    for plan in desired.kube_proxy_port_plans(service, list(slices), node):
        for frontend in _port_frontends(plan, mode):
            by_key.setdefault(frontend.key, []).append(frontend)
    out = []
    for frontends in by_key.values():
        if len(frontends) == 1:
            (frontend,) = frontends
            out.append(_virtual_server(frontend, _endpoints_as_real_servers(frontend.endpoints), service))
        else:
            out.append(_merged(frontends, service))
    return out


def _endpoints_as_real_servers(endpoints: Iterable) -> RealServers:
    return desired.real_servers_for((ep.ip, ep.port) for ep in endpoints)


def _merged(frontends: list[_Frontend], service: Service) -> VirtualServer:
    """A frontend in both families' tables (a dual-stack NodePort), read as the reader
    reads it: endpoints of every family that maps it, the IPv6 table's verdict over the
    IPv4 one's, and the affinity of the last family that maps it."""
    frontends = sorted(frontends, key=lambda f: f.family)  # the reader reads ip, then ip6
    mapped = [f for f in frontends if f.mapped]
    verdicts = [f.verdict for f in frontends if f.verdict]
    real_servers = desired.real_servers_for((ep.ip, ep.port) for f in mapped for ep in f.endpoints)
    timeout_from = mapped[-1] if mapped else frontends[-1]
    merged = frontends[-1]._replace(verdict=verdicts[-1] if verdicts else None, mapped=bool(mapped),
                                    firewalled=any(f.firewalled for f in frontends))
    vs = _virtual_server(merged, real_servers, service)
    if mapped and not timeout_from.endpoints:
        vs = vs._replace(persistent_timeout=None)  # the last family's chain shows no affinity set
    return vs


def kube_proxy_rules_model(service: Service, slices: Iterable[EndpointSlice], node: desired.NodeFacts,
                           proxy: str = desired.KUBE_PROXY, scheduler: str | None = None,
                           fwmarks: Any = None, kube_router_flags: Any = None,
                           mode: str = MODE_NFTABLES) -> list[VirtualServer]:
    """``frontends_for_service`` with the store's model signature (``scheduler``, ``fwmarks``
    and ``kube_router_flags`` are IPVS and kube-router matters: not used here)."""
    if proxy != desired.KUBE_PROXY:
        raise ValueError(f"no {MODE_NFTABLES}/{MODE_IPTABLES} model for {proxy!r}: kube-proxy's modes only")
    return frontends_for_service(service, slices, node, mode)


# iptables mode's model: nftables mode's but for firewalled frontends (module docstring).
kube_proxy_iptables_model = functools.partial(kube_proxy_rules_model, mode=MODE_IPTABLES)


def model_for(proxy: str, mode: str,
              kube_router_flags: desired.KubeRouterFlags = desired.KUBE_ROUTER_DEFAULT_FLAGS) -> Callable[..., list]:
    """The per-Service model for this proxy in this mode, with the store's call signature
    ``model(service, slices, node_facts, proxy, fwmarks=...)``. ValueError for a pair no
    proxy runs (kube-router is IPVS only)."""
    if mode not in MODES:
        raise ValueError(f"unknown proxy mode {mode!r} (one of {', '.join(MODES)})")
    if proxy == desired.KUBE_ROUTER:
        if mode != MODE_IPVS:
            raise ValueError(f"kube-router programs IPVS only, not {mode}")
        if kube_router_flags == desired.KUBE_ROUTER_DEFAULT_FLAGS:
            return desired.virtual_servers_for_service
        return functools.partial(desired.virtual_servers_for_service, kube_router_flags=kube_router_flags)
    if proxy != desired.KUBE_PROXY:
        raise ValueError(f"unknown proxy {proxy!r}")
    # nftables and iptables modes decide frontends, endpoints and verdicts alike, but for
    # the firewall of a Service without endpoints (module docstring).
    if mode == MODE_IPVS:
        return desired.virtual_servers_for_service
    return kube_proxy_iptables_model if mode == MODE_IPTABLES else kube_proxy_rules_model


def rules_view(frontends: Iterable[VirtualServer]) -> DesiredRules:
    """The reader's shape of desired frontends (a store snapshot's ``table.values()``, or a
    model's output): mapped frontends in the table without rule flags, verdicts and
    firewalled frontends apart. Only flagged frontends are copied."""
    table: Table = {}
    rejected: dict[VirtualServerKey, str] = {}
    firewalled: set[VirtualServerKey] = set()
    for vs in frontends:
        flags = vs.flags
        if flags:
            for flag in flags:
                if flag in VERDICTS:
                    rejected[vs.key] = flag
            if FIREWALLED in flags:
                firewalled.add(vs.key)
            if UNMAPPED in flags:
                continue
            vs = vs._replace(flags=())
        table[vs.key] = vs
    return DesiredRules(table, rejected, frozenset(firewalled))


class RulesViews:
    """``rules_view`` of one store's snapshots, built again only when the store has applied
    a change (its snapshot ``generation`` moved).

    Owned by the collector that diffs against it, one per store. A scrape with nothing
    changed then does no O(table) work here, and the view's objects (the copies of
    flagged frontends too) are the ones of the last scrape, so ``TableDiffer`` compares
    none of them again.
    """

    def __init__(self) -> None:
        self._generation: int | None = None
        self._view: DesiredRules | None = None

    def of(self, snapshot) -> DesiredRules:
        if self._view is None or snapshot.generation != self._generation:
            table = snapshot.table
            if any(vs.flags for vs in table.values()):
                self._view = rules_view(table.values())
            else:  # nothing to take apart: the snapshot's own table, not a copy of it
                self._view = DesiredRules(table, {}, frozenset())
            self._generation = snapshot.generation
        return self._view


def desired_rules(services: Iterable[Service], slices_by_service: Mapping[str, list[EndpointSlice]],
                  node: desired.NodeFacts, mode: str = MODE_NFTABLES) -> DesiredRules:
    """The whole node's desired rules (offline tools, tests), the first claim of a shared
    frontend winning as in ``desired.desired_table``."""
    table = desired.desired_table(services, slices_by_service, node, model=model_for(desired.KUBE_PROXY, mode))
    return rules_view(table.values())
