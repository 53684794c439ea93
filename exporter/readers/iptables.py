"""What kube-proxy's iptables rules mean for Services: the one resolver of iptables mode.

Every source of iptables rules (``iptables-save`` text: ``iptables_save``; the
iptables-nft backend's nf_tables over netlink: ``iptables_nft``; the iptables-legacy
backend's x_tables blob: ``iptables_legacy``) fills plain
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
they reach, each chain resolved once (dicts, no scan per frontend). With a ``cache`` kept
by the caller, a later call walks again only the chains that changed and the chains that
read them (``_Family``): after kube-proxy's partial sync for one Service, that Service's
chains, plus one identity pass over the chain dicts in C.
"""

from __future__ import annotations

import base64
import gc
import hashlib
from collections.abc import Mapping
from itertools import compress, filterfalse
from operator import is_not
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

    def __eq__(self, other) -> bool:
        # At C speed between two of these: the resolver asks on every call whether the names moved.
        if isinstance(other, ChainServices):
            return self._by_hash == other._by_hash
        return Mapping.__eq__(self, other)

    __hash__ = None  # a mutable-looking Mapping: unhashable, as Mapping is


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
    """One family's rules resolved, and what a later call needs to resolve again only what
    changed: kept in the caller's ``cache`` between calls (one owner: the resolve's caller).

    Incremental (both tables plain dicts of tuples, as the iptables-nft and save sources
    give): a chain whose tuple is the same object as last time, or equal to it (a partial
    sync writes the top-level chains again from the same rule objects: tuples of identical
    objects compare at C speed), keeps its resolution unless a chain it reads changed; the
    reverse edges (``readers``) carry a change up to every chain that read it. Frontends are
    read again only when KUBE-SERVICES or KUBE-NODEPORTS changed, verdicts only when the
    filter chains they come from did, sizes are counts moved by what changed.
    Whole (any other mapping, e.g. iptables_blob.LazyChains that decodes a fresh tuple each
    time; or after a loop or an over-deep nesting, whose problem text depends on the order
    chains were reached): everything resolved again, as a first call.
    """

    def __init__(self, family: int) -> None:
        self.family = family
        self.where = f"{FAMILY_NAMES.get(family, family)} nat"
        self.nat: Chains = {}
        self.filter: Chains = {}
        self.chain_services: Mapping[str, str] = {}
        self.resolved: dict[str, _Resolved] = {}  # but KUBE-SEP- chains': one DNAT each, cheap to read again
        # chain -> the chain that reads it, or a set of them (most chains have one reader).
        self.readers: dict[str, str | set[str]] = {}
        self.ports: dict[str, int] = {}  # endpoint ports by text, one int object each
        self.in_progress: set[str] = set()
        self.order_dependent = False  # a loop or a too-deep chain was met: next call resolves whole
        self.frontend_list: list[tuple[VirtualServerKey, str, str | None]] = []
        self.frontend_unread: list[str] = []  # what KUBE-SERVICES / KUBE-NODEPORTS hold that was not read
        self.rejected: dict[VirtualServerKey, str] = {}
        self.firewalled: set[VirtualServerKey] = set()
        self.verdict_unread: list[str] = []
        self.counts: list[int] | None = None  # chains, rules, kube, svc, sep of nat and filter
        self.hooked = False  # nat PREROUTING and OUTPUT jump to KUBE-SERVICES
        self.table: Table = {}  # this family's frontends read fully
        self.problems: dict[VirtualServerKey, str] = {}  # frontends not read fully: why

    # -- one call ----------------------------------------------------------------

    def read(self, ruleset: IptablesRuleset, chain_services: Mapping[str, str]) -> None:
        nat = ruleset.tables.get("nat", {})
        self.hooked = all(any(r.target == SERVICES for r in nat.get(hook, ())) for hook in ("PREROUTING", "OUTPUT"))
        self._read(ruleset, chain_services)

    def _read(self, ruleset: IptablesRuleset, chain_services: Mapping[str, str]) -> None:
        nat = ruleset.tables.get("nat", {})
        filter_ = ruleset.tables.get("filter", {})
        told = _told_changes(self.nat, nat), _told_changes(self.filter, filter_)
        incremental = self.counts is not None and not self.order_dependent and (
            None not in told or (type(nat) is dict and type(self.nat) is dict
                                 and type(filter_) is dict and type(self.filter) is dict))
        if not incremental:
            self._whole(nat, filter_, chain_services)
            return
        if None not in told:  # the source says what changed since the chains it gave last time
            nat_changed, filter_changed = told
            self.counts = _source_counts(nat, filter_)
        else:
            nat_changed = _changed_chains(self.nat, nat)
            filter_changed = _changed_chains(self.filter, filter_)
            _recount(self.counts, self.nat, nat, nat_changed)
            _recount(self.counts, self.filter, filter_, filter_changed)
        self.nat, self.filter = nat, filter_
        if not filter_changed.isdisjoint(_VERDICT_CHAINS):
            self._verdicts()
        invalid = self._invalidate(nat_changed)
        names_changed = chain_services is not self.chain_services and chain_services != self.chain_services
        self.chain_services = chain_services
        if SERVICES in nat_changed or NODEPORTS in nat_changed:
            self.frontend_list = self._frontends()
            self._place_all()
        elif names_changed:
            self._place_all()
        else:
            previous = self.table
            # A scan of the frontends (11,000 at 10,000 Services: a millisecond), not a dict of
            # them by chain kept for it (2 MB).
            for key, chain, comment in self.frontend_list:
                if chain in invalid:
                    self._place(key, chain, comment, previous)
        if self.order_dependent:  # met a loop or a too-deep chain here: its text is a whole resolve's
            self._whole(nat, filter_, chain_services)

    def _whole(self, nat: Chains, filter_: Chains, chain_services: Mapping[str, str]) -> None:
        self.nat, self.filter, self.chain_services = nat, filter_, chain_services
        self.resolved, self.readers, self.ports = {}, {}, {}
        self.order_dependent = False
        self._verdicts()
        self.frontend_list = self._frontends()
        self._place_all()
        # After the walk: a source that counts a chain on its first dump (iptables_nft)
        # has counted nearly all of them by now, and dumps only the rest.
        self.counts = _source_counts(nat, filter_) or _counts(nat, filter_)
        if not (type(nat) is dict and type(filter_) is dict) and not hasattr(nat, "changed"):
            # A source whose chains are decoded afresh on each access and that cannot say
            # which changed is resolved whole on every call: what would only serve the next
            # call is not kept.
            self.resolved, self.readers, self.ports = {}, {}, {}
            self.nat, self.filter = {}, {}  # nor the mapping, which holds the kernel's whole blob

    def _place_all(self) -> None:
        previous = self.table
        self.table, self.problems = {}, {}
        for key, chain, comment in self.frontend_list:
            self._place(key, chain, comment, previous)

    def _place(self, key: VirtualServerKey, chain: str, comment: str | None, previous: Table) -> None:
        """One frontend into ``table`` (the last call's object when equal) or ``problems``."""
        resolved = self.resolve(chain)
        if resolved.problems:
            self.table.pop(key, None)
            self.problems[key] = f"{self.where}: {key} (-> {chain}): {'; '.join(resolved.problems)}"
            return
        self.problems.pop(key, None)
        service = self.chain_services.get(chain) or _service_of_comment(comment)
        vs = VirtualServer(key, SCHEDULER, resolved.affinity_timeout, resolved.real_servers, service)
        old = previous.get(key)
        if old is not None and old == vs:
            # The last read's key object too (a new one each re-read, made among that read's
            # transients, pinned the allocator's arenas: bench/bench_iptables_legacy.py).
            self.table[old.key] = old
        else:
            self.table[key] = vs

    def _invalidate(self, changed: set[str]) -> set[str]:
        """Forget the resolution of every changed chain and of every chain that reads one,
        up to the frontends; gives them all."""
        invalid = set(changed)
        stack = list(changed)
        readers = self.readers
        while stack:
            chain = stack.pop()
            self.resolved.pop(chain, None)
            found = readers.get(chain)
            if found is None:
                continue
            for reader in (found,) if type(found) is str else found:
                if reader not in invalid:
                    invalid.add(reader)
                    stack.append(reader)
        for chain in changed:
            if chain not in self.nat:
                readers.pop(chain, None)  # gone: a reader still jumping to it records it again
        return invalid

    def unread_lines(self) -> list[str]:
        """What was not read, in the order a whole resolve names it: frontends (in rule order),
        then the filter's verdicts, then KUBE-SERVICES / KUBE-NODEPORTS."""
        lines = [self.problems[key] for key, _, _ in self.frontend_list if key in self.problems] \
            if self.problems else []
        return lines + self.verdict_unread + self.frontend_unread

    def sizes(self) -> IptablesSizes:
        chains, rules, kube, svc, sep = self.counts
        return IptablesSizes(chains, rules, kube, svc, sep, self.hooked)

    # -- frontends -------------------------------------------------------------

    def _frontends(self) -> list[tuple[VirtualServerKey, str, str | None]]:
        """(key, chain, comment) of every frontend, the first rule of a key first; what is not
        understood goes to ``self.frontend_unread``."""
        out = []
        unread = self.frontend_unread = []
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
                unread.append(f"{self.where}: {SERVICES} rule {index} (-j {target}) is not kube-proxy's: "
                              "the frontends after it may not be reached")
                continue
            key = _frontend_key(rule)
            problems = _problems_of(rule)
            if key is None or problems or rule.source is not None or rule.src_type or rule.dst_type:
                unread.append(f"{self.where}: {SERVICES} rule {index} (-j {target}) is not a frontend "
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
                    unread.append(f"{self.where}: {NODEPORTS} rule {index} (-j {target}) is not kube-proxy's: "
                                  "the NodePorts after it may not be reached")
                    continue
                protocol = PROTOCOLS.get(rule.protocol or "")
                problems = _problems_of(rule)
                if (protocol is None or rule.dport is None or problems or rule.destination is not None
                        or rule.source is not None):
                    unread.append(f"{self.where}: {NODEPORTS} rule {index} (-j {target}) is not a NodePort "
                                  f"rule this reader understands{': ' + '; '.join(problems) if problems else ''}")
                    continue
                key = VirtualServerKey(protocol, None, rule.dport)
                if key not in seen:
                    seen.add(key)
                    out.append((key, target, rule.comment))
        # The last list's entry where equal: the new ones (key, chain name, comment: 55,000
        # objects at 10,000 Services) were made among the read's decoded rules, and kept
        # they pinned ~5 MB of the allocator's arenas after every whole legacy re-read.
        previous = {entry: entry for entry in self.frontend_list}
        return [previous.get(entry, entry) for entry in out]

    def _verdicts(self) -> None:
        rejected: dict[VirtualServerKey, str] = {}
        firewalled: set[VirtualServerKey] = set()
        unread = self.verdict_unread = []
        where = self.where.replace(" nat", " filter")
        for chain in (SERVICES, EXTERNAL_SERVICES):
            for index, rule in enumerate(self.filter.get(chain, ()), 1):
                verdict = _VERDICTS.get(rule.target)
                if verdict is None:
                    continue  # not a verdict: traffic goes on to the next rule
                bad = _problems_of(rule) if rule.unknown else ()
                if bad:
                    unread.append(f"{where}: {chain} rule {index} (-j {rule.target}): {'; '.join(bad)}")
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
        self.rejected, self.firewalled = rejected, firewalled

    # -- chains ----------------------------------------------------------------

    def resolve(self, chain: str, depth: int = 0) -> _Resolved:
        is_endpoint = chain.startswith(SEP)
        if not is_endpoint:
            done = self.resolved.get(chain)
            if done is not None:
                return done
        if chain in self.in_progress:
            self.order_dependent = True
            return _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} loops back to itself",))
        if chain not in self.nat:
            result = _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} is missing",))
        elif depth > MAX_CHAIN_DEPTH:
            self.order_dependent = True
            result = _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} nests deeper than kube-proxy's",))
        elif is_endpoint:
            result = self._endpoint(chain)  # jumps nowhere: cannot loop
        else:
            self.in_progress.add(chain)
            try:
                result = self._walk(chain, depth)
            finally:
                self.in_progress.discard(chain)
        if not is_endpoint:
            # An endpoint chain's is not kept even for the rest of the call (reached twice only
            # by a Service of both traffic policies): 50,000 of them, kept to the end, pinned
            # ~11 MB of the allocator's arenas among what the resolution keeps.
            self.resolved[chain] = result
        return result

    def _read_by(self, chain: str, reader: str) -> None:
        """Record that ``reader``'s resolution depends on ``chain``'s (a second reader or more)."""
        readers = self.readers
        found = readers[chain]
        if type(found) is str:
            if found != reader:
                readers[chain] = {found, reader}
        else:
            found.add(reader)

    def _walk(self, chain: str, depth: int) -> _Resolved:
        endpoints: set[tuple[str, int]] = set()
        followed: list[RealServers] = []
        problems: list[str] = []
        affinity: int | None = None
        is_ext, is_fw = chain.startswith(EXT), chain.startswith(FW)
        readers = self.readers
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
            # ``chain`` reads ``target`` (inline: 61,000 edges in a first resolve at 10,000 Services).
            reader = readers.setdefault(target, chain)
            if reader is not chain and reader != chain:
                self._read_by(target, chain)
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
    ``cache``: a dict the caller keeps between calls (one per reader): the next call then
    resolves again only the chains that changed and the chains that read them (``_Family``),
    and a frontend equal to the last call's is the same object, which ``TableDiffer``
    compares no more. Raises ``NoKubeProxyRules`` when no family holds any KUBE- chain.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # tens of thousands of small objects, no cycles: nothing for the collector to find
    try:
        return _resolve(rulesets, chain_services or {}, cache)
    except BaseException:
        if cache is not None:
            cache.clear()  # a call cut short leaves nothing half-updated for the next one
        raise
    finally:
        if gc_was_enabled:
            gc.enable()


def _resolve(rulesets: list[IptablesRuleset], chain_services: Mapping[str, str], cache: dict | None) -> IptablesRead:
    if not any(name.startswith("KUBE-") for rs in rulesets for table in rs.tables.values() for name in table):
        raise NoKubeProxyRules("no kube-proxy iptables rules (no KUBE- chain in any table)")
    if cache is None:
        cache = {}
    kept: dict[int, _Family] = cache.get("families", {})
    families: dict[int, _Family] = {}
    table: Table = {}
    rejected: dict[VirtualServerKey, str] = {}
    firewalled: set[VirtualServerKey] = set()
    unread: list[str] = []
    sizes: dict[str, IptablesSizes] = {}
    last_merged = cache.get("merged", {})
    merged: dict[VirtualServerKey, VirtualServer] = {}
    # IPv4 first, then IPv6: a dual-stack NodePort's verdict is the IPv6 table's, as in nftables mode.
    for ruleset in sorted(rulesets, key=lambda r: r.family):
        family = families[ruleset.family] = kept.get(ruleset.family) or _Family(ruleset.family)
        family.read(ruleset, chain_services)
        sizes[FAMILY_NAMES.get(ruleset.family, str(ruleset.family))] = family.sizes()
        rejected.update(family.rejected)
        firewalled |= family.firewalled
        unread += family.unread_lines()
        if not table:
            table = dict(family.table)
            continue
        # A dual-stack Service's NodePort is in both families' rules: one frontend (address
        # None) on every node-port address, each family's endpoints.
        both = table.keys() & family.table.keys()
        earlier = {key: table[key] for key in both}
        table.update(family.table)
        for key in both:
            vs = family.table[key]
            vs = vs._replace(real_servers=RealServers((*earlier[key].real_servers, *vs.real_servers)))
            old = last_merged.get(key)
            table[key] = merged[key] = old if old is not None and old == vs else vs
    cache["families"], cache["merged"] = families, merged
    return IptablesRead(table, rejected, frozenset(firewalled), tuple(unread), sizes)


_VERDICT_CHAINS = frozenset((SERVICES, EXTERNAL_SERVICES, PROXY_FIREWALL))


def _changed_chains(old: Chains, new: Chains) -> set[str]:
    """Chains of ``new`` whose rules differ from ``old``'s, and chains of either one alone.
    The identity pass runs in C (61,000 chains at 10,000 Services); a tuple that is not the
    same object is compared, which is C speed again when its rules are the same objects."""
    candidates = list(compress(new, map(is_not, map(old.get, new), new.values())))
    changed = {name for name in candidates if old.get(name) != new[name]}
    added = sum(1 for name in candidates if name not in old)
    if len(new) - added != len(old):  # some chains of ``old`` are gone (found in C, as above)
        changed.update(filterfalse(new.__contains__, old))
    return changed




def _told_changes(old: Chains, new: Chains) -> set[str] | None:
    """The chains ``new`` says changed since ``old`` (a source that keeps no rules names
    them: iptables_nft.NftChains), or None when it cannot say that of ``old``."""
    changed = getattr(new, "changed", None)
    if new is old and changed is not None:
        return set()  # the same read served again: nothing moved
    if changed is None or getattr(new, "since", None) != getattr(old, "read_id", False):
        return None
    return changed


def _source_counts(*tables: Chains) -> list[int] | None:
    """``_counts`` as the source keeps them (``counts()``), or None when it does not."""
    totals = [0, 0, 0, 0, 0]
    for table in tables:
        counts = getattr(table, "counts", None)
        if counts is None:
            return None
        for i, value in enumerate(counts()):
            totals[i] += value
    return totals


def _kinds(name: str) -> tuple[int, int, int]:
    """(KUBE-*, KUBE-SVC-/SVL-, KUBE-SEP-) as 0/1 for one chain name."""
    if not name.startswith("KUBE-"):
        return 0, 0, 0
    return 1, int(name.startswith((SVC, SVL))), int(name.startswith(SEP))


def _counts(*tables: Chains) -> list[int]:
    """chains, rules, KUBE- chains, KUBE-SVC-/SVL- chains, KUBE-SEP- chains of ``tables``."""
    chains = rules = kube = svc = sep = 0
    for table in tables:
        for name, length in chain_lengths(table):
            chains += 1
            rules += length
            if name.startswith("KUBE-"):
                kube += 1
                if name.startswith((SVC, SVL)):
                    svc += 1
                elif name.startswith(SEP):
                    sep += 1
    return [chains, rules, kube, svc, sep]


def _recount(counts: list[int], old: Chains, new: Chains, changed: set[str]) -> None:
    """``counts`` (``_counts``) moved from ``old`` to ``new`` by the ``changed`` chains alone."""
    for name in changed:
        kube, svc, sep = _kinds(name)
        for rules, sign in ((old.get(name), -1), (new.get(name), 1)):
            if rules is not None:
                counts[0] += sign
                counts[1] += sign * len(rules)
                counts[2] += sign * kube
                counts[3] += sign * svc
                counts[4] += sign * sep


def _service_of_comment(comment: str | None) -> str | None:
    """`ns/name:port cluster IP` -> `ns/name` (only where no chain name says it)."""
    if not comment:
        return None
    word = comment.split(" ", 1)[0]
    namespace, slash, rest = word.partition("/")
    if not slash or not namespace or not rest:
        return None
    return f"{namespace}/{rest.split(':', 1)[0]}"
