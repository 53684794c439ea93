"""The live kube-proxy nftables rules as a ``Table``: tables `ip kube-proxy` and `ip6 kube-proxy`.

kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go; field.md) sends each
frontend through a verdict map: `service-ips` (address . protocol . port) and
`service-nodeports` (protocol . port, matched on the node-port addresses) go to a
Service's chain; `no-endpoint-services` / `no-endpoint-nodeports` drop or reject
frontends without a usable endpoint; `firewall-ips` sends LoadBalancer frontends
with source ranges to a firewall chain. A Service chain picks an endpoint with
`numgen random`: in the newest releases one `dnat ... map { i : addr . port }`
rule, before that a `vmap { i : goto endpoint-... }` into per-endpoint chains
that `dnat to addr:port`. External chains short-circuit pod and local sources
(conditional gotos) and then go to the Service (Cluster policy) or local chain.
Session affinity adds `ip saddr @affinity-... goto endpoint-...` rules over sets
whose timeout is the affinity timeout.

Mapped as the contract says ("Every kube-proxy mode"): a frontend is a virtual
server (a NodePort one has address None), an endpoint a real server of weight 1,
the affinity timeout its persistence timeout. Nothing is reported healthy that
was not read: a frontend whose chains cannot be followed is left out of the
table and named in ``unread``; a family whose table is half there is unread as
a whole; no table at all is an error.

A read is the kernel's once nf_tables announced its generation: the kernel numbers a
commit (the generation NFT_MSG_GETGEN answers) before it makes its objects live and
unlinks the deleted ones, and announces it (NEWGEN) last. Fenced by the generation
alone, a read that took the number in that window dumped the rules from before the
commit, or a chain half rewritten, under the commit's number, and was then kept as
"unchanged" while the generation stayed. So the reader subscribes to nf_tables' change
feed (``NftMonitor(sets=True)``: each commit's chain, rule and named-set events, NEWGEN
last; it also says what changed, below), waits
(``FEED_WAIT_SECONDS`` at most) for the announcement of the generation before it dumps,
reads again when that generation (or an older one) is announced only after its dumps
began, and serves "unchanged" only while nothing was announced since (``settled``).
Without the subscription (refused by the kernel) the generation alone fences a read,
as before, said once in the log. Two more overlaps no number or announcement shows: a
read done again because the generation moved is checked as the first was (served
unchecked, it held the next commit's rules under the number before it), and a rule
dump that holds a rule twice, or a rule after one other than the kernel says is
before it, is read again (a table's rules are dumped in parts resumed by counting
rules, and a transaction being prepared, never numbered or announced if it is
aborted, adds rules to that count: those already dumped come again, or some are
skipped; ``NftDumpTorn``). A read that still meets a commit on each of
``GENERATION_TRIES`` tries fails, saying so. A read of changes (below) that a commit
overlapped is the next try's start (``_rebase``): that try reads the commit's changes
alone, where it read every rule before (0.25 s at 10,000 Services, and a step in the
RSS, each time the programming-latency follower read while kube-proxy committed).

Cost (bench/bench_nftables.py): the generation id (NFT_MSG_GETGEN) is read every
call and the rules only when it moved, or after ``safety_interval``. A read after a
change re-reads only what changed, as the iptables-nft source does (``_read_changes``):
when the feed accounts for every generation since the last whole, clean read, the chains
its transactions touched are dumped one by one and only the frontends that reach them are
resolved again (every other chain's result is kept: ``ResolverCache.leaves``/``branches``).
The element changes of the maps the resolver reads (``ELEMENT_MAPS``: a Service added or
deleted, endpoints going to or from none, a firewall-ips change) come in the feed with
their key and data, decoded as a dump's elements are, and are applied: a frontend deleted,
or added and resolved through the kept chains (dumping any not kept), a no-endpoint
verdict or a firewalled frontend added or deleted (each family's kept apart, merged as a
whole read merges them). The sizes move by the feed's rule, chain and element counts.
kube-proxy's partial sync adds its sets, maps and base chains again as they are, and adds
a Service's chain before it flushes it: nf_tables announces those too, so a map added
again is checked by one get and a chain by its handle (``ChainHandles``); another set
made or deleted (a new Service's affinity sets) is got once, and the elements of the sets
the resolver never reads (``ELEMENTS_NOT_READ``: cluster-ips, ...) change nothing. A map
flushed is announced element by element, so it is applied too. Anything else (an overflow,
a generation the feed did not announce, a table or a map made or deleted, an element
message without elements, one of another set, an element the reader cannot decode or that
the kept state does not know, a set or a chain renamed, an unread frontend) is a whole
read, and ``whole_reason`` says why. A whole
re-read dumps the table's chains, rules and maps again but decodes only rules with new
handles (kube-proxy rewrites a changed Service's chains, giving them new handles
and a new anonymous set) and fetches only their anonymous sets, whose look-up by
name is what makes a first read expensive in the kernel. In large tables a numgen
map is asked for by its keys 0..N-1 instead of dumped, which spares the kernel two
more walks of the table's set list per map. At 10,000 Services x 5, the read after
one Service's endpoints changed went from 0.25 s of CPU (a whole re-read) to 4 ms, and
the read after a Service was added, deleted or lost its endpoints from 0.25 s to a few ms.

One resolver, two sources: ``_Resolver`` alone says what a table means, over a
``FamilyRules`` (plain ``Rule`` / ``Element`` / ``SetInfo`` data, element keys in the
kernel's byte layout) that this module's netlink dumps fill for the live reader
and ``exporter.readers.nftables_json`` fills from `nft -j` output for `diff --rules`.

Not decoded: the source ranges inside a firewall chain (``firewalled`` says which
frontends have one, not which ranges it allows).
"""

from __future__ import annotations

import bisect
import errno
import gc
import ipaddress
import logging
import re
import struct
import time
from array import array
from typing import NamedTuple

from exporter.dataplane import NO_REAL_SERVERS, RealServers, Table, VirtualServer, VirtualServerKey
from exporter.readers.nftables_monitor import ANNOUNCEMENT_BUFFER, FEED_WAIT_SECONDS, FeedError, NftMonitor, newer
from exporter.readers.nftables_netlink import (NF_DROP, NFPROTO_IPV4, NFPROTO_IPV6, NFT_GOTO, NFT_JUMP,
                                               Element, NftDumpTorn, NftNetlink, NftReadError, Rule, SetInfo,
                                               Verdict, element_of, fails_again)

log = logging.getLogger(__name__)

TABLE_NAME = "kube-proxy"
FAMILIES = (("ip", NFPROTO_IPV4, 4), ("ip6", NFPROTO_IPV6, 16))
SERVICE_IPS, SERVICE_NODEPORTS = "service-ips", "service-nodeports"
NO_ENDPOINT_SERVICES, NO_ENDPOINT_NODEPORTS = "no-endpoint-services", "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
REQUIRED_MAPS = (SERVICE_IPS, SERVICE_NODEPORTS, NO_ENDPOINT_SERVICES, NO_ENDPOINT_NODEPORTS)
# The named maps whose elements the resolver reads: a read of changes applies theirs one by one.
ELEMENT_MAPS = (*REQUIRED_MAPS, FIREWALL_IPS)
_SIZE_OF_MAP = {SERVICE_IPS: "service_ips", SERVICE_NODEPORTS: "service_nodeports",
                NO_ENDPOINT_SERVICES: "no_endpoint_services", NO_ENDPOINT_NODEPORTS: "no_endpoint_nodeports"}
# kube-proxy's sets whose elements the resolver never reads (the addresses its rules guard
# with, not where they send traffic): a change of their elements changes nothing it reports.
ELEMENTS_NOT_READ = frozenset(("cluster-ips", "nodeport-ips", "hairpin-connections"))
PROTOCOLS = {6: "TCP", 17: "UDP", 132: "SCTP"}
# The scheduler name a nftables frontend reports: numgen random, not an IPVS scheduler.
SCHEDULER = "random"
# kube-proxy's per-Service chain names: KIND-HASH-ns/name/proto/portname[__addr/port].
CHAIN_NAME = re.compile(r"^(service|external|local|firewall|endpoint)-[A-Z2-7]{8}-"
                        r"([^/]+)/([^/]+)/(tcp|udp|sctp)/([^/]*?)(?:__(.+)/(\d+))?$")
MAX_CHAIN_DEPTH = 4  # frontend -> external -> service -> endpoint
MAX_NUMGEN_KEYS = 1024  # larger maps are dumped (one request stays small)
# A dump of one set's elements walks the table's list of sets twice more than a get
# by key, but a get answers in one message per element: by key pays from a few
# thousand sets on (bench/bench_nftables.py: 2x faster at 10,000, slower at 1,000).
BY_KEY_FROM_SETS = 3000
GENERATION_TRIES = 3  # reads in a row when a commit lands during each
_HOST_U32 = struct.Struct("=I")  # numgen writes its register in host byte order


class Incomplete(Exception):
    """What was kept from the last read and the change feed cannot say this read: read whole."""


class NoKubeProxyTable(NftReadError):
    """Neither `ip` nor `ip6 kube-proxy` exists (never programmed, or deleted behind its back)."""


class NftablesSizes(NamedTuple):
    """One family's table sizes, for `kubenode_nftables_*`."""

    service_ips: int
    service_nodeports: int
    no_endpoint_services: int
    no_endpoint_nodeports: int
    chains: int
    rules: int


class NftablesRead(NamedTuple):
    table: Table  # every frontend read fully
    rejected: dict[VirtualServerKey, str]  # frontends the no-endpoint maps "drop" or "reject"
    firewalled: frozenset[VirtualServerKey]  # frontends filtered by LoadBalancer source ranges
    unread: tuple[str, ...]  # one line per thing not read (a frontend, a family's table)
    sizes: dict[str, NftablesSizes]  # by family read ("ip", "ip6")
    generation: int  # the nf_tables ruleset generation these rules are from
    read_seconds: float  # this call's own work (a generation check only, when nothing moved)
    reread: bool  # this call read the rules again


class _Resolved(NamedTuple):
    # Sorted and each once: equal sets are equal. Kept per chain between reads, and the
    # same object is its frontend's real servers (every weight 1): one flat tuple, where
    # a tuple of (address, port) tuples beside a copy for the table was 4.6 MiB at
    # 10,000 Services (a frozenset would be nine times that).
    real_servers: RealServers
    affinity_timeout: int | None
    problems: tuple[str, ...]


class Update(NamedTuple):
    """What ``_Resolver.update`` changed in one family."""

    frontends: dict[VirtualServerKey, VirtualServer | None]  # by key, None when gone from this family
    rejected: set[VirtualServerKey]  # frontends whose no-endpoint element changed
    firewalled: bool  # the family's firewalled frontends changed


class ResolverCache:
    """What one family's previous resolution leaves for the next (owned by a reader)."""

    def __init__(self) -> None:
        # A chain that follows no other: its result while its rules keep their handles.
        self.leaves: dict[str, tuple[tuple[int, ...], "_Resolved"]] = {}
        # Each frontend's last virtual server, reused while what it resolves to is equal.
        self.frontends: dict[VirtualServerKey, tuple["_Resolved", str | None, VirtualServer]] = {}
        # Chain name -> "ns/name" of its Service, or None when not a kube-proxy chain name.
        self.services: dict[str, str | None] = {}
        # A chain that follows others (an external chain, a Service's with affinity): its
        # result and the chains it followed, so a change to one of those reaches it.
        self.branches: dict[str, tuple["_Resolved", tuple[str | None, ...]]] = {}
        # The chains the no-endpoint maps' verdicts go to (reject-chain), and what they
        # meant ("reject", "drop", "": ``_verdict_kind``), read from their rules.
        self.verdict_chains: dict[str, str | None] = {}
        # This family's no-endpoint elements by frontend (what ``_verdict_kind`` made of each,
        # "" included) and its firewalled frontends: a read of changes applies the maps'
        # element changes to them, then merges the families as a whole read does.
        self.no_endpoint: dict[VirtualServerKey, str] = {}
        self.firewalled: set[VirtualServerKey] = set()


class FamilyRules:
    """One family's kube-proxy table as plain data, whatever it was read from.

    The netlink reader (below) and the reader of `nft -j` JSON
    (``exporter.readers.nftables_json``) each fill one; ``resolve_family`` alone
    says what it means. Elements keep the kernel's raw key and data bytes, so
    both sources decode them the same way.
    """

    name: str  # "ip" or "ip6"
    addr_len: int  # 4 or 16
    sets: dict[str, SetInfo]  # named sets and maps
    chain_names: set[str]
    by_chain: dict[str, list[Rule]]  # every rule, in chain order
    rule_count: int

    def named(self, name: str) -> list[Element]:
        """The elements of a named set or map."""
        raise NotImplementedError

    def anonymous(self, rule: Rule, set_name: str) -> list[Element]:
        """The elements of an anonymous set that ``rule`` uses (a numgen map)."""
        raise NotImplementedError

    def release(self, rules: list[Rule]) -> None:
        """The result of a chain of these rules is kept: their anonymous sets are not needed again."""


class _NetlinkCache:
    """What one family's previous netlink read leaves for the next (owned by the reader)."""

    def __init__(self, table_handle: int) -> None:
        self.table_handle = table_handle
        self.rules: dict[int, Rule] = {}  # by handle (of the last whole read)
        # Of the last read, for a read of what changed since (``_read_changes``): the named
        # sets, whether numgen maps are asked for by key, and every chain's handle and
        # name (``ChainHandles``).
        self.sets: dict[str, SetInfo] = {}
        self.by_key = False
        self.chains = ChainHandles()
        self.anonymous: dict[tuple[str, int], list[Element]] = {}  # by the owning rule
        self.elements: dict[bytes, Element] = {}  # named maps' elements by raw bytes
        self.resolver = ResolverCache()


class ChainHandles:
    """A table's chains by handle: which name each handle has. nf_tables announces a chain
    made (a new handle, above every other: the kernel numbers a table's objects from one
    increasing counter), one added again as it is (``add chain`` of an existing chain, as
    kube-proxy does before it flushes one: its handle and name) and one renamed (its handle,
    the new name) alike, as NEWCHAIN: only the name the handle had tells them apart.
    Sorted handles in an array and the names beside them: 16 bytes a chain (the names are
    the chain dump's interned strings), where a dict was over 80."""

    __slots__ = ("handles", "names")

    def __init__(self, chains=()) -> None:
        pairs = sorted((c.handle, c.name) for c in chains)
        self.handles = array("Q", (h for h, _ in pairs))
        self.names = [n for _, n in pairs]

    def __len__(self) -> int:
        return len(self.names)

    def name(self, handle: int) -> str | None:
        at = bisect.bisect_left(self.handles, handle)
        return self.names[at] if at < len(self.handles) and self.handles[at] == handle else None

    def add(self, handle: int, name: str) -> bool:
        """A NEWCHAIN: False when it renamed a chain (or names a handle unknown but not new)."""
        if not self.handles or handle > self.handles[-1]:
            self.handles.append(handle)
            self.names.append(name)
            return True
        return self.name(handle) == name

    def remove(self, handle: int, name: str) -> bool:
        """A DELCHAIN: False when the handle was not that chain's."""
        at = bisect.bisect_left(self.handles, handle)
        if at == len(self.handles) or self.handles[at] != handle or self.names[at] != name:
            return False
        del self.handles[at]
        del self.names[at]
        return True


class NftablesReader:
    """Reads kube-proxy's nftables tables of the calling thread's network namespace."""

    def __init__(self, safety_interval: float = 300.0, timeout: float = 5.0, clock=time.monotonic,
                 by_key_from_sets: int = BY_KEY_FROM_SETS, announcements: bool = True) -> None:
        self.safety_interval = safety_interval
        self.by_key_from_sets = by_key_from_sets
        self.timeout = timeout
        self.clock = clock
        self._last: NftablesRead | None = None
        self._last_at = 0.0
        self._families: dict[str, _NetlinkCache] = {}
        # nf_tables' commit announcements, in the network namespace of the first read's thread.
        self.use_announcements = announcements
        self._announcements: NftMonitor | None = None
        self.decoded_rules = 0  # rules decoded by the last read that read rules (tests, bench)
        self.anonymous_sets_read = 0  # anonymous sets fetched by the last read that read rules
        self.chains_dumped = 0  # chains dumped one by one by the last read of what changed
        self.elements_applied = 0  # map element changes the last read of what changed applied
        self.whole_reads = 0  # reads of every rule again (the first one included)
        self.whole_reason: str | None = None  # why the last read that read rules read them all
        # The change feed's transactions not yet in the kept state (newer than the last
        # read's generation), and why the feed lost track since, if it did.
        self._pending: list = []
        self._feed_lost: str | None = None
        self._kept_generation: int | None = None  # of the caches, when they are one read's whole
        self.overlapped = 0  # reads done again because their dumps overlapped a transaction
        self.dump_torn = False  # the last rule dump held a rule twice, or one out of place

    def close(self) -> None:
        if self._announcements is not None:
            self._announcements.close()
            self._announcements = None

    def read(self) -> NftablesRead:
        """The live table; raises ``NftReadError`` when neither family could be read."""
        start = time.perf_counter()
        self._subscribe()  # before the generation is read: no commit announced unseen after it
        with NftNetlink(self.timeout) as nl:
            generation = nl.generation()
            last = self._last
            if (last is not None and last.generation == generation
                    and self.clock() - self._last_at < self.safety_interval and self.settled()):
                return last._replace(read_seconds=time.perf_counter() - start, reread=False)
            # The read makes tens of thousands of small objects and frees few: the
            # cyclic collector would walk them again and again for nothing (none form cycles).
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                for _ in range(GENERATION_TRIES):
                    self._await(generation)
                    whole_reads = self.whole_reads
                    try:
                        result, keep = self._read_changes_or_all(nl, generation)
                        failure = None
                    except NftReadError as err:  # a set or table gone under the dumps, say
                        failure = err
                    # A commit during the dumps (the generation moved), one whose number the dumps
                    # began under and whose objects were still being made live, or a transaction
                    # being prepared meanwhile: read again.
                    after = nl.generation()
                    if after == generation and not self._overlapped(generation):
                        if failure is not None:
                            raise failure
                        break
                    if after != generation:
                        self.overlapped += 1
                        if failure is None and whole_reads == self.whole_reads and not self.dump_torn:
                            self._rebase(result, generation)
                    generation = after
                else:
                    raise NftReadError(f"the ruleset changed, or a change was under way, during each of {GENERATION_TRIES} reads in a row")
            finally:
                if gc_was_enabled:
                    gc.enable()
        # A family that could not be read for the conversation's sake (a dump that timed
        # out) is read again on the next call, not served as unread until the generation
        # moves. One whose rules fail to read (a map missing) fails the same way while the
        # generation stays: said again from this read, not read again (beside 10,000
        # Services, every scrape re-read them: 0.23 s of CPU each time, for the same line).
        self._last, self._last_at = (result, self.clock()) if keep else (None, 0.0)
        if keep and not result.unread:
            self._kept_generation = generation
        return result._replace(read_seconds=time.perf_counter() - start)

    def _rebase(self, result: NftablesRead, generation: int) -> None:
        """Keep a read of changes whose dumps a later commit overlapped as the one the next
        try starts from, so that try reads that commit's changes alone, not every rule.

        Such a read applied every transaction up to ``generation`` (the feed's), and some
        chains it dumped may already hold a later commit's rules, or part of them. Every
        chain a commit touches is named by that commit's events (its rules, a chain made or
        deleted), and the map elements come from the feed, not from dumps: the next try
        dumps those chains again and resolves every frontend that reaches them, which leaves
        nothing of the later commit half-read. Not kept: a whole read (its maps were dumped
        too), a read that failed, and a dump torn by a transaction being prepared (one
        aborted would name nothing)."""
        self._last, self._last_at = result, self.clock()
        self._kept_generation = generation

    def settled(self) -> bool:
        """No commit was announced since the last read's dumps were checked (one announced
        since, of its own generation, was still being applied while they ran). Without the
        subscription, only the generation says. A non-blocking drain: microseconds."""
        if self._announcements is None:
            return True
        drained = self._drain()
        return drained.resync is None and not drained.batches

    def _subscribe(self) -> None:
        if self.use_announcements and self._announcements is None:
            try:
                # Every change's events (which chains, which named sets), and NEWGEN last.
                self._announcements = NftMonitor(ANNOUNCEMENT_BUFFER, sets=True, elements_of=frozenset(ELEMENT_MAPS))
            except FeedError as err:
                self.use_announcements = False
                log.warning("nftables reads are fenced by the ruleset generation alone: %s", err)

    def _await(self, generation: int) -> None:
        """Until ``generation`` is announced (its commit finished), ``FEED_WAIT_SECONDS`` at
        most; not waited for before anything was announced (a commit finished before the
        subscription never is: ``_overlapped`` then says after the dumps)."""
        if self._announcements is not None:
            self._drain()
            awaited = self._announcements.until_announced(generation, time.monotonic() + FEED_WAIT_SECONDS)
            self._pending += awaited.batches
            self._feed_lost = self._feed_lost or awaited.resync

    def _drain(self):
        """The feed's queue now: its transactions are the next read's to apply."""
        drained = self._announcements.drain()
        self._pending += drained.batches
        self._feed_lost = self._feed_lost or drained.resync
        return drained

    def _overlapped(self, generation: int) -> bool:
        """The dumps overlapped a transaction: ``generation`` (or an older one) was announced
        only after they began, or an overflow lost what was (its commit may have been
        making objects live, and unlinking deleted ones, meanwhile); or the rule dump was torn
        by a transaction being prepared (a rule twice, or one out of place), which moves no
        generation until it commits, and none if it is aborted."""
        overlapped = self.dump_torn
        if self._announcements is not None:
            drained = self._drain()
            overlapped |= drained.resync is not None or any(not newer(b.generation, generation)
                                                            for b in drained.batches)
        self.overlapped += overlapped
        return overlapped

    def _read_changes_or_all(self, nl: NftNetlink, generation: int) -> tuple[NftablesRead, bool]:
        """The read of what changed since the last one when the feed says what that is,
        else of everything (``whole_reason`` says why)."""
        batches, self._pending = self._pending, []
        lost, self._feed_lost = self._feed_lost, None
        kept, self._kept_generation = self._kept_generation, None  # until this read is kept
        self.decoded_rules = self.anonymous_sets_read = self.chains_dumped = self.elements_applied = 0
        self.dump_torn = False
        try:
            return self._read_changes(nl, generation, batches, lost, kept), True
        except Incomplete as why:
            self.whole_reason = str(why)
        self.whole_reads += 1
        return self._read_all(nl, generation)

    def _read_changes(self, nl: NftNetlink, generation: int, batches: list, lost: str | None,
                      kept: int | None) -> NftablesRead:
        """The last read with what the feed's transactions since changed read again: the
        chains they touched dumped one by one, the frontends that reach them resolved
        again, the maps' element changes applied (``_Resolver.update``). Only when the
        feed has every transaction since (each generation in turn, up to the kernel's,
        nothing lost), the last read was whole and clean, and the transactions touched
        nothing but chains, their rules, the maps' elements and sets other than the maps
        (module docstring): else ``Incomplete``."""
        last = self._last
        if self._announcements is None:
            raise Incomplete("no change feed")
        if last is None or kept != last.generation:
            raise Incomplete("no read kept to start from")
        if lost:
            raise Incomplete(lost)
        expected = [(last.generation + i) & 0xFFFFFFFF for i in range(1, len(batches) + 1)]
        if [b.generation for b in batches] != expected or not expected or expected[-1] != generation:
            raise Incomplete(f"the change feed does not account for generations {last.generation} to {generation}")
        if last.unread or set(last.sizes) != set(self._families):
            raise Incomplete("the last read was not whole")
        sizes = dict(last.sizes)
        changed_keys: set[VirtualServerKey] = set()
        rejected_keys: set[VirtualServerKey] = set()
        firewalled_changed = False
        for family_name, family, addr_len in FAMILIES:
            events = [event for batch in batches for event in batch.tables.get((family, TABLE_NAME), ())]
            if not events:
                continue
            cache = self._families.get(family_name)
            if cache is None:
                raise Incomplete(f"{family_name} {TABLE_NAME} appeared")
            touched: set[str] = set()
            rules = 0
            chains = len(cache.chains)
            # map -> raw key -> (there at the last read, the element now or None), in the feed's order
            elements: dict[str, dict[bytes, tuple[bool, Element | None]]] = {}
            other_sets: set[str] = set()  # sets other than the maps, made or deleted
            for event in events:
                kind = event.kind
                if kind == "rules":
                    touched.add(event.chain)
                    rules += event.delta
                elif kind == "newchain":
                    known = len(cache.chains)
                    if not cache.chains.add(event.handle, event.chain):  # every jump to it names it anew
                        # Rules kept by handle name the old one: decode them all again.
                        cache.rules, cache.anonymous = {}, {}
                        raise Incomplete(f"{family_name} {TABLE_NAME}: chain handle {event.handle} renamed to {event.chain}")
                    if len(cache.chains) != known:  # made; one added again as it was is unchanged
                        touched.add(event.chain)
                elif kind in ("newelem", "delelem") and event.chain in ELEMENT_MAPS:
                    try:
                        element = element_of(event.body)
                    except NftReadError as err:
                        raise Incomplete(f"{family_name} {TABLE_NAME}: an element of {event.chain}: {err}") from None
                    changes = elements.setdefault(event.chain, {})
                    before = changes.get(element.key)
                    changes[element.key] = (before[0] if before else kind == "delelem",
                                            element if kind == "newelem" else None)
                elif kind == "elements" and event.chain in ELEMENTS_NOT_READ:
                    pass  # its elements are never read
                elif kind in ("newset", "delset") and event.chain not in ELEMENT_MAPS:
                    other_sets.add(event.chain)  # an affinity set made or deleted, say: read below
                elif kind == "newset" and nl.set_info(family, TABLE_NAME, event.chain) == cache.sets.get(event.chain):
                    pass  # added again as it was (kube-proxy adds its sets and maps on every sync)
                elif kind == "delchain":
                    if not cache.chains.remove(event.handle, event.chain):
                        raise Incomplete(f"{family_name} {TABLE_NAME}: chain {event.chain} deleted under another handle")
                    touched.add(event.chain)
                else:  # a table made or deleted, a map made or deleted, a set's elements not followed, ...
                    raise Incomplete(f"{family_name} {TABLE_NAME}: {kind} {event.chain or ''}".rstrip())
            chains = len(cache.chains) - chains
            for name in sorted(other_sets):
                info = nl.set_info(family, TABLE_NAME, name)
                if info is None:
                    cache.sets.pop(name, None)
                elif cache.sets.get(name, info) != info:
                    raise Incomplete(f"{family_name} {TABLE_NAME}: set {name} made again otherwise")
                else:
                    cache.sets[name] = info
            if cache.anonymous and touched:
                # Kept for chains that follow others, by rule handle: a touched chain's old
                # rules are gone (reads of changes alone would keep them forever).
                cache.anonymous = {key: elements for key, elements in cache.anonymous.items()
                                   if key[0] not in touched}
            source = _ChainDumps(nl, family_name, family, addr_len, cache, self)
            update = _Resolver(source, cache.resolver).update(touched, elements)
            changed_keys.update(update.frontends)
            rejected_keys |= update.rejected
            firewalled_changed |= update.firewalled
            size = sizes[family_name]
            counts = {_SIZE_OF_MAP[name]: getattr(size, _SIZE_OF_MAP[name])
                      + sum((now is not None) - was for was, now in changes.values())
                      for name, changes in elements.items() if name in _SIZE_OF_MAP}
            self.elements_applied += sum(map(len, elements.values()))
            sizes[family_name] = size._replace(chains=size.chains + chains, rules=size.rules + rules, **counts)
        resolvers = [cache.resolver for cache in (self._families.get(name) for name, _, _ in FAMILIES)
                     if cache is not None]
        table = dict(last.table)
        for key in changed_keys:
            parts = [resolver.frontends[key][2] for resolver in resolvers if key in resolver.frontends]
            if not parts:
                table.pop(key, None)
                continue
            table[key] = parts[0] if len(parts) == 1 else _in_both_families(parts[0], parts[-1])
        rejected = last.rejected
        if rejected_keys:
            rejected = dict(rejected)
            for key in rejected_keys:
                # As a whole read: each family in turn, the last one that rejects or drops wins.
                kind = next((k for k in (r.no_endpoint.get(key) for r in reversed(resolvers)) if k), None)
                if kind:
                    rejected[key] = kind
                else:
                    rejected.pop(key, None)
        firewalled = frozenset().union(*(r.firewalled for r in resolvers)) if firewalled_changed else last.firewalled
        return NftablesRead(table, rejected, firewalled, (), sizes, generation, 0.0, True)

    def _read_all(self, nl: NftNetlink, generation: int) -> tuple[NftablesRead, bool]:
        """The read, and whether it may be served again while the generation stays (every
        family present was read, or failed by its rules' own content: ``fails_again``)."""
        resolved = Resolution()
        for family_name, family, addr_len in FAMILIES:
            handle = nl.table(family, TABLE_NAME)
            if handle is None:
                self._families.pop(family_name, None)
                continue
            cache = self._families.get(family_name)
            if cache is None or cache.table_handle != handle.handle:
                cache = self._families[family_name] = _NetlinkCache(handle.handle)
            if not resolved.add(family_name, lambda: _NetlinkFamily(nl, family_name, family, addr_len, cache, self),
                                cache.resolver):
                self._families.pop(family_name, None)
        return resolved.result(generation), not resolved.may_read_next_time


class Resolution:
    """The frontends of every family read, gathered into one ``NftablesRead``.

    A dual-stack Service's NodePort is in both families' tables: one frontend (address
    None) whose endpoints are both families', so families resolve into one table.
    """

    def __init__(self) -> None:
        self.table: Table = {}
        self.rejected: dict[VirtualServerKey, str] = {}
        self.firewalled: set[VirtualServerKey] = set()
        self.unread: list[str] = []
        self.sizes: dict[str, NftablesSizes] = {}
        self.present: list[str] = []
        self.may_read_next_time = False  # a family failed in a way the same read may not

    def add(self, family_name: str, open_rules, cache: ResolverCache) -> bool:
        """Resolve one family present on the node (``open_rules()`` -> ``FamilyRules``);
        False when it could not be read (an ``unread`` line says why)."""
        self.present.append(family_name)
        try:
            rules = open_rules()
            self.sizes[family_name] = _Resolver(rules, cache).read(self.table, self.rejected, self.firewalled,
                                                                   self.unread)
        except NftReadError as err:
            self.unread.append(f"{family_name} {TABLE_NAME}: {err}")
            self.may_read_next_time |= not fails_again(err)
            return False
        return True

    def result(self, generation: int = 0) -> NftablesRead:
        if not self.present:
            raise NoKubeProxyTable(f"no kube-proxy nftables table (ip or ip6 {TABLE_NAME}) in this network namespace")
        if not self.sizes:
            raise NftReadError("; ".join(self.unread))
        return NftablesRead(self.table, self.rejected, frozenset(self.firewalled), tuple(self.unread), self.sizes,
                            generation, 0.0, True)


class _OverNetlink(FamilyRules):
    """A family read over netlink into a ``_NetlinkCache``: anonymous sets are fetched once
    for the rule that owns them (or taken from ``old_anonymous``, the last read's) and kept
    in the cache until the resolver releases them."""

    old_anonymous: dict = {}  # (chain, rule handle) -> elements: none unless a whole read sets them

    def __init__(self, nl: NftNetlink, name: str, family: int, addr_len: int,
                 cache: _NetlinkCache, owner: NftablesReader) -> None:
        self.nl, self.name, self.family, self.addr_len = nl, name, family, addr_len
        self.cache, self.owner = cache, owner

    def anonymous(self, rule: Rule, set_name: str) -> list[Element]:
        """An anonymous set's elements, fetched once for the rule that owns it."""
        key = (rule.chain, rule.handle)
        elements = self.old_anonymous.get(key)
        if elements is None:
            elements = _fetch_anonymous(self.nl, self.family, self.cache.by_key, rule, set_name)
            self.owner.anonymous_sets_read += 1
        self.cache.anonymous[key] = elements
        return elements

    def release(self, rules: list[Rule]) -> None:
        # A leaf is re-read only with new rules: its sets are not needed again.
        for rule in rules:
            self.cache.anonymous.pop((rule.chain, rule.handle), None)


class _NetlinkFamily(_OverNetlink):
    """One family's table dumped over netlink; rules and anonymous sets kept from the
    last read are reused while their handles stay (``_NetlinkCache``)."""

    def __init__(self, nl: NftNetlink, name: str, family: int, addr_len: int,
                 cache: _NetlinkCache, owner: NftablesReader) -> None:
        super().__init__(nl, name, family, addr_len, cache, owner)
        named, anonymous = nl.sets(family, TABLE_NAME)
        self.sets = cache.sets = {s.name: s for s in named}
        cache.by_key = anonymous >= owner.by_key_from_sets
        check_required_maps(self.sets)  # before the larger dumps
        chains = nl.chains(family, TABLE_NAME)
        self.chain_names = {c.name for c in chains}
        cache.chains = ChainHandles(chains)
        _forget_renamed(cache, self.chain_names)
        try:
            rules, decoded = nl.rules(family, TABLE_NAME, cache.rules, [c.name for c in chains])
        except NftDumpTorn:
            owner.dump_torn = True  # an aborted transaction's doing, say: read again
            raise
        owner.decoded_rules += decoded
        self.rule_count = len(rules)
        self.by_chain = {}
        for rule in rules:
            self.by_chain.setdefault(rule.chain, []).append(rule)
        # Keep only what this read saw, so the caches stay the size of the table.
        # By handle alone: nf_tables numbers a table's rules from one counter, and a
        # (chain, handle) tuple per rule was a quarter of this cache (2 MiB at 10,000 Services).
        cache.rules = {r.handle: r for r in rules}
        if len(cache.rules) != len(rules):
            # A rule twice: the dump was resumed by position while a transaction being
            # prepared inserted rules before it (not numbered, not announced yet).
            owner.dump_torn = True
        self.old_anonymous, cache.anonymous = cache.anonymous, {}
        if len(cache.elements) > 4 * (len(rules) + 1000):
            cache.elements = {}

    def named(self, name: str) -> list[Element]:
        return self.nl.elements(self.family, TABLE_NAME, name, self.cache.elements)


def _in_both_families(first: VirtualServer, second: VirtualServer) -> VirtualServer:
    """A NodePort (address None) of a dual-stack Service is in both families' tables: one
    frontend on every node-port address, the second family's with both families' endpoints."""
    return second._replace(real_servers=RealServers((*first.real_servers, *second.real_servers)))


def _forget_renamed(cache: _NetlinkCache, chain_names: set[str]) -> None:
    """A rule keeps its handle when a chain it jumps to is renamed, and the kernel then dumps
    it with the new name: a rule, or a verdict map, kept naming a chain that is not listed
    any more is read again (a few milliseconds over a large table's rules)."""
    cache.rules = {handle: rule for handle, rule in cache.rules.items()
                   if rule.verdict is None or rule.verdict.chain is None or rule.verdict.chain in chain_names}
    cache.anonymous = {key: elements for key, elements in cache.anonymous.items()
                       if all(not isinstance(e.data, Verdict) or e.data.chain is None or e.data.chain in chain_names
                              for e in elements)}


def _fetch_anonymous(nl: NftNetlink, family: int, by_key: bool, rule: Rule, set_name: str) -> list[Element]:
    """The elements of the anonymous set ``rule`` uses."""
    if by_key and rule.modulus and rule.modulus <= MAX_NUMGEN_KEYS:
        # numgen's map: ask for keys 0..N-1, the only ones traffic can hit,
        # which spares the kernel the dump's walks of the set list.
        try:
            return nl.elements_by_keys(family, TABLE_NAME, set_name, [_HOST_U32.pack(i) for i in range(rule.modulus)])
        except NftReadError as err:
            if err.errno != errno.ENOENT:
                raise
    # a key missing (not kube-proxy's map), or no numgen: all of it
    return nl.elements(family, TABLE_NAME, set_name)


class _ChainDumps(_OverNetlink):
    """One family's table as the last read left it, for ``_Resolver.update``: a chain
    asked for is dumped then (the chains a change touched, and any the resolver meets
    that it kept nothing of); the named sets are the last read's (a change to one is
    read whole). Serves as ``by_chain`` (``get``) and ``chain_names`` (``in``, ``len``)."""

    def __init__(self, nl: NftNetlink, name: str, family: int, addr_len: int,
                 cache: _NetlinkCache, owner: NftablesReader) -> None:
        super().__init__(nl, name, family, addr_len, cache, owner)
        self.sets = cache.sets
        self.by_chain = self.chain_names = self
        self.rule_count = 0
        self.dumped: dict[str, list[Rule] | None] = {}

    def _rules(self, chain: str) -> list[Rule] | None:
        if chain not in self.dumped:
            try:
                rules, decoded = self.nl.chain_rules(self.family, TABLE_NAME, chain)
            except NftDumpTorn:
                self.owner.dump_torn = True  # a transaction under it: read again
                raise
            self.owner.decoded_rules += decoded
            self.owner.chains_dumped += 1
            self.dumped[chain] = rules
        return self.dumped[chain]

    def __contains__(self, chain: object) -> bool:
        return isinstance(chain, str) and self._rules(chain) is not None

    def __len__(self) -> int:
        return len(self.cache.chains)

    def get(self, chain: str, default=None):
        rules = self._rules(chain)
        return default if rules is None else rules


def check_required_maps(sets) -> None:
    missing = [m for m in REQUIRED_MAPS if m not in sets]
    if missing:
        raise NftReadError(f"map {', '.join(missing)} missing (a half-programmed table, or not kube-proxy's)")


class _Resolver:
    """One family's frontends resolved through its chains: kube-proxy's rules read as a
    table, from any ``FamilyRules`` (netlink or `nft -j` JSON)."""

    def __init__(self, rules: FamilyRules, cache: ResolverCache) -> None:
        self.source, self.name, self.addr_len = rules, rules.name, rules.addr_len
        self.sets, self.chain_names, self.by_chain = rules.sets, rules.chain_names, rules.by_chain
        self.cache = cache
        self.resolved: dict[str, _Resolved] = {}
        self.ports: dict[bytes, int] = {}  # one int per port in a read, not one per endpoint
        self.changed: frozenset[str] = frozenset()  # an update's chains whose rules may have moved
        self.updating = False  # an update: a chain not in ``changed`` keeps its last result

    def read(self, table: Table, rejected: dict, firewalled: set, unread: list) -> NftablesSizes:
        check_required_maps(self.sets)
        cache = self.cache
        self.old_leaves, cache.leaves = cache.leaves, {}
        self.old_frontends, cache.frontends = cache.frontends, {}
        cache.branches = {}

        maps = {name: self.source.named(name) for name in (*REQUIRED_MAPS, FIREWALL_IPS) if name in self.sets}
        where = f"{self.name} {TABLE_NAME}"
        for element in maps[SERVICE_IPS]:
            key = self._service_ip_key(element.key)
            self._frontend(key, element, table, unread, where)
        for element in maps[SERVICE_NODEPORTS]:
            key = self._nodeport_key(element.key)
            self._frontend(key, element, table, unread, where)
        verdict_chains = {}
        no_endpoint: dict[VirtualServerKey, str] = {}
        for map_name, decode in ((NO_ENDPOINT_SERVICES, self._service_ip_key),
                                 (NO_ENDPOINT_NODEPORTS, self._nodeport_key)):
            for element in maps[map_name]:
                key = decode(element.key)
                verdict = self._verdict_kind(element.data)
                if isinstance(element.data, Verdict) and element.data.chain is not None:
                    verdict_chains[element.data.chain] = verdict
                if key is None or verdict is None:
                    unread.append(f"{where}: an element of {map_name} this reader cannot decode "
                                  f"({key or element.key.hex()}: {element.data})")
                else:
                    no_endpoint[key] = verdict
                    if verdict:
                        rejected[key] = verdict
        cache.firewalled = set()
        for element in maps.get(FIREWALL_IPS, ()):
            key = self._service_ip_key(element.key)
            if key is not None:
                cache.firewalled.add(key)
        firewalled.update(cache.firewalled)
        cache.verdict_chains, cache.no_endpoint = verdict_chains, no_endpoint
        return NftablesSizes(len(maps[SERVICE_IPS]), len(maps[SERVICE_NODEPORTS]),
                             len(maps[NO_ENDPOINT_SERVICES]), len(maps[NO_ENDPOINT_NODEPORTS]),
                             len(self.chain_names), self.source.rule_count)

    def update(self, changed: set[str], elements: dict | None = None) -> "Update":
        """After a read: the frontends that reach a chain of ``changed`` (rules touched, made
        or deleted since) resolved again, every other chain's result kept; and the maps'
        element changes since (``elements``: map name -> raw key -> (whether the key was there
        at the last read, its element now or None)) applied: a frontend deleted, or added and
        resolved through its chains (a kept chain's result reused, any other dumped), a
        no-endpoint verdict or a firewalled frontend added or deleted. ``Incomplete`` when
        something cannot be read as a whole read would read it without an ``unread`` line,
        when a chain that no-endpoint verdicts go to now does otherwise, or when an element
        change does not fit what was kept: the caller reads the whole table then."""
        cache = self.cache
        elements = elements or {}
        out: dict[VirtualServerKey, VirtualServer | None] = {}
        added: dict[VirtualServerKey, str | None] = {}
        for map_name, decode in ((SERVICE_IPS, self._service_ip_key), (SERVICE_NODEPORTS, self._nodeport_key)):
            for key, element in self._element_changes(map_name, decode, elements, cache.frontends):
                # Gone first, so that a chain flushed with its Service is not resolved for nothing.
                cache.frontends.pop(key, None)
                out[key] = None
                if element is not None:
                    data = element.data
                    if not isinstance(data, Verdict) or data.code not in (NFT_GOTO, NFT_JUMP):
                        raise Incomplete(f"{map_name} {key}: a frontend element this reader cannot decode")
                    added[key] = data.chain
        changed = set(changed)
        grown = True
        while grown:  # and every chain that follows one of them (a few hundred at most)
            grown = False
            for chain, (_, followed) in cache.branches.items():
                if chain not in changed and not changed.isdisjoint(followed):
                    changed.add(chain)
                    grown = True
        for chain in changed.intersection(cache.verdict_chains):
            # kube-proxy flushes reject-chain and writes it again on every sync: unchanged
            # while it still means what it meant.
            if self._verdict_kind(Verdict(NFT_GOTO, chain)) != cache.verdict_chains[chain]:
                raise Incomplete(f"chain {chain}, where no-endpoint verdicts go, changed what it does")
        for chain in changed:
            cache.leaves.pop(chain, None)
            cache.branches.pop(chain, None)
        self.old_leaves, self.changed, self.updating = {}, frozenset(changed), True
        for key, (resolved, chain, virtual_server) in cache.frontends.items():
            if chain not in changed:
                continue
            again = self._resolve(chain, 0)
            if again.problems:
                raise Incomplete(f"{key}: {'; '.join(again.problems)}")
            if again != resolved:
                virtual_server = VirtualServer(key, SCHEDULER, again.affinity_timeout, again.real_servers,
                                               self._service_of(chain))
                out[key] = virtual_server
            cache.frontends[key] = (again, chain, virtual_server)
        for key, chain in added.items():
            resolved = self._resolve(chain, 0)
            if resolved.problems:
                raise Incomplete(f"{key}: {'; '.join(resolved.problems)}")
            virtual_server = VirtualServer(key, SCHEDULER, resolved.affinity_timeout, resolved.real_servers,
                                           self._service_of(chain))
            cache.frontends[key] = (resolved, chain, virtual_server)
            out[key] = virtual_server
        rejected: set[VirtualServerKey] = set()
        for map_name, decode in ((NO_ENDPOINT_SERVICES, self._service_ip_key),
                                 (NO_ENDPOINT_NODEPORTS, self._nodeport_key)):
            for key, element in self._element_changes(map_name, decode, elements, cache.no_endpoint):
                cache.no_endpoint.pop(key, None)
                rejected.add(key)
                if element is None:
                    continue
                verdict = self._no_endpoint_kind(element.data)
                if verdict is None:
                    raise Incomplete(f"{map_name} {key}: an element this reader cannot decode ({element.data})")
                if isinstance(element.data, Verdict) and element.data.chain is not None:
                    cache.verdict_chains[element.data.chain] = verdict
                cache.no_endpoint[key] = verdict
        firewalled = False
        for key, element in self._element_changes(FIREWALL_IPS, self._service_ip_key, elements, cache.firewalled,
                                                  skip_undecoded=True):
            firewalled = True
            if element is None:
                cache.firewalled.discard(key)
            else:
                cache.firewalled.add(key)
        return Update(out, rejected, firewalled)

    @staticmethod
    def _element_changes(map_name: str, decode, elements: dict, kept, skip_undecoded: bool = False):
        """(frontend, element now or None) of each key of ``map_name`` that changed; the key
        must have been in ``kept`` exactly when the feed says it was there before."""
        for raw, (was, element) in elements.get(map_name, {}).items():
            key = decode(raw)
            if key is None:
                if skip_undecoded:  # as a whole read does (firewall-ips)
                    continue
                raise Incomplete(f"an element of {map_name} this reader cannot decode ({raw.hex()})")
            if was != (key in kept):
                raise Incomplete(f"{map_name} {key}: the change feed and the last read disagree")
            yield key, element

    def _no_endpoint_kind(self, data) -> str | None:
        """``_verdict_kind``, from the last read's finding for a chain whose rules did not move since."""
        if isinstance(data, Verdict) and data.chain is not None and data.chain not in self.changed:
            kind = self.cache.verdict_chains.get(data.chain)
            if kind is not None:
                return kind
        return self._verdict_kind(data)

    # -- elements ------------------------------------------------------------------

    def _address(self, raw: bytes) -> str:
        return str(ipaddress.ip_address(raw[:self.addr_len]))

    def _port(self, raw: bytes) -> int:
        port = self.ports.get(raw)
        if port is None:
            port = self.ports[raw] = int.from_bytes(raw, "big")
        return port

    def _service_ip_key(self, raw: bytes) -> VirtualServerKey | None:
        """address . inet_proto . inet_service, each padded to 4 bytes."""
        a = self.addr_len
        if len(raw) != a + 8 or raw[a] not in PROTOCOLS:
            return None
        return VirtualServerKey(PROTOCOLS[raw[a]], self._address(raw), int.from_bytes(raw[a + 4:a + 6], "big"))

    @staticmethod
    def _nodeport_key(raw: bytes) -> VirtualServerKey | None:
        if len(raw) != 8 or raw[0] not in PROTOCOLS:
            return None
        return VirtualServerKey(PROTOCOLS[raw[0]], None, int.from_bytes(raw[4:6], "big"))

    def _verdict_kind(self, data) -> str | None:
        """"drop" or "reject" for a no-endpoint verdict (reject is kube-proxy's reject-chain);
        "" when it goes to a chain that exists but neither rejects nor drops (a flushed
        reject-chain: traffic passes); None when it is not a verdict this reader knows."""
        if not isinstance(data, Verdict):
            return None
        if data.code == NF_DROP:
            return "drop"
        if data.code in (NFT_GOTO, NFT_JUMP) and data.chain in self.chain_names:
            rules = self.by_chain.get(data.chain, ())
            if any(r.rejects and not r.conditional for r in rules):
                return "reject"
            if any(r.verdict and r.verdict.code == NF_DROP and not r.conditional for r in rules):
                return "drop"
            return ""
        return None

    # -- frontends -----------------------------------------------------------------

    def _frontend(self, key: VirtualServerKey | None, element: Element, table: Table,
                  unread: list, where: str) -> None:
        data = element.data
        if key is None or not isinstance(data, Verdict) or data.code not in (NFT_GOTO, NFT_JUMP):
            unread.append(f"{where}: a frontend element this reader cannot decode")
            return
        resolved = self._resolve(data.chain, 0)
        if resolved.problems:
            unread.append(f"{where}: {key}: {'; '.join(resolved.problems)}")
            return
        chain = data.chain
        last = self.old_frontends.get(key)
        if last is not None and last[1] == chain and last[0] == resolved:
            virtual_server = last[2]
        else:
            service = self._service_of(chain)
            virtual_server = VirtualServer(key, SCHEDULER, resolved.affinity_timeout, resolved.real_servers,
                                           service)
        self.cache.frontends[key] = (resolved, chain, virtual_server)
        other = table.get(key)
        table[key] = virtual_server if other is None else _in_both_families(other, virtual_server)

    def _service_of(self, chain: str) -> str | None:
        services = self.cache.services
        if chain in services:
            return services[chain]
        if len(services) > 4 * len(self.chain_names) + 1000:
            services.clear()  # chains of deleted Services: keep the cache the table's size
        match = CHAIN_NAME.match(chain)
        service = services[chain] = f"{match.group(2)}/{match.group(3)}" if match else None
        return service

    def _resolve(self, chain: str | None, depth: int) -> _Resolved:
        """Where a chain sends traffic: its endpoints, affinity timeout, or why unknown."""
        done = self.resolved.get(chain)
        if done is not None:
            return done
        if self.updating and chain not in self.changed:
            # An update: a chain whose rules did not move since the last read keeps its result.
            leaf, branch = self.cache.leaves.get(chain), self.cache.branches.get(chain)
            if leaf is not None or branch is not None:
                done = self.resolved[chain] = leaf[1] if leaf is not None else branch[0]
                return done
        result = self._walk(chain, depth)
        self.resolved[chain] = result
        return result

    def _walk(self, chain: str | None, depth: int) -> _Resolved:
        if not chain or self._service_of(chain) is None:
            return _Resolved(NO_REAL_SERVERS, None, (f"chain {chain!r} is not one of kube-proxy's",))
        if chain not in self.chain_names:
            return _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} is missing",))
        if depth > MAX_CHAIN_DEPTH:
            return _Resolved(NO_REAL_SERVERS, None, (f"chain {chain} nests deeper than kube-proxy's",))
        rules = self.by_chain.get(chain, ())
        handles = tuple(r.handle for r in rules)
        leaf = self.old_leaves.get(chain)
        if leaf is not None and leaf[0] == handles:
            # Same rules, same anonymous sets (they live and die with their rule):
            # nothing to fetch again, and no need to keep the sets' elements.
            self.cache.leaves[chain] = leaf
            return leaf[1]
        followed: list[str | None] = []
        endpoints: set[tuple[str, int]] = set()
        problems: list[str] = []
        affinity = None

        def follow(target: str | None) -> None:
            nonlocal affinity
            followed.append(target)
            sub = self._resolve(target, depth + 1)
            endpoints.update(sub.real_servers)
            problems.extend(sub.problems)
            if sub.affinity_timeout is not None:
                affinity = sub.affinity_timeout

        for rule in rules:
            if rule.unknown:
                problems.extend(f"chain {chain}: {u}" for u in rule.unknown)
            for set_name in (*rule.lookups, *rule.updates):
                if set_name.startswith("affinity-"):
                    info: SetInfo | None = self.sets.get(set_name)
                    if info is None:
                        problems.append(f"affinity set {set_name} is missing")
                    elif info.timeout_ms is not None:
                        affinity = info.timeout_ms // 1000
            if rule.dnat is not None:
                endpoints.update(self._dnat_targets(rule, problems))
            if rule.vmap is not None:
                for element in self.source.anonymous(rule, rule.vmap):
                    if isinstance(element.data, Verdict) and element.data.code in (NFT_GOTO, NFT_JUMP):
                        follow(element.data.chain)
                    else:
                        problems.append(f"chain {chain}: a verdict map element that is not a goto")
            verdict = rule.verdict
            if verdict is None or rule.conditional:
                continue  # short-circuits and affinity gotos lead to chains read on their own
            if verdict.code == NFT_GOTO:
                follow(verdict.chain)
                break
            if verdict.code == NF_DROP or rule.rejects:
                break
        result = _Resolved(RealServers(sorted(endpoints)), affinity, tuple(problems))
        if not followed and affinity is None and not problems:
            self.cache.leaves[chain] = (handles, result)
            self.source.release(rules)
        elif not problems:
            self.cache.branches[chain] = (result, tuple(followed))
        return result

    def _dnat_targets(self, rule: Rule, problems: list) -> list[tuple[str, int]]:
        kind = rule.dnat[0]
        a = self.addr_len
        if kind == "value":
            _, addr, port = rule.dnat
            if not isinstance(addr, bytes) or len(addr) != a or not isinstance(port, bytes) or len(port) != 2:
                problems.append(f"chain {rule.chain}: a dnat this reader cannot decode")
                return []
            return [(self._address(addr), self._port(port))]
        out = []
        for element in self.source.anonymous(rule, rule.dnat[1]):
            data = element.data
            if not isinstance(data, bytes) or len(data) != a + 4:
                problems.append(f"chain {rule.chain}: a dnat map element this reader cannot decode")
                continue
            out.append((self._address(data), self._port(data[a:a + 2])))
        return out
