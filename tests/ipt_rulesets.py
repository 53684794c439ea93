"""kube-proxy iptables rulesets for tests and the bench, as `iptables-restore` input.

The layout is kube-proxy's newest iptables mode (pkg/proxy/iptables/proxier.go,
syncProxyRules and writeServiceToEndpointRules; the expected text of
TestOverallIPTablesRules in proxier_test.go):

- filter: KUBE-SERVICES (REJECT "has no endpoints" for cluster IPs),
  KUBE-EXTERNAL-SERVICES (REJECT / DROP "has no local endpoints" for external IPs,
  LB IPs and NodePorts), KUBE-FORWARD, KUBE-PROXY-FIREWALL (DROP outside source
  ranges), KUBE-NODEPORTS, and kubelet's KUBE-FIREWALL (IPv4);
- nat: KUBE-SERVICES (cluster IP -> KUBE-SVC, external and LB IPs -> KUBE-EXT or
  KUBE-FW, the NodePort tail rule last), KUBE-NODEPORTS (IPv4: a 127.0.0.0/8 rule
  with nfacct then the plain one), KUBE-SVC / KUBE-SVL (affinity `recent --rcheck`
  first, then `statistic --probability` per endpoint), KUBE-EXT, KUBE-FW, KUBE-SEP
  (hairpin mark, `recent --set` with affinity, DNAT), KUBE-MARK-MASQ,
  KUBE-POSTROUTING;
- the jump rules kube-proxy and kubelet keep in the built-in chains.

Chain names hash as kube-proxy does: the first 16 base32 characters of the sha256 of
``ns/svc:port`` + protocol (+ ``ip:port`` for KUBE-SEP). Past 1,000 endpoints in all
(largeClusterMode) the per-endpoint comments are left out, as kube-proxy does.

The Service ports and the API objects they stand for are tests/nft_rulesets.py's
(`ServicePort`, `generated_services`, `kube_objects`, `bench_services`), so one
desired state can be written in either mode.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import shutil
import subprocess

from tests import ipt_ns
from tests.nft_rulesets import (ServicePort, bench_services, generated_services,  # noqa: F401 - re-exported
                                generated_services_v6, kube_objects)

MASQ_MARK = "0x4000"
LARGE_CLUSTER_ENDPOINTS = 1000  # kube-proxy's largeClusterEndpointsThreshold
# The nfacct objects kube-proxy's rules name (`-m nfacct` refuses a rule whose object is
# absent: IptNS makes them, as kube-proxy does at start).
LOCALHOST_NODEPORTS_NFACCT, INVALID_DROPPED_NFACCT = "localhost_nps_accepted_pkts", "ct_state_invalid_dropped_pkts"
FAMILY = {
    4: dict(POD="10.0.0.0/8", NODE="192.168.0.2"),
    6: dict(POD="fd00:10::/64", NODE="2001:db8::1"),
}
TOOLS = {("nft", 4): "iptables-nft", ("nft", 6): "ip6tables-nft",
         ("legacy", 4): "iptables-legacy", ("legacy", 6): "ip6tables-legacy"}


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def port_name(sp: ServicePort) -> str:
    """kube-proxy's ServicePortName string: ``ns/svc:port``."""
    return f"{sp.namespace}/{sp.name}:{sp.port_name}"


def endpoint_text(address: str, port: int) -> str:
    """``ip:port`` / ``[ip6]:port`` (net.JoinHostPort)."""
    address = str(ipaddress.ip_address(address))
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def chain_name(sp: ServicePort, kind: str, endpoint: tuple[str, int] | None = None) -> str:
    """KUBE-SVC / SVL / EXT / FW share the port's hash; KUBE-SEP adds the endpoint."""
    base = port_name(sp) + sp.protocol
    if kind == "SEP":
        return "KUBE-SEP-" + _hash(base + endpoint_text(*endpoint))
    return f"KUBE-{kind}-" + _hash(base)


def probability(n: int) -> str:
    """kube-proxy's `--probability` text for the first of ``n`` remaining endpoints."""
    return f"{1.0 / n:0.10f}"


def _quote(comment: str) -> str:
    return f'"{comment}"' if " " in comment else comment


def _family(sp: ServicePort) -> int:
    return ipaddress.ip_address(sp.cluster_ip).version


class _Rules:
    """Chain lines and rule lines of one table, in restore order."""

    def __init__(self) -> None:
        self.chains: list[str] = []
        self.rules: list[str] = []

    def chain(self, name: str) -> None:
        self.chains.append(f":{name} - [0:0]")

    def add(self, chain: str, *args: str) -> None:
        self.rules.append(" ".join(("-A", chain) + args))


def _endpoint_rules(nat: _Rules, sp: ServicePort, chain: str, endpoints: list[tuple[str, int]],
                    comments: bool) -> None:
    """writeServiceToEndpointRules: affinity checks first, then one rule per endpoint."""
    name = port_name(sp)

    def comment(ep: tuple[str, int]) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", _quote(f"{name} -> {endpoint_text(*ep)}")) if comments else ()

    if sp.affinity_timeout is not None:
        for ep in endpoints:
            sep = chain_name(sp, "SEP", ep)
            nat.add(chain, *comment(ep), "-m", "recent", "--name", sep, "--rcheck",
                    "--seconds", str(sp.affinity_timeout), "--reap", "-j", sep)
    for i, ep in enumerate(endpoints):
        pick = ("-m", "statistic", "--mode", "random", "--probability",
                probability(len(endpoints) - i)) if i < len(endpoints) - 1 else ()
        nat.add(chain, *comment(ep), *pick, "-j", chain_name(sp, "SEP", ep))


def service_rules(sp: ServicePort, filter_: _Rules, nat: _Rules, node_ip: str | None = None,
                  comments: bool = True, localhost_nodeports: bool = True) -> None:
    """One Service port's chains and rules (kube-proxy's loop body in syncProxyRules)."""
    family = _family(sp)
    values = FAMILY[family]
    node_ip = node_ip or values["NODE"]
    name = port_name(sp)
    proto = sp.protocol
    match = ("-m", proto, "-p", proto)
    svc, svl, ext, fw = (chain_name(sp, k) for k in ("SVC", "SVL", "EXT", "FW"))
    local_eps = [ep for ep in sp.endpoints if ep in sp.local_endpoints]
    has_endpoints = bool(sp.endpoints)
    has_external_endpoints = has_endpoints and (not sp.local or bool(local_eps))
    uses_ext = has_endpoints and sp.has_external
    uses_fw = has_endpoints and bool(sp.lb_ips) and bool(sp.source_ranges)
    lb_chain = fw if uses_fw else ext
    if not has_endpoints:
        reject, external_verdict = f"{name} has no endpoints", "REJECT"
    else:
        reject, external_verdict = f"{name} has no local endpoints", "DROP"

    if has_endpoints:
        nat.add("KUBE-SERVICES", "-m", "comment", "--comment", _quote(f"{name} cluster IP"), *match,
                "-d", sp.cluster_ip, "--dport", str(sp.port), "-j", svc)
    else:
        filter_.add("KUBE-SERVICES", "-m", "comment", "--comment", _quote(reject), *match,
                    "-d", sp.cluster_ip, "--dport", str(sp.port), "-j", "REJECT")
    for kind, addresses, target in (("external IP", sp.external_ips, ext), ("loadbalancer IP", sp.lb_ips, lb_chain)):
        for address in addresses:
            if has_endpoints:
                nat.add("KUBE-SERVICES", "-m", "comment", "--comment", _quote(f"{name} {kind}"), *match,
                        "-d", address, "--dport", str(sp.port), "-j", target)
            if uses_fw and kind == "loadbalancer IP":
                filter_.add("KUBE-PROXY-FIREWALL", "-m", "comment", "--comment",
                            _quote(f"{name} traffic not accepted by {fw}"), *match,
                            "-d", address, "--dport", str(sp.port), "-j", "DROP")
            if not has_external_endpoints:
                filter_.add("KUBE-EXTERNAL-SERVICES", "-m", "comment", "--comment", _quote(reject), *match,
                            "-d", address, "--dport", str(sp.port), "-j", external_verdict)
    if sp.node_port:
        if has_endpoints:
            if family == 4 and localhost_nodeports:
                nat.add("KUBE-NODEPORTS", "-m", "comment", "--comment", _quote(name), *match, "-d", "127.0.0.0/8",
                        "--dport", str(sp.node_port), "-m", "nfacct", "--nfacct-name", LOCALHOST_NODEPORTS_NFACCT, "-j", ext)
            nat.add("KUBE-NODEPORTS", "-m", "comment", "--comment", _quote(name), *match,
                    "--dport", str(sp.node_port), "-j", ext)
        if not has_external_endpoints:
            filter_.add("KUBE-EXTERNAL-SERVICES", "-m", "comment", "--comment", _quote(reject),
                        "-m", "addrtype", "--dst-type", "LOCAL", *match,
                        "--dport", str(sp.node_port), "-j", external_verdict)
    per_service_chains(sp, nat, node_ip, comments)


def per_service_chains(sp: ServicePort, nat: _Rules, node_ip: str | None = None, comments: bool = True) -> None:
    """The chains kube-proxy writes only for a changed Service: SVC, SVL, EXT, FW, SEP."""
    if not sp.endpoints:
        return
    family = _family(sp)
    values = FAMILY[family]
    node_ip = node_ip or values["NODE"]
    name = port_name(sp)
    proto = sp.protocol
    svc, svl, ext, fw = (chain_name(sp, k) for k in ("SVC", "SVL", "EXT", "FW"))
    local_eps = [ep for ep in sp.endpoints if ep in sp.local_endpoints]
    nat.chain(svc)
    nat.add(svc, "-m", "comment", "--comment", _quote(f"{name} cluster IP"), "-m", proto, "-p", proto,
            "-d", sp.cluster_ip, "--dport", str(sp.port), "!", "-s", values["POD"], "-j", "KUBE-MARK-MASQ")
    if sp.has_external:
        nat.chain(ext)
        if not sp.local:
            nat.add(ext, "-m", "comment", "--comment", _quote(f"masquerade traffic for {name} external destinations"),
                    "-j", "KUBE-MARK-MASQ")
        else:
            nat.add(ext, "-m", "comment", "--comment", _quote(f"pod traffic for {name} external destinations"),
                    "-s", values["POD"], "-j", svc)
            nat.add(ext, "-m", "comment", "--comment",
                    _quote(f"masquerade LOCAL traffic for {name} external destinations"),
                    "-m", "addrtype", "--src-type", "LOCAL", "-j", "KUBE-MARK-MASQ")
            nat.add(ext, "-m", "comment", "--comment", _quote(f"route LOCAL traffic for {name} external destinations"),
                    "-m", "addrtype", "--src-type", "LOCAL", "-j", svc)
        if not sp.local:
            nat.add(ext, "-j", svc)
        elif local_eps:
            nat.add(ext, "-j", svl)
    if sp.lb_ips and sp.source_ranges:
        nat.chain(fw)
        head = ("-m", "comment", "--comment", _quote(f"{name} loadbalancer IP"))
        from_node = False
        for source in sp.source_ranges:
            nat.add(fw, *head, "-s", source, "-j", ext)
            from_node |= ipaddress.ip_address(node_ip) in ipaddress.ip_network(source, strict=False)
        if from_node:
            for address in sp.lb_ips:
                nat.add(fw, *head, "-s", address, "-j", ext)
        nat.add(fw, "-m", "comment", "--comment",
                _quote(f"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"))
    _endpoint_rules(nat, sp, svc, sp.endpoints, comments)
    if sp.local and local_eps:
        nat.chain(svl)
        _endpoint_rules(nat, sp, svl, local_eps, comments)
    for ep in sp.endpoints:
        sep = chain_name(sp, "SEP", ep)
        nat.chain(sep)
        head = ("-m", "comment", "--comment", _quote(name)) if comments else ()
        nat.add(sep, *head, "-s", str(ipaddress.ip_address(ep[0])), "-j", "KUBE-MARK-MASQ")
        affinity = ("-m", "recent", "--name", sep, "--set") if sp.affinity_timeout is not None else ()
        nat.add(sep, *head, *affinity, "-m", proto, "-p", proto, "-j", "DNAT", "--to-destination", endpoint_text(*ep))


def _top_level(family: int, filter_: _Rules, nat: _Rules, localhost_nodeports: bool = True) -> None:
    """The chains kube-proxy writes on every sync, and their fixed rules (before the Services')."""
    for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
        filter_.chain(chain)
    for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"):
        nat.chain(chain)
    nat.add("KUBE-POSTROUTING", "-m", "mark", "!", "--mark", f"{MASQ_MARK}/{MASQ_MARK}", "-j", "RETURN")
    nat.add("KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", MASQ_MARK)
    nat.add("KUBE-POSTROUTING", "-m", "comment", "--comment", '"kubernetes service traffic requiring SNAT"',
            "-j", "MASQUERADE", "--random-fully")
    nat.add("KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", MASQ_MARK)
    if family == 4 and localhost_nodeports:
        filter_.chain("KUBE-FIREWALL")
        filter_.add("KUBE-FIREWALL", "-m", "comment", "--comment", '"block incoming localnet connections"',
                    "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8", "-m", "conntrack",
                    "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP")


def _tail(family: int, filter_: _Rules, nat: _Rules) -> None:
    """What kube-proxy writes after the Services: the NodePort tail rule, KUBE-FORWARD."""
    not_localhost = ("!", "-d", "::1/128") if family == 6 else ()
    nat.add("KUBE-SERVICES", "-m", "comment", "--comment",
            '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"',
            "-m", "addrtype", "--dst-type", "LOCAL", *not_localhost, "-j", "KUBE-NODEPORTS")
    filter_.add("KUBE-FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-m", "nfacct",
                "--nfacct-name", INVALID_DROPPED_NFACCT, "-j", "DROP")
    filter_.add("KUBE-FORWARD", "-m", "comment", "--comment", '"kubernetes forwarding rules"',
                "-m", "mark", "--mark", f"{MASQ_MARK}/{MASQ_MARK}", "-j", "ACCEPT")
    filter_.add("KUBE-FORWARD", "-m", "comment", "--comment", '"kubernetes forwarding conntrack rule"',
                "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")


def jump_rules(family: int) -> tuple[list[str], list[str]]:
    """The rules in the built-in chains (kube-proxy's iptablesJumpChains and kubelet's
    KUBE-FIREWALL jumps), which it keeps with `iptables -I`, not restore: (filter, nat)."""
    new = ("-m", "conntrack", "--ctstate", "NEW")
    filter_ = _Rules()
    for chain in ("INPUT", "FORWARD", "OUTPUT"):
        filter_.add(chain, *new, "-m", "comment", "--comment", '"kubernetes load balancer firewall"',
                    "-j", "KUBE-PROXY-FIREWALL")
    filter_.add("INPUT", "-m", "comment", "--comment", '"kubernetes health check service ports"', "-j", "KUBE-NODEPORTS")
    for chain in ("INPUT", "FORWARD"):
        filter_.add(chain, *new, "-m", "comment", "--comment", '"kubernetes externally-visible service portals"',
                    "-j", "KUBE-EXTERNAL-SERVICES")
    for chain in ("FORWARD", "OUTPUT"):
        filter_.add(chain, *new, "-m", "comment", "--comment", '"kubernetes service portals"', "-j", "KUBE-SERVICES")
    filter_.add("FORWARD", "-m", "comment", "--comment", '"kubernetes forwarding rules"', "-j", "KUBE-FORWARD")
    if family == 4:
        for chain in ("INPUT", "OUTPUT"):
            filter_.add(chain, "-j", "KUBE-FIREWALL")
    nat = _Rules()
    for chain in ("PREROUTING", "OUTPUT"):
        nat.add(chain, "-m", "comment", "--comment", '"kubernetes service portals"', "-j", "KUBE-SERVICES")
    nat.add("POSTROUTING", "-m", "comment", "--comment", '"kubernetes postrouting rules"', "-j", "KUBE-POSTROUTING")
    return filter_.rules, nat.rules


def _large_cluster(services: list[ServicePort]) -> bool:
    return sum(len(sp.endpoints) for sp in services) > LARGE_CLUSTER_ENDPOINTS


def _restore_text(filter_: _Rules | None, nat: _Rules | None) -> str:
    out: list[str] = []
    for table, rules in (("filter", filter_), ("nat", nat)):
        if rules is None:
            continue
        out += [f"*{table}", *rules.chains, *rules.rules, "COMMIT"]
    return "\n".join(out) + "\n"


def ruleset(services: list[ServicePort], family: int = 4, jumps: bool = True,
            large_cluster: bool | None = None, node_ip: str | None = None) -> str:
    """A whole `iptables-restore --noflush` input for the ports of ``family`` in ``services``:
    kube-proxy's full sync, with the built-in chains' jump rules when ``jumps``."""
    ports = [sp for sp in services if _family(sp) == family]
    comments = not (_large_cluster(ports) if large_cluster is None else large_cluster)
    filter_, nat = _Rules(), _Rules()
    _top_level(family, filter_, nat)
    for sp in ports:
        service_rules(sp, filter_, nat, node_ip, comments)
    _tail(family, filter_, nat)
    if jumps:
        filter_jumps, nat_jumps = jump_rules(family)
        filter_.rules = filter_jumps + filter_.rules
        nat.rules = nat_jumps + nat.rules
    return _restore_text(filter_, nat)


def endpoints_changed(services: list[ServicePort], changed: ServicePort, new_endpoints: list[tuple[str, int]],
                      family: int = 4, large_cluster: bool | None = None, node_ip: str | None = None) -> str:
    """What kube-proxy's partial sync sends when one Service's endpoints change: every
    top-level chain written again (KUBE-SERVICES, KUBE-NODEPORTS, ... and the filter
    chains: `:CHAIN` flushes it), the changed Service's own chains (SVC, SVL, EXT, FW,
    its new SEPs) written again, the others left out, its gone SEP chains deleted.
    ``changed`` (one of ``services``) takes ``new_endpoints``."""
    gone = [chain_name(changed, "SEP", ep) for ep in changed.endpoints if ep not in new_endpoints]
    changed.endpoints = list(new_endpoints)
    changed.local_endpoints = [ep for ep in changed.local_endpoints if ep in new_endpoints]
    ports = [sp for sp in services if _family(sp) == family]
    comments = not (_large_cluster(ports) if large_cluster is None else large_cluster)
    filter_, nat = _Rules(), _Rules()
    _top_level(family, filter_, nat)
    for sp in ports:
        if sp is changed:
            service_rules(sp, filter_, nat, node_ip, comments)
        else:
            _service_top_level_only(sp, filter_, nat, node_ip, comments)
    _tail(family, filter_, nat)
    for chain in gone:
        nat.chain(chain)
        nat.rules.append(f"-X {chain}")
    return _restore_text(filter_, nat)


def _service_top_level_only(sp: ServicePort, filter_: _Rules, nat: _Rules, node_ip: str | None, comments: bool) -> None:
    """An unchanged Service's rules in the top-level chains only (its own chains are skipped)."""
    own = _Rules()
    service_rules(sp, filter_, own, node_ip, comments)
    mine = set(own.chains)
    nat.rules += [r for r in own.rules if f":{r.split()[1]} - [0:0]" not in mine]


# --- loading into a namespace -------------------------------------------------

class IptNS(ipt_ns.IptNS):
    """tests/ipt_ns.py's namespace (its name, kube-proxy's nfacct objects made on enter),
    with the backend chosen per call rather than per namespace, and ``load``."""

    def __init__(self) -> None:
        super().__init__("nft")
        missing = [f"{tool}{what}" for tool in TOOLS.values() for what in ("-save", "-restore")
                   if shutil.which(f"{tool}{what}") is None]
        if missing:
            raise RuntimeError(f"missing tool(s) for the iptables tests: {', '.join(missing)} "
                               "(the iptables package; scripts/setup.sh installs it)")

    def iptables(self, *args: str, family: int = 4, backend: str = "nft", input: str | None = None,
                 tool: str = "", check: bool = True) -> subprocess.CompletedProcess:
        """``{ip,ip6}tables-{nft,legacy}[tool] ARGS`` in the namespace (tool: "", "-save", "-restore")."""
        done = subprocess.run(["nsenter", f"--net={self.path}", TOOLS[backend, family] + tool, *args],
                              input=input, capture_output=True, encoding="utf-8")
        if check and done.returncode != 0:
            raise AssertionError(f"{TOOLS[backend, family]}{tool} {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def restore(self, text: str, family: int = 4, backend: str = "nft") -> None:
        """`iptables-restore --noflush` of ``text``, as kube-proxy runs it."""
        self.iptables("--noflush", family=family, backend=backend, input=text, tool="-restore")

    def save(self, family: int = 4, backend: str = "nft", table: str | None = None) -> str:
        return self.iptables(*(("-t", table) if table else ()), family=family, backend=backend, tool="-save").stdout

    def load(self, services: list[ServicePort], family: int = 4, backend: str = "nft", **kwargs) -> None:
        """kube-proxy's rules for the ``family`` ports of ``services``, as a full sync writes them."""
        self.restore(ruleset(services, family, **kwargs), family, backend)
