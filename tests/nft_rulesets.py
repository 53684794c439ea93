"""kube-proxy nftables rulesets for tests and the bench, as `nft -f` input.

The layout follows kube-proxy's own (pkg/proxy/nftables/proxier.go):
- the base table, sets, maps and chains are baseRules of
  kubernetes/kubernetes pkg/proxy/nftables/proxier_test.go (commit 81810de635aa),
  with the newest releases' `hairpin-connections` set added;
- per Service port, the newest releases' layout (1.35+: seen on a live cluster in
  `nft list table ip kube-proxy`, and field.md): a service chain of one
  `dnat ip to numgen random mod N map { i : addr . port }` rule; external chains as
  in TestOverallNFTablesRules (Cluster: mark then goto the service chain; Local:
  pod/local short-circuits, then the local chain); session affinity as in that test
  (`ip saddr @affinity-... goto endpoint-...`, endpoint chains that update the set
  and DNAT); source ranges as its firewall chains; no-endpoint elements with their
  `ns/svc:port` comments, `goto reject-chain` or `drop` (Local, none on this node).
- ``layout="v1.31"`` writes the service chain as the older
  `numgen random mod N vmap { i : goto endpoint-... }` into per-endpoint chains,
  exactly as TestOverallNFTablesRules expects.

Lines come out in the order `nft -f` needs (table, sets, maps, chains, rules, elements).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from tests import ipset_ns

_counter = itertools.count()


class NftNS(ipset_ns.NetNS):
    """A network namespace of its own (`kn-nft-<pid>-<n>`), `nft` run inside it."""

    def __init__(self) -> None:
        missing = [t for t in ("ip", "nft", "nsenter") if shutil.which(t) is None]
        if missing:
            raise RuntimeError(f"missing tool(s) for the nftables tests: {', '.join(missing)} "
                               "(scripts/setup.sh --test installs them)")
        self.name = f"kn-nft-{os.getpid()}-{next(_counter)}"
        self.path = f"/run/netns/{self.name}"

    def nft(self, script: str) -> None:
        """`nft -f -` of ``script`` inside the namespace; fails with nft's own message."""
        done = subprocess.run(["nsenter", f"--net={self.path}", "nft", "-f", "-"], input=script,
                              capture_output=True, encoding="utf-8")
        if done.returncode != 0:
            raise AssertionError(f"nft -f failed: {done.stderr.strip()}")

BASE_SETS = """\
add set {F} kube-proxy cluster-ips {{ type {T} ; comment "Active ClusterIPs" ; }}
add set {F} kube-proxy nodeport-ips {{ type {T} ; comment "IPs that accept NodePort traffic" ; }}
add set {F} kube-proxy hairpin-connections {{ type {T} . {T} . inet_proto . inet_service ; comment "service hairpin connections" ; }}
add map {F} kube-proxy firewall-ips {{ type {T} . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}
add map {F} kube-proxy no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}
add map {F} kube-proxy no-endpoint-services {{ type {T} . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }}
add map {F} kube-proxy service-ips {{ type {T} . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}
add map {F} kube-proxy service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}
"""
BASE_CHAINS = """\
add chain {F} kube-proxy cluster-ips-check
add chain {F} kube-proxy filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}
add chain {F} kube-proxy filter-output-pre-dnat {{ type filter hook output priority -110 ; }}
add chain {F} kube-proxy filter-forward {{ type filter hook forward priority 0 ; }}
add chain {F} kube-proxy filter-input {{ type filter hook input priority 0 ; }}
add chain {F} kube-proxy filter-output {{ type filter hook output priority 0 ; }}
add chain {F} kube-proxy firewall-check
add chain {F} kube-proxy mark-for-masquerade
add chain {F} kube-proxy masquerading
add chain {F} kube-proxy nat-output {{ type nat hook output priority -100 ; }}
add chain {F} kube-proxy nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add chain {F} kube-proxy nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain {F} kube-proxy nodeport-endpoints-check
add chain {F} kube-proxy reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}
add chain {F} kube-proxy services
add chain {F} kube-proxy service-endpoints-check
"""
BASE_RULES = """\
add rule {F} kube-proxy cluster-ips-check {F} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule {F} kube-proxy cluster-ips-check {F} daddr {{ {SVC} }} drop comment "Drop traffic to unallocated ClusterIPs"
add rule {F} kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule {F} kube-proxy filter-forward ct state new jump service-endpoints-check
add rule {F} kube-proxy filter-forward ct state new jump cluster-ips-check
add rule {F} kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule {F} kube-proxy filter-input ct state new jump service-endpoints-check
add rule {F} kube-proxy filter-output ct state new jump service-endpoints-check
add rule {F} kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule {F} kube-proxy filter-output ct state new jump cluster-ips-check
add rule {F} kube-proxy firewall-check {F} daddr . meta l4proto . th dport vmap @firewall-ips
add rule {F} kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule {F} kube-proxy masquerading mark and 0x4000 == 0 return
add rule {F} kube-proxy masquerading mark set mark xor 0x4000
add rule {F} kube-proxy masquerading masquerade fully-random
add rule {F} kube-proxy nat-output jump services
add rule {F} kube-proxy nat-postrouting jump masquerading
add rule {F} kube-proxy nat-prerouting jump services
add rule {F} kube-proxy nodeport-endpoints-check {F} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule {F} kube-proxy reject-chain reject
add rule {F} kube-proxy services {F} daddr . meta l4proto . th dport vmap @service-ips
add rule {F} kube-proxy services {F} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule {F} kube-proxy service-endpoints-check {F} daddr . meta l4proto . th dport vmap @no-endpoint-services
"""
FAMILY = {
    "ip": dict(F="ip", T="ipv4_addr", POD="10.0.0.0/8", SVC="172.30.0.0/16", NODE="192.168.0.2"),
    "ip6": dict(F="ip6", T="ipv6_addr", POD="fd00:10::/64", SVC="fd00:10:96::/112", NODE="2001:db8::1"),
}


def aborted_transactions(path: str, family: str, table: str, chain: str, rounds: int, verb: str = "add"):
    """A thread running ``rounds`` nf_tables transactions in the network namespace at
    ``path``, each preparing 3,000 rules in ``chain`` (``verb``: "add" appends them,
    "insert" puts them first) then failing (a rule handle that does not exist), so the
    kernel aborts it: nothing ever committed, no generation moved, nothing announced.
    While each is prepared, a rule dump's resumption counts its rules (tests of dumps
    torn by a transaction)."""
    import threading

    batch = "".join(f"{verb} rule {family} {table} {chain} ip daddr 10.1.{i // 250}.{i % 250} counter\n"
                    for i in range(3000))
    batch += f"delete rule {family} {table} {chain} handle 999999999\n"
    failures: list[str] = []

    def run() -> None:
        for _ in range(rounds):
            done = subprocess.run(["nsenter", f"--net={path}", "nft", "-f", "-"], input=batch,
                                  capture_output=True, text=True)
            if done.returncode == 0:
                failures.append("a transaction meant to abort committed")
                return

    thread = threading.Thread(target=run)
    thread.failures = failures
    thread.start()
    return thread


@dataclass
class ServicePort:
    namespace: str
    name: str
    cluster_ip: str
    endpoints: list[tuple[str, int]]
    port: int = 80
    port_name: str = "p80"
    protocol: str = "tcp"
    node_port: int | None = None
    external_ips: list[str] = field(default_factory=list)
    lb_ips: list[str] = field(default_factory=list)
    source_ranges: list[str] = field(default_factory=list)
    affinity_timeout: int | None = None
    local: bool = False  # externalTrafficPolicy: Local
    local_endpoints: list[tuple[str, int]] = field(default_factory=list)

    @property
    def port_key(self) -> str:
        return f"{self.namespace}/{self.name}/{self.protocol}/{self.port_name}"

    def chain(self, kind: str, endpoint: tuple[str, int] | None = None) -> str:
        """kube-proxy's chain name: kind, 8 base32 characters of a sha256, the port's name."""
        name = self.port_key
        if endpoint is not None:
            address = endpoint[0].replace(":", ".")
            name = f"{name}__{address}/{endpoint[1]}"
        digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]
        return f"{kind}-{digest}-{name}"

    @property
    def has_external(self) -> bool:
        return bool(self.node_port or self.external_ips or self.lb_ips)


def generated_services() -> list[ServicePort]:
    """The IPv4 Service ports the generated-rules tests share: Cluster and Local
    external traffic, a LoadBalancer with source ranges and affinity, UDP with a local
    endpoint, one Service without endpoints."""
    return [
        ServicePort("ns1", "svc1", "172.30.0.41", [("10.180.0.1", 80), ("10.180.0.9", 80)]),
        ServicePort("ns2", "svc2", "172.30.0.42", [("10.180.0.2", 80)], node_port=3001,
                    lb_ips=["1.2.3.4"], external_ips=["192.168.99.22"], local=True),
        ServicePort("ns5", "svc5", "172.30.0.45", [("10.180.0.3", 80), ("10.180.0.4", 80)], node_port=3002,
                    lb_ips=["5.6.7.8"], source_ranges=["203.0.113.0/25", "198.51.100.0/24"],
                    affinity_timeout=10800),
        ServicePort("ns7", "dns", "172.30.0.47", [("10.180.0.7", 53), ("10.180.0.8", 53)], protocol="udp",
                    port=53, port_name="dns", node_port=3007, local=True, local_endpoints=[("10.180.0.7", 53)]),
        ServicePort("ns6", "svc6", "172.30.0.46", []),
    ]


def generated_services_v6() -> list[ServicePort]:
    """Their IPv6 companions: external IPs with affinity, a Local NodePort."""
    return [ServicePort("ns11", "svc11", "fd00:10:96::41", [("fd00:10::1", 80), ("fd00:10::2", 80)],
                        external_ips=["2001:db8::99"], affinity_timeout=60),
            ServicePort("ns9", "svc9", "fd00:10:96::49", [("fd00:10::9", 8080)], node_port=3009, local=True,
                        local_endpoints=[("fd00:10::9", 8080)])]


def kube_objects(ports: list[ServicePort], node: str) -> list[dict]:
    """The Services and EndpointSlices (as the API serves them) that rulesets of ``ports``
    stand for: ports of one namespace/name in both families are one dual-stack Service;
    local endpoints are on ``node``, the others elsewhere."""
    by_name: dict[tuple[str, str], list[ServicePort]] = {}
    for sp in ports:
        by_name.setdefault((sp.namespace, sp.name), []).append(sp)
    items = []
    for (namespace, name), family_ports in by_name.items():
        sp = family_ports[0]
        spec = {"type": "LoadBalancer" if sp.lb_ips else "NodePort" if sp.node_port else "ClusterIP",
                "clusterIP": sp.cluster_ip, "clusterIPs": [p.cluster_ip for p in family_ports],
                "ports": [{"name": sp.port_name, "protocol": sp.protocol.upper(), "port": sp.port,
                           **({"nodePort": sp.node_port} if sp.node_port else {})}],
                "externalIPs": [ip for p in family_ports for ip in p.external_ips],
                "loadBalancerSourceRanges": list(sp.source_ranges)}
        if sp.local:
            spec["externalTrafficPolicy"] = "Local"
        if sp.affinity_timeout is not None:
            spec.update(sessionAffinity="ClientIP",
                        sessionAffinityConfig={"clientIP": {"timeoutSeconds": sp.affinity_timeout}})
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                      "spec": spec,
                      "status": {"loadBalancer": {"ingress": [{"ip": ip} for p in family_ports for ip in p.lb_ips]}}})
        for p in family_ports:
            family = "IPv6" if ":" in p.cluster_ip else "IPv4"
            by_port: dict[int, list] = {}
            for address, port in p.endpoints:
                by_port.setdefault(port, []).append(
                    {"addresses": [address], "conditions": {"ready": True},
                     "nodeName": node if (address, port) in p.local_endpoints else "other-node"})
            for port, endpoints in by_port.items():
                items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                              "metadata": {"name": f"{name}-{family.lower()}-{port}", "namespace": namespace,
                                           "labels": {"kubernetes.io/service-name": name}},
                              "addressType": family,
                              "ports": [{"name": p.port_name, "protocol": p.protocol.upper(), "port": port}],
                              "endpoints": endpoints})
    return items


def _addr(family: str, address: str) -> str:
    return str(ipaddress.ip_address(address))


def service_rules(svc: ServicePort, family: str = "ip", layout: str = "newest") -> dict[str, list[str]]:
    """One Service port's lines by kind: sets, chains, rules, elements."""
    F = FAMILY[family]["F"]
    T = FAMILY[family]["T"]
    pod = FAMILY[family]["POD"]
    proto = svc.protocol
    out = {"sets": [], "chains": [], "rules": [], "elements": []}
    svc_chain = svc.chain("service")
    comment = f'comment "{svc.namespace}/{svc.name}:{svc.port_name}"'

    def dispatch(chain: str, endpoints: list[tuple[str, int]]) -> None:
        """A chain that picks one of ``endpoints`` (the service chain, or Local's local chain)."""
        out["chains"].append(f"add chain {F} kube-proxy {chain}")
        if chain == svc_chain:
            out["rules"].append(f"add rule {F} kube-proxy {chain} {F} daddr {svc.cluster_ip} "
                                f"{F} saddr != {pod} jump mark-for-masquerade")
        if not endpoints:
            return
        if svc.affinity_timeout is not None:
            for ep in endpoints:
                out["rules"].append(f"add rule {F} kube-proxy {chain} {F} saddr @{svc.chain('affinity', ep)} "
                                    f"goto {svc.chain('endpoint', ep)}")
        if layout == "newest":
            items = " , ".join(f"{i} : {_addr(family, a)} . {p}" for i, (a, p) in enumerate(endpoints))
            out["rules"].append(f"add rule {F} kube-proxy {chain} meta l4proto {proto} dnat {F} to "
                                f"numgen random mod {len(endpoints)} map {{ {items} }}")
        else:
            items = " , ".join(f"{i} : goto {svc.chain('endpoint', ep)}" for i, ep in enumerate(endpoints))
            out["rules"].append(f"add rule {F} kube-proxy {chain} numgen random mod {len(endpoints)} "
                                f"vmap {{ {items} }}")

    endpoint_chains = list(svc.endpoints) if (layout != "newest" or svc.affinity_timeout is not None) else []
    dispatch(svc_chain, svc.endpoints)
    for ep in endpoint_chains:
        chain = svc.chain("endpoint", ep)
        address = _addr(family, ep[0])
        target = f"[{address}]:{ep[1]}" if family == "ip6" else f"{address}:{ep[1]}"
        out["chains"].append(f"add chain {F} kube-proxy {chain}")
        out["rules"].append(f"add rule {F} kube-proxy {chain} {F} saddr {address} jump mark-for-masquerade")
        if svc.affinity_timeout is not None:
            aff = svc.chain("affinity", ep)
            out["sets"].append(f"add set {F} kube-proxy {aff} {{ type {T} ; flags dynamic,timeout ; "
                               f"timeout {svc.affinity_timeout}s ; }}")
            out["rules"].append(f"add rule {F} kube-proxy {chain} update @{aff} {{ {F} saddr }}")
        out["rules"].append(f"add rule {F} kube-proxy {chain} meta l4proto {proto} dnat to {target}")

    out["elements"].append(f"add element {F} kube-proxy cluster-ips {{ {svc.cluster_ip} }}")
    if svc.endpoints:
        out["elements"].append(f"add element {F} kube-proxy service-ips {{ {svc.cluster_ip} . {proto} . "
                               f"{svc.port} : goto {svc_chain} }}")
    else:
        out["elements"].append(f"add element {F} kube-proxy no-endpoint-services {{ {svc.cluster_ip} . {proto} . "
                               f"{svc.port} {comment} : goto reject-chain }}")
    if svc.has_external:
        ext = svc.chain("external")
        usable = svc.local_endpoints if svc.local else svc.endpoints
        # Without any endpoint kube-proxy writes no external chain and maps no external
        # frontend (usesExternalTrafficChain / hasEndpoints): they are only rejected.
        mapped = bool(svc.endpoints)
        if mapped:
            out["chains"].append(f"add chain {F} kube-proxy {ext}")
        if svc.local and mapped:
            out["rules"] += [
                f'add rule {F} kube-proxy {ext} {F} saddr {pod} goto {svc_chain} comment "short-circuit pod traffic"',
                f'add rule {F} kube-proxy {ext} fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
                f'add rule {F} kube-proxy {ext} fib saddr type local goto {svc_chain} comment "short-circuit local traffic"',
            ]
            if usable:
                local_chain = svc.chain("local")
                dispatch(local_chain, usable)
                out["rules"].append(f"add rule {F} kube-proxy {ext} goto {local_chain}")
        elif mapped:
            out["rules"] += [f"add rule {F} kube-proxy {ext} jump mark-for-masquerade",
                             f"add rule {F} kube-proxy {ext} goto {svc_chain}"]
        verdict = "goto reject-chain" if not svc.endpoints else "drop"
        for ip in (*svc.external_ips, *svc.lb_ips):
            if mapped:
                out["elements"].append(f"add element {F} kube-proxy service-ips {{ {ip} . {proto} . {svc.port} : goto {ext} }}")
            if not usable:
                out["elements"].append(f"add element {F} kube-proxy no-endpoint-services {{ {ip} . {proto} . "
                                       f"{svc.port} {comment} : {verdict} }}")
        if svc.node_port:
            if mapped:
                out["elements"].append(f"add element {F} kube-proxy service-nodeports {{ {proto} . {svc.node_port} : goto {ext} }}")
            if not usable:
                out["elements"].append(f"add element {F} kube-proxy no-endpoint-nodeports {{ {proto} . "
                                       f"{svc.node_port} {comment} : {verdict} }}")
        if svc.source_ranges and svc.lb_ips:
            fw = svc.chain("firewall")
            out["chains"].append(f"add chain {F} kube-proxy {fw}")
            out["rules"].append(f"add rule {F} kube-proxy {fw} {F} saddr != {{ {', '.join(svc.source_ranges)} }} drop")
            for ip in svc.lb_ips:
                out["elements"].append(f"add element {F} kube-proxy firewall-ips {{ {ip} . {proto} . {svc.port} : goto {fw} }}")
    return out


def ruleset(services: list[ServicePort], family: str = "ip", layout: str = "newest",
            base: bool = True) -> str:
    """A whole `nft -f` script: the base table then every Service port, in dump order."""
    values = FAMILY[family]
    parts = {"sets": [], "chains": [], "rules": [], "elements": []}
    for svc in services:
        for kind, lines in service_rules(svc, family, layout).items():
            parts[kind] += lines
    head = [f'add table {values["F"]} kube-proxy {{ comment "rules for kube-proxy" ; }}']
    if base:
        head.append(BASE_SETS.format(**values))
    lines = head + parts["sets"]
    if base:
        lines.append(BASE_CHAINS.format(**values))
    lines += parts["chains"]
    if base:
        lines.append(BASE_RULES.format(**values))
    lines += parts["rules"]
    if base:
        lines.append(f'add element {values["F"]} kube-proxy nodeport-ips {{ {values["NODE"]} }}')
    lines += parts["elements"]
    return "\n".join(lines) + "\n"


def endpoints_changed(svc: ServicePort, new_endpoints: list[tuple[str, int]], family: str = "ip") -> str:
    """What kube-proxy sends when one Service's endpoints change (newest layout, no affinity):
    the service chain flushed and written again, so its rule gets a new handle and a new
    anonymous map."""
    F = FAMILY[family]["F"]
    chain = svc.chain("service")
    svc.endpoints = list(new_endpoints)
    rules = [line for line in service_rules(svc, family)["rules"] if f" {chain} " in line]
    return "\n".join([f"flush chain {F} kube-proxy {chain}", *rules]) + "\n"


def endpoints_synced(svc: ServicePort, new_endpoints: list[tuple[str, int]], family: str = "ip") -> str:
    """``endpoints_changed`` as kube-proxy's partial sync sends it (1.31+: setupNFTables, then
    ensureChain): its table, sets, maps and base chains added again as they are, reject-chain
    flushed and written again, and the Service's chain added before it is flushed. nf_tables
    announces each of those (NEWSET, NEWCHAIN with the object's own handle, the rules)
    though nothing else changed."""
    values = FAMILY[family]
    F = values["F"]
    head = [f'add table {F} kube-proxy {{ comment "rules for kube-proxy" ; }}',
            BASE_SETS.format(**values), BASE_CHAINS.format(**values),
            f"flush chain {F} kube-proxy reject-chain", f"add rule {F} kube-proxy reject-chain reject",
            f'add chain {F} kube-proxy {svc.chain("service")}']
    return "\n".join(head) + "\n" + endpoints_changed(svc, new_endpoints, family)


def service_resynced(svc: ServicePort, before: dict[str, list[str]], family: str = "ip") -> str:
    """One Service's sync as kube-proxy sends it after its Service or endpoints changed in a way
    that moves map elements (endpoints 0 <-> N, say): ``before`` its ``service_rules`` as
    programmed; its chains (made if new) flushed and written again, the ones it no longer
    needs flushed (left to age out), its map elements that went deleted and the new ones added.
    One transaction. No session affinity (its sets would have to go after their chains)."""
    F = FAMILY[family]["F"]
    after = service_rules(svc, family)
    chains = [line.split()[-1] for line in after["chains"]]
    out = [line for line in after["chains"] if line not in before["chains"]]
    for chain in chains:
        out.append(f"flush chain {F} kube-proxy {chain}")
        out += [line for line in after["rules"] if line.split()[4] == chain]
    out += [f"flush chain {F} kube-proxy {line.split()[-1]}" for line in before["chains"]
            if line.split()[-1] not in chains]
    out += [element_deleted(line) for line in before["elements"] if line not in after["elements"]]
    out += [line for line in after["elements"] if line not in before["elements"]]
    return "\n".join(out) + "\n"


def element_deleted(line: str) -> str:
    """`delete element` of an `add element` line: its key alone."""
    head, body = line.split(" { ", 1)
    key = body.split(" : ")[0].removesuffix(" }").split(" comment ")[0]
    return f"{head.replace('add element', 'delete element', 1)} {{ {key} }}"


def bench_services(count: int, endpoints: int = 5, family: str = "ip") -> list[ServicePort]:
    """``count`` Services of ``endpoints`` endpoints each; every tenth also a NodePort."""
    out = []
    for i in range(count):
        if family == "ip":
            cluster_ip = f"172.30.{i // 250}.{i % 250 + 1}"
            eps = [(f"10.{1 + i // 50000}.{(i * endpoints + e) // 250 % 250}.{(i * endpoints + e) % 250 + 1}", 8080)
                   for e in range(endpoints)]
        else:
            cluster_ip = f"fd00:10:96::{i + 1:x}"
            eps = [(f"fd00:10::{i:x}:{e + 1:x}", 8080) for e in range(endpoints)]
        out.append(ServicePort(f"ns{i % 100}", f"svc{i}", cluster_ip, eps,
                               node_port=30000 + i if i % 10 == 0 and i < 2700 * 10 else None))
    return out
