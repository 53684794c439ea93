"""What kube-proxy's iptables rules mean for Services: the one resolver of iptables mode.

Every source of iptables rules (``iptables-save`` text: ``iptables_save``; the
iptables-nft backend's nf_tables over netlink: ``iptables_netlink``) fills plain
``IptablesRuleset`` data; ``resolve_rulesets`` alone reads kube-proxy's chain
structure out of it, in the shapes of the nftables reader (``exporter.readers.
nftables``), so that desired and live compare equal on a node whose rules are right.

Followed (kubernetes/kubernetes pkg/proxy/iptables/proxier.go, newest release,
``syncProxyRules`` and ``writeServiceToEndpointRules``):

- nat ``KUBE-SERVICES``: one rule per frontend, ``-d IP -p PROTO --dport PORT``,
  jumping to the Service's chain: cluster IPs to ``KUBE-SVC-`` (Cluster policy) or
  ``KUBE-SVL-`` (internal Local), externalIPs and LoadBalancer ingress to
  ``KUBE-EXT-``, or ``KUBE-FW-`` when the Service has source ranges. Its last rule
  sends ``--dst-type LOCAL`` (or ``-d NODEIP`` per node-port address) to
  ``KUBE-NODEPORTS``, whose ``-p PROTO --dport NODEPORT`` rules go to ``KUBE-EXT-``;
  the ``-d 127.0.0.0/8 -m nfacct`` twin of each is the same frontend (localhost).
- ``KUBE-FW-``: ``-s RANGE -j KUBE-EXT-`` per allowed range; anything else falls
  through to the filter table's ``KUBE-PROXY-FIREWALL`` drop.
- ``KUBE-EXT-``: with Cluster policy, mark for masquerade and jump to ``KUBE-SVC-``;
  with Local policy, short-circuits first (``-s PODCIDR`` and ``--src-type LOCAL``
  to ``KUBE-SVC-``: not the frontend's endpoints), then ``-j KUBE-SVL-`` when this
  node has endpoints (none: the filter table drops what falls through).
- ``KUBE-SVC-`` / ``KUBE-SVL-``: session affinity first (``-m recent --name SEP
  --rcheck --seconds T --reap -j SEP``: T is the persistence timeout), then one
  ``-m statistic --mode random --probability P -j KUBE-SEP-`` per endpoint, the last
  unconditional. ``KUBE-SEP-``: masquerade hairpin traffic, then ``-j DNAT
  --to-destination ADDR:PORT`` (the real server).
- filter ``KUBE-SERVICES`` (cluster IPs) and ``KUBE-EXTERNAL-SERVICES`` (external
  IPs, LoadBalancer ingress, ``--dst-type LOCAL --dport NODEPORT``) REJECT a frontend
  without endpoints, or DROP it when its traffic policy leaves none here: the
  ``rejected`` verdicts. ``KUBE-PROXY-FIREWALL`` DROPs LoadBalancer traffic that
  ``KUBE-FW-`` did not accept: the ``firewalled`` frontends.

Mapped as the contract says: a frontend is a virtual server (a NodePort one has
address None), an endpoint a real server of weight 1, scheduler "random", the
affinity timeout the persistence timeout. Chain names are hashes of the service
port name (``chain_services_for`` maps them back from the Services), never read
from comments, which kube-proxy drops past 1,000 endpoints.

Nothing is reported healthy that was not read: a frontend whose chains cannot be
followed (a jump to a missing chain, a loop, an endpoint chain without DNAT, a
match this module does not understand on the way) is left out of the table and
named in ``unread``. Chains nothing reaches from ``KUBE-SERVICES`` (the emptied
chains of deleted Services, left to age out) are never read. A nat table without
``KUBE-SERVICES`` (flushed by another agent) gives no frontend: every desired one
shows missing. Only when no ruleset holds any ``KUBE-`` chain at all is there
nothing of kube-proxy's to read (``NoKubeProxyRules``).

Cost: one pass over the rules of ``KUBE-SERVICES``, ``KUBE-NODEPORTS`` and the chains
they reach, each chain resolved once (dicts, no scan per frontend).
"""

from __future__ import annotations

import base64
import gc
import hashlib
from collections.abc import Mapping
from typing import Iterable, NamedTuple

from exporter.dataplane import NO_REAL_SERVERS, RealServers, Table, VirtualServer, VirtualServerKey
from exporter.readers.iptables_rules import Chains, IptablesRule, IptablesRuleset, chain_lengths

# The scheduler name an iptables frontend reports: `-m statistic --mode random`, as nftables' numgen.
SCHEDULER = "random"
SERVICES, NODEPORTS, EXTERNAL_SERVICES = "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"
PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
MARK_MASQ, MARK_DROP = "KUBE-MARK-MASQ", "KUBE-MARK-DROP"  # set a mark and return: not a path
_MARKS = frozenset((MARK_MASQ, MARK_DROP, ""))  # "": a rule without -j only counts
_VERDICTS = {"REJECT": "reject", "DROP": "drop"}
SVC, SVL, EXT, FW, SEP = "KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC, SVL, EXT, FW)
PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}
LOCALHOST_NODEPORTS = "127.0.0.0/8"  # the localhost twin of a NodePort rule (route_localnet)
# Matches that count or label packets but never change which packets a rule matches.
HARMLESS_MATCHES = ("-m nfacct",)
FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}
MAX_CHAIN_DEPTH = 5  # KUBE-FW -> KUBE-EXT -> KUBE-SVL/SVC -> KUBE-SEP, and one to spare


class NoKubeProxyRules(Exception):
    """No ruleset holds a KUBE- chain: kube-proxy never programmed these tables (or they were wiped)."""


class IptablesSizes(NamedTuple):
    """One family's table sizes, for `kubenode_iptables_*`."""

    chains: int  # chains of the nat and filter tables
    rules: int  # rules of the nat and filter tables
    kube_chains: int  # chains named KUBE-*
    services: int  # KUBE-SVC- and KUBE-SVL- chains (service ports with endpoints here)
    endpoints: int  # KUBE-SEP- chains
    hooked: bool  # nat PREROUTING and OUTPUT jump to KUBE-SERVICES (traffic reaches the rules)


class IptablesRead(NamedTuple):
    table: Table  # every frontend read fully
    rejected: dict[VirtualServerKey, str]  # frontends the filter table "reject"s or "drop"s
    firewalled: frozenset[VirtualServerKey]  # LoadBalancer frontends filtered by source ranges
    unread: tuple[str, ...]  # one line per thing not read (a frontend, what and where)
    sizes: dict[str, IptablesSizes]  # by family read ("ipv4", "ipv6")


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: the first 16 base32 characters of sha256(name + protocol)."""
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def service_port_name(namespace: str, name: str, port_name: str) -> str:
    """ServicePortName.String(): `ns/name:port`, or `ns/name` for an unnamed port."""
    return f"{namespace}/{name}:{port_name}" if port_name else f"{namespace}/{name}"


class ChainServices(Mapping):
    """Chain name -> "namespace/name" for the per-Service chains (KUBE-SVC-, -SVL-, -EXT-,
    -FW-), kept once per service port by its hash: the four chains of a port share it, so
    a 10,000-Service cluster costs one small dict entry per port, not four names each."""

    __slots__ = ("_by_hash",)

    def __init__(self, by_hash: dict[str, str]) -> None:
        self._by_hash = by_hash

    def __getitem__(self, chain: str) -> str:
        prefix, _, digest = chain.rpartition("-")
        if prefix + "-" not in SERVICE_CHAIN_PREFIXES:
            raise KeyError(chain)
        return self._by_hash[digest]

    def __iter__(self):
        return (prefix + digest for digest in self._by_hash for prefix in SERVICE_CHAIN_PREFIXES)

    def __len__(self) -> int:
        return len(self._by_hash) * len(SERVICE_CHAIN_PREFIXES)


def chain_services_for(services: Iterable) -> ChainServices:
    """Chain name -> "namespace/name" for every per-Service chain (KUBE-SVC-, -SVL-, -EXT-,
    -FW-) the given Services (``exporter.kube.objects.Service``) can have."""
    by_hash: dict[str, str] = {}
    for service in services:
        key = service.key
        for port in service.ports:
            by_hash[port_proto_hash(service_port_name(service.namespace, service.name, port.name),
                                    port.protocol.lower())] = key
    return ChainServices(by_hash)


class _Resolved(NamedTuple):
    # Sorted, each once, and the very object its frontends hold (one flat tuple shared by a
    # Service's frontends, as the nftables reader's: a dict of key tuples and RealServer
    # tuples per frontend was most of the resolution's 20 MB at 10,000 Services).
    real_servers: RealServers
    affinity_timeout: int | None
    problems: tuple[str, ...]


def _problems_of(rule: IptablesRule) -> list[str]:
    return [u for u in rule.unknown if not u.startswith(HARMLESS_MATCHES)]


def _frontend_key(rule: IptablesRule) -> VirtualServerKey | None:
    """(PROTO, address, port) of a `-d IP/32 -p proto --dport N` rule; None when not one."""
    protocol = PROTOCOLS.get(rule.protocol or "")
    dest = rule.destination
    if protocol is None or rule.dport is None or dest is None or rule.destination_negated:
        return None
    address, _, prefix = dest.partition("/")
    if prefix not in ("32", "128"):
        return None
    return VirtualServerKey(protocol, address, rule.dport)


def _destination(text: str, ports: dict[str, int]) -> tuple[str, int] | None:
    """(address, port) of a DNAT's ``addr:port``; ``ports``: the resolution's port numbers
    by text (a few, shared by thousands of endpoints: an int past 256 is an object each)."""
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        host = host[1:-1]
    if not port.isdigit() or not host:
        return None
    number = ports.get(port)
    if number is None:
        number = ports[port] = int(port)
    return host, number


class _Family:
    """One family's rules resolved into the shared result."""

    def __init__(self, ruleset: IptablesRuleset, chain_services: Mapping[str, str]) -> None:
        self.family = ruleset.family
        self.where = f"{FAMILY_NAMES.get(ruleset.family, ruleset.family)} nat"
        self.nat: Chains = ruleset.tables.get("nat", {})
        self.filter: Chains = ruleset.tables.get("filter", {})
        self.chain_services = chain_services
        self.resolved: dict[str, _Resolved] = {}
        self.ports: dict[str, int] = {}  # endpoint ports by text, one int object each
        self.in_progress: set[str] = set()
        self.unread: list[str] = []  # what this family's rules hold that was not read

    def sizes(self) -> IptablesSizes:
        chains = rules = kube = svc = sep = 0
        for table in (self.nat, self.filter):
            for name, length in chain_lengths(table):
                chains += 1
                rules += length
                if name.startswith("KUBE-"):
                    kube += 1
                    if name.startswith((SVC, SVL)):
                        svc += 1
                    elif name.startswith(SEP):
                        sep += 1
        hooked = all(any(r.target == SERVICES for r in self.nat.get(hook, ())) for hook in ("PREROUTING", "OUTPUT"))
        return IptablesSizes(chains, rules, kube, svc, sep, hooked)

    # -- frontends -------------------------------------------------------------

    def frontends(self) -> list[tuple[VirtualServerKey, str, str | None]]:
        """(key, chain, comment) of every frontend, the first rule of a key first; what is not
        understood goes to ``self.unread``."""
        out = []
        seen: set[VirtualServerKey] = set()
        nodeports_hooked = False
        for index, rule in enumerate(self.nat.get(SERVICES, ()), 1):
            target = rule.target
            if target == NODEPORTS:
                # `--dst-type LOCAL` (minus ::1 or 127.0.0.0/8), or `-d NODEIP` per node-port address.
                nodeports_hooked = True
                continue
            if target in _MARKS:
                continue
            if not target.startswith(SERVICE_CHAIN_PREFIXES):
                # Not kube-proxy's (another agent's, an older kube-proxy's chain): what it
                # catches never reaches the frontends after it, and this reader cannot say what.
                self.unread.append(f"{self.where}: {SERVICES} rule {index} (-j {target}) is not kube-proxy's: "
                                   "the frontends after it may not be reached")
                continue
            key = _frontend_key(rule)
            problems = _problems_of(rule)
            if key is None or problems or rule.source is not None or rule.src_type or rule.dst_type:
                self.unread.append(f"{self.where}: {SERVICES} rule {index} (-j {target}) is not a frontend "
                                   f"this reader understands{': ' + '; '.join(problems) if problems else ''}")
                continue
            if key not in seen:  # the first rule matching a frontend takes its traffic
                seen.add(key)
                out.append((key, target, rule.comment))
        if nodeports_hooked:
            for index, rule in enumerate(self.nat.get(NODEPORTS, ()), 1):
                target = rule.target
                if rule.destination == LOCALHOST_NODEPORTS and not rule.destination_negated:
                    continue  # the localhost twin of the rule that follows it: the same frontend
                if target in _MARKS:
                    continue
                if not target.startswith(SERVICE_CHAIN_PREFIXES):
                    self.unread.append(f"{self.where}: {NODEPORTS} rule {index} (-j {target}) is not kube-proxy's: "
                                       "the NodePorts after it may not be reached")
                    continue
                protocol = PROTOCOLS.get(rule.protocol or "")
                problems = _problems_of(rule)
                if (protocol is None or rule.dport is None or problems or rule.destination is not None
                        or rule.source is not None):
                    self.unread.append(f"{self.where}: {NODEPORTS} rule {index} (-j {target}) is not a NodePort "
                                       f"rule this reader understands{': ' + '; '.join(problems) if problems else ''}")
                    continue
                key = VirtualServerKey(protocol, None, rule.dport)
                if key not in seen:
                    seen.add(key)
                    out.append((key, target, rule.comment))
        return out

    def verdicts(self, rejected: dict, firewalled: set) -> None:
        where = self.where.replace(" nat", " filter")
        for chain in (SERVICES, EXTERNAL_SERVICES):
            for index, rule in enumerate(self.filter.get(chain, ()), 1):
                verdict = _VERDICTS.get(rule.target)
                if verdict is None:
                    continue  # not a verdict: traffic goes on to the next rule
                bad = _problems_of(rule) if rule.unknown else ()
                if bad:
                    self.unread.append(f"{where}: {chain} rule {index} (-j {rule.target}): {'; '.join(bad)}")
                    continue
                key = _frontend_key(rule)
                if key is None and rule.destination is None and rule.dst_type == "LOCAL" \
                        and not rule.dst_type_negated and rule.dport is not None and rule.protocol in PROTOCOLS:
                    key = VirtualServerKey(PROTOCOLS[rule.protocol], None, rule.dport)
                if key is not None and rule.source is None:
                    rejected.setdefault(key, verdict)
        for rule in self.filter.get(PROXY_FIREWALL, ()):
            key = _frontend_key(rule)
            if key is not None and rule.target == "DROP":
                firewalled.add(key)

    # -- chains ----------------------------------------------------------------

    def resolve(self, chain: str, depth: int = 0) -> _Resolved:
        done = self.resolved.get(chain)
        if done is not None:
            return done
        if chain in self.in_progress:
            return _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} loops back to itself",))
        if chain not in self.nat:
            result = _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} is missing",))
        elif depth > MAX_CHAIN_DEPTH:
            result = _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} nests deeper than kube-proxy's",))
        else:
            self.in_progress.add(chain)
            try:
                result = self._walk(chain, depth)
            finally:
                self.in_progress.discard(chain)
            if chain.startswith(SEP):
                # An endpoint chain is reached once (twice for a Service of both policies): kept
                # until the read ends, 50,000 of them pinned ~11 MB of the allocator's arenas
                # among what the resolution keeps (bench/bench_iptables_legacy.py).
                return result
        self.resolved[chain] = result
        return result

    def _walk(self, chain: str, depth: int) -> _Resolved:
        if chain.startswith(SEP):
            return self._endpoint(chain)
        endpoints: set[tuple[str, int]] = set()
        followed: list[RealServers] = []
        problems: list[str] = []
        affinity: int | None = None
        is_ext, is_fw = chain.startswith(EXT), chain.startswith(FW)
        for index, rule in enumerate(self.nat[chain], 1):
            target = rule.target
            if target in _MARKS:
                continue  # a mark (or a counter), then back to the next rule
            if rule.unknown:
                bad = _problems_of(rule)
                if bad:
                    problems.extend(f"chain {chain} rule {index}: {b}" for b in bad)
                    continue
            if not target.startswith("KUBE-"):
                problems.append(f"chain {chain} rule {index}: -j {target} is not one of kube-proxy's paths")
                break
            conditional = (rule.source is not None or rule.src_type is not None or rule.destination is not None
                           or rule.dst_type is not None or rule.probability is not None
                           or rule.recent_mode is not None)
            if is_ext and conditional:
                continue  # a short-circuit (pod or node-local sources): not this frontend's endpoints
            if rule.recent_mode == "rcheck" and rule.recent_seconds is not None:
                affinity = rule.recent_seconds
            sub = self.resolve(target, depth + 1)
            endpoints.update(sub.real_servers)
            followed.append(sub.real_servers)
            if sub.problems:
                problems.extend(sub.problems)
            if sub.affinity_timeout is not None:
                affinity = sub.affinity_timeout
            if not conditional and not is_fw:
                break  # an unconditional jump ends this chain's choice
        if len(followed) == 1:
            # One chain followed (KUBE-EXT- to KUBE-SVC-): its real servers, the same object, so
            # a Service's ClusterIP and NodePort frontends share one.
            return _Resolved(followed[0], affinity, tuple(problems))
        return _Resolved(RealServers(sorted(endpoints)), affinity, tuple(problems))

    def _endpoint(self, chain: str) -> _Resolved:
        """A KUBE-SEP- chain: hairpin masquerade, then DNAT to its endpoint."""
        for index, rule in enumerate(self.nat[chain], 1):
            target = rule.target
            if target in _MARKS:
                continue
            bad = _problems_of(rule) if rule.unknown else ()
            if bad:
                return _Resolved(NO_REAL_SERVERS, None, tuple(f"chain {chain} rule {index}: {b}" for b in bad))
            if target != "DNAT":
                return _Resolved(NO_REAL_SERVERS, None,
                                 (f"chain {chain} rule {index}: -j {target} in an endpoint chain",))
            found = _destination(rule.to_destination, self.ports) if rule.to_destination else None
            if found is None:
                return _Resolved(NO_REAL_SERVERS, None,
                                 (f"chain {chain} rule {index}: a DNAT this reader cannot decode",))
            return _Resolved(RealServers((found,)), None, ())
        return _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} has no DNAT",))


def resolve_rulesets(rulesets: list[IptablesRuleset], chain_services: Mapping[str, str] | None = None,
                     cache: dict | None = None) -> IptablesRead:
    """What the rules of every family mean for Services.

    ``chain_services`` (``chain_services_for``) names each frontend's Service; chains it
    does not know keep the Service of their rule's comment when it has one, else none.
    ``cache``: a dict the caller keeps between calls (one per reader); a frontend equal
    to the last call's is then the same object, which ``TableDiffer`` compares no more.
    Raises ``NoKubeProxyRules`` when no family holds any KUBE- chain.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # tens of thousands of small objects, no cycles: nothing for the collector to find
    try:
        return _resolve(rulesets, chain_services or {}, cache)
    finally:
        if gc_was_enabled:
            gc.enable()


def _resolve(rulesets: list[IptablesRuleset], chain_services: Mapping[str, str], cache: dict | None) -> IptablesRead:
    if not any(name.startswith("KUBE-") for rs in rulesets for table in rs.tables.values() for name in table):
        raise NoKubeProxyRules("no kube-proxy iptables rules (no KUBE- chain in any table)")
    table: Table = {}
    rejected: dict[VirtualServerKey, str] = {}
    firewalled: set[VirtualServerKey] = set()
    unread: list[str] = []
    sizes: dict[str, IptablesSizes] = {}
    last = cache.get("frontends", {}) if cache is not None else {}
    kept: dict[VirtualServerKey, VirtualServer] = {}
    # IPv4 first, then IPv6: a dual-stack NodePort's verdict is the IPv6 table's, as in nftables mode.
    for ruleset in sorted(rulesets, key=lambda r: r.family):
        family = _Family(ruleset, chain_services)
        sizes[FAMILY_NAMES.get(ruleset.family, str(ruleset.family))] = family.sizes()
        family_rejected: dict[VirtualServerKey, str] = {}
        family.verdicts(family_rejected, firewalled)
        rejected.update(family_rejected)
        for key, chain, comment in family.frontends():
            resolved = family.resolve(chain)
            if resolved.problems:
                unread.append(f"{family.where}: {key} (-> {chain}): {'; '.join(resolved.problems)}")
                continue
            service = chain_services.get(chain) or _service_of_comment(comment)
            vs = VirtualServer(key, SCHEDULER, resolved.affinity_timeout, resolved.real_servers, service)
            other = table.get(key)
            if other is not None:
                # A dual-stack Service's NodePort is in both families' rules: one frontend
                # (address None) on every node-port address, each family's endpoints.
                vs = vs._replace(real_servers=RealServers((*other.real_servers, *vs.real_servers)))
            old = last.get(key)
            if old is not None and old == vs:
                vs = old
            # vs.key: the last read's key when unchanged, so a re-read keeps no new object of it.
            table[vs.key] = kept[vs.key] = vs
        unread.extend(family.unread)
    if cache is not None:
        cache["frontends"] = kept
    return IptablesRead(table, rejected, frozenset(firewalled), tuple(unread), sizes)


def _service_of_comment(comment: str | None) -> str | None:
    """`ns/name:port cluster IP` -> `ns/name` (only where no chain name says it)."""
    if not comment:
        return None
    word = comment.split(" ", 1)[0]
    namespace, slash, rest = word.partition("/")
    if not slash or not namespace or not rest:
        return None
    return f"{namespace}/{rest.split(':', 1)[0]}"
