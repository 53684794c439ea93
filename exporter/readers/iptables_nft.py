"""kube-proxy's iptables rules as iptables-nft keeps them (nf_tables tables ``ip nat``,
``ip filter``, ``ip6 nat``, ``ip6 filter``), read over netlink chain by chain as the
resolver walks them.

Why not `iptables-nft-save`: it is a child on the scrape path, the field notes saw it
take tens of seconds at 10,000 Services with older iptables (1.8.9 here: 1.3 s, with the
same 61,000 per-chain dumps as this module; one whole-table dump costs the kernel a
walk from the table's first rule for each message it fills: 4-5 s), and it reads every
rule again on every change. A read serves ``NftChains`` mappings whose ``chains[name]`` dumps that one
chain and decodes its rules then (``iptables_netlink.decode_rule``): a caller that walks
chains one by one never holds a table's rules (174,000 at 10,000 Services x 5), and
what it keeps of them (the resolution) is not allocated among hundreds of thousands of
freed rules.

What it keeps between reads, per table: each chain's number of rules (the sizes the
``iptables`` collector serves), the newest chain handle, and a digest of the rules of
each chain that is not one Service's own (KUBE-SERVICES, KUBE-NODEPORTS, the filter's
reject chains, the built-in chains: a few dozen), without their counters.

Change: nf_tables' change feed (``nftables_monitor.NftMonitor``, subscribed before
the first read) names every chain a committed transaction touched. A re-read drains
it, checks the kernel's generation is the last transaction's, and counts the touched
chains again (a top-level chain's digest from the feed's own rule messages when they
show it flushed and written again whole, else from a dump of it): a touched chain
whose digest did not move (kube-proxy's partial sync flushes every top-level chain
and writes it again, nearly always the same) is not changed. The mappings then say
which chains changed since the last read (``changed``), so the resolver walks again
only those and what reads them. Anything the feed cannot say (an overflow, a table
created or deleted, a chain renamed: every jump to it changes with no rule event)
is a full read, where ``changed`` is None: resolve everything.

A chain asked for later than its read (the resolver walks after ``read()``) is
dumped then: ``verify()`` (one generation check) says whether the kernel is still
at the generation the read was of, and the caller reads again when it is not; the
feed then names what moved.

The generation alone is not a fence: the kernel numbers a commit first, then makes its
objects live and announces them, the NEWGEN message last (a partial sync at 10,000
Services announces 24,000 messages). A read that asks for the generation in between
lists the chains from before the commit under the commit's number, and dumps chains
from after it: a Service's chain jumped to endpoint chains its list lacked, and the
next reads, finding the same generation, kept saying them missing (bench soak). So a
read is the kernel's only once the feed has nothing it did not take: a whole read waits
for the announcement of the generation before it lists the chains (``FEED_WAIT_SECONDS``;
not on its first read, when a commit that ended before the feed subscribed is never
announced) and lists again when that generation is announced only after the listing
began; ``verify()`` and ``settled()`` drain the feed, a transaction announced later is
the next read's to apply, and one announcing a generation the read already had makes
the next read whole (the listing overlapped its commit: the feed cannot name what a
listing skipped); a re-read whose generation the feed has not announced yet waits for
it rather than reading whole.

The socket lives in the network namespace of the thread that opened it (the first
read's), and every later dump goes through it, whichever thread asks: tests read a
namespace of their own from a thread that joined it.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import sys
import time
from collections.abc import Mapping

from exporter.readers.ipset import _nla
from exporter.readers.iptables_netlink import decode_rule
from exporter.readers.iptables_rules import IptablesRule, IptablesRuleset
from exporter.readers.nftables_monitor import DEFAULT_RECEIVE_BUFFER, FEED_WAIT_SECONDS, FeedError, NftMonitor, newer
from exporter.readers.nftables_netlink import (_BE64, _NLA, NFPROTO_IPV4, NFPROTO_IPV6, NFTA_LIST_ELEM,
                                               NFTA_RULE_HANDLE, NFTA_RULE_POSITION, NftDumpTorn, NftNetlink,
                                               NftReadError, torn)

__all__ = ["IptablesNftSource", "NftChains", "NftReadError", "TABLES", "FAMILIES"]

TABLES = ("nat", "filter")
# iptables-nft creates a built-in chain with its first rule, iptables-save prints them all:
# an absent one is an empty chain, not a missing one.
BUILTIN_CHAINS = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"), "filter": ("INPUT", "FORWARD", "OUTPUT")}
FAMILIES = ((4, NFPROTO_IPV4), (6, NFPROTO_IPV6))
SERVICES_CHAIN = "KUBE-SERVICES"

NFT_MSG_GETCHAIN, NFT_MSG_GETRULE = 4, 7
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME = 1, 2, 3
NLM_F_DUMP = 0x300
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
# One Service's chains: a change to one is that Service's change, never told apart by a digest.
SERVICE_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
UNCOUNTED = -1  # a chain's count before its first dump
GENERATION_TRIES = 3
_FAMILY_OF = {nfproto: family for family, nfproto in FAMILIES}
_NFPROTO_OF = {family: nfproto for family, nfproto in FAMILIES}
# A counter expression's name attribute: its values differ from one dump to the next.
_COUNTER_NAME = _NLA.pack(12, 1) + b"counter\0"


class _Table:
    """What the source keeps of one table between reads: per chain its number of rules (a
    small int, shared by the interpreter: nothing per chain but the dict entry), the
    top-level chains' digests, and the newest chain handle met (the kernel numbers a
    table's objects in one increasing sequence: a chain announced with an older handle
    under a new name is one renamed)."""

    __slots__ = ("chains", "digests", "newest", "totals")

    def __init__(self) -> None:
        self.chains: dict[str, int] = {}  # chain -> its rules (UNCOUNTED before its first dump)
        self.digests: dict[str, bytes] = {}  # chain -> digest of its rules (not a Service's own chains)
        self.newest = 0
        # Of the chains counted: chains, rules, KUBE- chains, KUBE-SVC-/SVL- chains, KUBE-SEP- chains.
        self.totals = [0, 0, 0, 0, 0]

    def count(self, chain: str) -> int:
        """The chain's number of rules; -1 when not counted yet, KeyError when not there."""
        return self.chains[chain]

    def set_count(self, chain: str, count: int) -> None:
        old = self.chains.get(chain)
        if old is not None and old != UNCOUNTED:
            self._total(chain, old, -1)
        self.chains[chain] = count
        self._total(chain, count, 1)

    def drop(self, chain: str) -> None:
        old = self.chains.pop(chain, None)
        self.digests.pop(chain, None)
        if old is not None and old != UNCOUNTED:
            self._total(chain, old, -1)

    def _total(self, chain: str, rules: int, sign: int) -> None:
        totals = self.totals
        totals[0] += sign
        totals[1] += sign * rules
        if chain.startswith("KUBE-"):
            totals[2] += sign
            if chain.startswith(("KUBE-SVC-", "KUBE-SVL-")):
                totals[3] += sign
            elif chain.startswith("KUBE-SEP-"):
                totals[4] += sign


class NftChains(Mapping):
    """One table's chains as of one read; ``chains[name]`` dumps and decodes that chain.

    ``changed``: the chains whose rules changed since the source's read ``since``
    (deleted and new ones included), or None when unknown (a first or full read);
    ``read_id``: this read's number, which the next read's ``since`` names."""

    __slots__ = ("_source", "_family", "_table", "_state", "changed", "since", "read_id")

    def __init__(self, source: "IptablesNftSource", family: int, table: str, state: _Table,
                 changed: set[str] | None, since: int, read_id: int) -> None:
        self._source, self._family, self._table, self._state = source, family, table, state
        self.changed, self.since, self.read_id = changed, since, read_id

    def __getitem__(self, name: str) -> tuple[IptablesRule, ...]:
        if name not in self._state.chains:
            raise KeyError(name)
        return self._source._chain(self._family, self._table, name)

    def __contains__(self, name: object) -> bool:
        return name in self._state.chains

    def __iter__(self):
        return iter(self._state.chains)

    def __len__(self) -> int:
        return len(self._state.chains)

    def lengths(self):
        """(chain, number of rules) of every chain, nothing decoded (a chain never dumped
        yet is dumped to count it: after a resolver's walk, the few it did not reach)."""
        self._count_all()
        return self._state.chains.items()

    def counts(self) -> list[int]:
        """chains, rules, KUBE- chains, KUBE-SVC-/SVL- chains, KUBE-SEP- chains of the table."""
        self._count_all()
        return list(self._state.totals)

    def _count_all(self) -> None:
        state = self._state
        uncounted = {name for name, value in state.chains.items() if value == UNCOUNTED}
        if uncounted:
            self._source._recount((self._family, self._table), uncounted)


class _Resync(Exception):
    pass


class IptablesNftSource:
    """The iptables-nft backend's rules of this network namespace, decoded when asked for.

    ``read()`` gives one ``IptablesRuleset`` per family whose tables are ``NftChains``;
    ``verify()`` after using them says whether they are still the kernel's.
    ``decoded`` counts the rules decoded since the last read began; ``dumped`` the
    chains dumped."""

    def __init__(self, timeout: float = 5.0, feed: bool = True,
                 feed_buffer: int = DEFAULT_RECEIVE_BUFFER) -> None:
        self.timeout = timeout
        self.use_feed, self.feed_buffer = feed, feed_buffer
        self._nl: NftNetlink | None = None  # in the namespace of the first read's thread
        self._feed: NftMonitor | None = None
        self._tables: dict[tuple[int, str], _Table] = {}
        self._last: list[IptablesRuleset] | None = None
        self._resync: str | None = "no read yet"
        self._pending: list = []  # feed transactions past the last full read's generation
        # (family, table, chain) of the top-level chains the walk of a read dumped before it was
        # verified, and the read verified last (its ``_read_id``)
        self._walked_digested: set = set()
        self._verified_id = -1
        # (family, table, chain) of the chains whose dump a transaction tore during the walk
        # (``NftDumpTorn``): the read is not verified, and the next one dumps them again.
        self._torn: set = set()
        self.torn_dumps = 0  # dumps a transaction tore, since the source began
        self._read_id = 0  # reads served: the resolver keeps incremental state only across consecutive ones
        self._memo: dict = {}  # decode_rule's per-read memo
        self.last_generation: int | None = None
        self.decoded = self.dumped = 0
        self.from_feed = 0  # top-level chains digested from the feed's messages, not dumped again
        self.full_reads = 0
        self.last_resync: str | None = None

    def close(self) -> None:
        for sock in (self._feed, self._nl):
            if sock is not None:
                sock.close()
        self._feed = self._nl = None

    def _requests(self) -> NftNetlink:
        if self._nl is None:
            self._nl = NftNetlink(self.timeout)
        return self._nl

    def generation(self) -> int:
        return self._requests().generation()

    def present(self) -> bool:
        """A `nat` table with a KUBE-SERVICES chain exists in nf_tables (either family)."""
        nl = self._requests()
        return any(nl.chain_exists(nfproto, "nat", SERVICES_CHAIN) for _, nfproto in FAMILIES)

    def verify(self) -> bool:
        """The kernel is still at the generation of the last read, and the feed announced
        nothing since the read took it (chains dumped since are that read's)."""
        whole = (self.last_generation is not None and not self._torn
                 and self.generation() == self.last_generation and self.settled())
        if whole:
            # No commit began during the walk (it would have moved the generation): what it
            # dumped is this generation's, whole. After a walk that was not, the next read
            # does not trust those top-level dumps to a digest (``_read_feed``).
            self._walked_digested = set()
            self._verified_id = self._read_id
        return whole

    def settled(self) -> bool:
        """The feed announced no transaction since the last read took it (the next read
        applies one). Without a feed, only the generation says. A non-blocking drain:
        microseconds when nothing came."""
        if self._torn:
            return False  # the next read dumps them again
        if self._feed is None:
            return True
        if self._resync is not None:
            return False  # the next read is a whole one
        drained = self._drain()
        if drained.resync:
            self._resync = drained.resync
            return False
        self._pending += drained.batches
        self._resync = self._late(self._pending)
        return not self._pending

    def _late(self, batches: list) -> str | None:
        """Why the last read cannot stand, if ``batches`` announce a generation it already
        had: its chains were listed while that commit was still being applied, and a listing
        that overlaps a commit can lack chains the feed will never name (a dump resumed by
        position skips one when a chain before it is unlinked)."""
        last = self.last_generation
        if last is not None and any(not newer(b.generation, last) for b in batches):
            return f"generation {last} was announced after its chains were listed"
        return None

    def _drain(self):
        return self._feed.drain(_digested)

    # -- reads ---------------------------------------------------------------------------

    def read(self, known: int | None = None) -> list[IptablesRuleset]:
        """Both families' rulesets at one generation (``last_generation``): from the feed's
        changes when it has them, else a full read (``known``: the caller's last
        generation; unchanged, the last rulesets come back)."""
        self.decoded = self.dumped = self.from_feed = 0
        self._memo = {}
        gc_was_enabled = gc.isenabled()
        gc.disable()  # thousands of small objects, no cycles
        try:
            if self._feed is not None and self._last is not None and self._resync is None:
                try:
                    return self._read_feed()
                except _Resync as why:
                    # Until a full read succeeds: the transactions drained for this read are
                    # gone, and the feed's next ones over the kept tables would miss them.
                    self.last_resync = self._resync = str(why)
                except BaseException:
                    # What it drained is gone with it (and the counts may be half updated):
                    # only a full read says the kernel's rules again.
                    self._resync = "a re-read failed after draining the change feed"
                    raise
            elif self._resync is not None and self._last is not None:
                self.last_resync = self._resync
            return self._full_read(known)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _full_read(self, known: int | None) -> list[IptablesRuleset]:
        if self.use_feed and self._feed is None:
            try:
                # Before the dumps: nothing lost between.
                self._feed = NftMonitor(self.feed_buffer, rule_body=_rule_piece)
            except FeedError:
                self.use_feed = False  # the dumps still work; read whole on every change
        nl = self._requests()
        generation = nl.generation()
        if (known is not None and known == generation == self.last_generation and self._last is not None
                and not self._torn):
            return self._last
        for _ in range(GENERATION_TRIES):
            if self._feed is not None:
                # What was announced before the chains are listed is in the listing (an
                # overflow lost only such messages); only what comes after is the next read's.
                self._drain()
                # What it announces meanwhile is in the listing, as any it lost.
                self._feed.until_announced(generation, time.monotonic() + FEED_WAIT_SECONDS, _digested)
            tables: dict[tuple[int, str], _Table] = {}
            for family, nfproto in FAMILIES:
                for table in TABLES:
                    if nl.table(nfproto, table) is not None:
                        tables[(family, table)] = _Table()
                _chains_into(nl, nfproto, {table: tables[(family, table)] for table in TABLES
                                           if (family, table) in tables})
                for table in TABLES:
                    state = tables.get((family, table))
                    if state is None:
                        continue
                    for chain in BUILTIN_CHAINS[table]:
                        if chain not in state.chains:
                            state.set_count(chain, 0)  # iptables-nft makes one with its first rule
            after = nl.generation()
            resync, pending, overlapped = "no change feed", [], False
            if self._feed is not None:
                drained = self._drain()
                resync, pending = drained.resync, [b for b in drained.batches if newer(b.generation, generation)]
                # This generation (or an older one) announced only now: its commit was still
                # making chains live, or unlinking them, while they were listed (a dump resumed
                # by position then skips one): list again.
                overlapped = len(pending) != len(drained.batches)
            if after == generation and not overlapped:
                break
            generation = after
        else:
            raise NftReadError(f"the ruleset changed during each of {GENERATION_TRIES} reads in a row")
        # Kept only now: a read that failed above leaves the last good one's generation, so
        # a caller who knows this generation is never served the rulesets from before it.
        self._tables, self.last_generation = tables, generation
        self._resync, self._pending = resync, pending
        self._walked_digested = set()  # the next walk resolves every chain anyway
        self._torn = set()
        self.full_reads += 1
        self._last = self._rulesets(None)
        return self._last

    def _rulesets(self, changed: dict[tuple[int, str], set[str]] | None) -> list[IptablesRuleset]:
        since, self._read_id = self._read_id, self._read_id + 1
        out = []
        for family, _ in FAMILIES:
            tables = {table: NftChains(self, family, table, self._tables[(family, table)],
                                       None if changed is None else changed.get((family, table), set()),
                                       since, self._read_id)
                      for table in TABLES if (family, table) in self._tables}
            out.append(IptablesRuleset(family, tables))
        return out

    def _read_feed(self) -> list[IptablesRuleset]:
        batches = self._pending
        self._pending = []
        walked_digested, self._walked_digested = self._walked_digested, set()
        nl = self._requests()
        deadline = time.monotonic() + FEED_WAIT_SECONDS
        while True:
            drained = self._drain()
            if drained.resync:
                raise _Resync(drained.resync)
            batches += drained.batches
            # Numbered, still being applied: wait for its announcement.
            awaited = self._feed.until_announced(nl.generation(), deadline, _digested)
            if awaited.resync:
                raise _Resync(awaited.resync)
            batches += awaited.batches
            late = self._late(batches)
            if late:
                raise _Resync(late)
            if nl.generation() == (batches[-1].generation if batches else self.last_generation):
                break
            if time.monotonic() >= deadline:
                raise _Resync(f"the change feed did not announce the kernel's generation within {FEED_WAIT_SECONDS:g} s")
        torn, self._torn = self._torn, set()
        if not batches and not torn:
            return self._last
        touched: dict[tuple[int, str], set[str]] = {}
        deleted: dict[tuple[int, str], set[str]] = {}  # chains whose last event deleted them
        for family, table, chain in torn:
            touched.setdefault((family, table), set()).add(chain)
            deleted.setdefault((family, table), set())
        rule_events: dict[tuple[int, str, str], list] = {}  # the top-level chains' rule events, in order
        for batch in batches:
            for (nfproto, table), events in batch.tables.items():
                family = _FAMILY_OF.get(nfproto)
                if family is None or table not in TABLES:
                    continue
                key = (family, table)
                state = self._tables.get(key)
                chains = touched.setdefault(key, set())
                gone = deleted.setdefault(key, set())
                if state is None:
                    raise _Resync(f"table {table} of IPv{family} appeared")
                for event in events:
                    kind = event.kind
                    if kind == "rules":
                        chains.add(event.chain)
                    elif kind == "newrule" or kind == "delrule" or kind == "unkept":
                        rule_events.setdefault((family, table, event.chain), []).append(event)
                    elif kind == "newchain":
                        chain = event.chain
                        if chain not in state.chains:
                            if event.handle <= state.newest:
                                # An older chain under a new name (iptables -E): every jump to it
                                # names it anew, and no rule event says so.
                                raise _Resync(f"{table}: chain handle {event.handle} renamed to {chain}")
                            state.newest = event.handle
                            state.chains[chain] = UNCOUNTED  # counted below
                        chains.add(chain)
                        gone.discard(chain)
                    elif kind == "delchain":
                        # A dump of a chain that is gone is empty, not an error: forget it here.
                        chains.add(event.chain)
                        gone.add(event.chain)
                    else:  # a table created or deleted
                        raise _Resync(f"table {table} of IPv{family} created or deleted")
        if batches:
            self.last_generation = batches[-1].generation
        changed: dict[tuple[int, str], set[str]] = {}
        for key, chains in touched.items():
            state = self._tables[key]
            for chain in deleted[key]:
                state.drop(chain)
                if chain in BUILTIN_CHAINS[key[1]]:
                    state.set_count(chain, 0)  # as a full read has it: iptables-save prints it, empty
            # A top-level chain the last walk dumped and a transaction since touched: its dump
            # may have met that commit half applied (a chain's dump is cut short then), so
            # its digest saying "written again the same" does not clear what was made of it.
            walked = {chain for chain in chains
                      if (key[0], key[1], chain) in walked_digested or (key[0], key[1], chain) in torn}
            changed[key] = self._recount(key, chains - deleted[key], rule_events) | deleted[key] | walked
        self._last = self._rulesets(changed)
        return self._last

    def _recount(self, key: tuple[int, str], chains: set[str], rule_events: dict | None = None) -> set[str]:
        """The touched chains' rule counts (and digests) again; which ones changed."""
        family, table = key
        state = self._tables[key]
        changed = set()
        for chain in chains:
            rewritten = _rewritten(state, chain, rule_events.get((family, table, chain))) if rule_events else None
            if rewritten is not None:
                count, digest = rewritten
                self.from_feed += 1
            else:
                try:
                    count, digest = self._dump(family, table, chain, None)
                except NftDumpTorn:
                    # A transaction under the dump: as a walk's torn chain, nothing of it is
                    # kept, ``verify()`` fails this read (the dataplane reads again, and says
                    # "changed during each of" when every try meets one) and the next read
                    # dumps it again. Before, a second tear here failed the read at once with
                    # the tear's own words, unlike every other read that met a transaction.
                    self._torn_now(family, table, chain)
                    changed.add(chain)
                    continue
                except NftReadError as err:
                    if err.errno != errno.ENOENT:
                        raise
                    if chain in BUILTIN_CHAINS[table]:
                        count, digest = 0, None
                    else:
                        if chain in state.chains:
                            changed.add(chain)
                        state.drop(chain)
                        continue
            old = state.digests.get(chain)
            if digest is None or old is None or digest != old or state.count(chain) != count:
                changed.add(chain)
            state.set_count(chain, count)
            if digest is not None:
                state.digests[chain] = digest
        return changed

    # -- one chain -----------------------------------------------------------------------

    def _chain(self, family: int, table: str, chain: str) -> tuple[IptablesRule, ...]:
        state = self._tables[(family, table)]
        if not _digested(chain):
            # One Service's chain (61,000 of the 61,000 at 10,000 Services but a few dozen):
            # the dumps' flat loop, no digest.
            memo = self._memo
            try:
                [(_, rules, decoded)] = self._requests().each_chain_rules(
                    _NFPROTO_OF[family], table, (chain,),
                    lambda buf, _chain, _handle, exprs, udata: decode_rule(buf, exprs, udata, family, memo))
            except NftDumpTorn:
                return self._torn_now(family, table, chain)
            self.dumped += 1
            if rules is None:
                return ()  # gone since the read: verify() says the generation moved
            self.decoded += decoded
            if state.chains.get(chain) == UNCOUNTED:  # counted on its first dump
                state.set_count(chain, len(rules))
            return tuple(rules)
        if self._verified_id != self._read_id:  # the walk of a read not verified yet
            self._walked_digested.add((family, table, chain))
        rules = []
        try:
            count, digest = self._dump(family, table, chain, rules)
        except NftDumpTorn:
            return self._torn_now(family, table, chain)
        except NftReadError as err:
            if err.errno != errno.ENOENT:
                raise
            return ()  # gone since the read: verify() says the generation moved
        if chain in state.chains and state.count(chain) < 0:  # counted on its first dump
            state.set_count(chain, count)
            if digest is not None:
                state.digests[chain] = digest
        return tuple(rules)

    def _torn_now(self, family: int, table: str, chain: str) -> tuple[IptablesRule, ...]:
        """A chain whose dump a transaction tore (an aborted one moves no generation and
        announces nothing): nothing of it is kept, ``verify()`` fails the walk, and the
        next read dumps it again as changed."""
        self._torn.add((family, table, chain))
        self.torn_dumps += 1
        return ()

    def _dump(self, family: int, table: str, chain: str, rules: list | None) -> tuple[int, bytes | None]:
        """One chain's rules from the kernel: how many, and their digest unless it is one
        Service's own chain; decoded into ``rules`` when it is a list."""
        nl = self._requests()
        nfproto = _NFPROTO_OF[family]
        attrs = _nla(NFTA_RULE_TABLE, table.encode() + b"\0") + _nla(NFTA_RULE_CHAIN, chain.encode() + b"\0")
        unpack = _NLA.unpack_from
        memo = self._memo
        pieces: list[bytes] | None = [] if _digested(chain) else None
        count = 0
        replies = nl._replies(NFT_MSG_GETRULE, nfproto, NLM_F_DUMP, attrs, f"the rules of chain {chain}")
        previous, tear = 0, None  # the handle of the rule before the next; the dump torn (read to its end)
        handles = []
        for buf, start, end in replies:
            count += 1
            handle = position = 0
            exprs = udata = None
            offset = start
            while offset + 4 <= end:
                alen, t = unpack(buf, offset)
                if alen < 4 or offset + alen > end:
                    raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
                t &= 0x3FFF
                if t == NFTA_RULE_HANDLE:
                    handle = _BE64.unpack_from(buf, offset + 4)[0]
                elif t == NFTA_RULE_POSITION:
                    position = _BE64.unpack_from(buf, offset + 4)[0]
                elif t == NFTA_RULE_EXPRESSIONS:
                    exprs = (offset + 4, offset + alen)
                    if rules is None:
                        # A digest takes the expressions attribute and everything after it
                        # (the user data), framed by their own lengths; not the handle before.
                        if pieces is not None:
                            pieces.append(_rule_piece(bytes(buf[offset:end])))
                        break
                elif t == NFTA_RULE_USERDATA:
                    udata = (offset + 4, offset + alen)
                offset += (alen + 3) & ~3
            else:
                if rules is None and pieces is not None:
                    pieces.append(_rule_piece(b""))  # a rule without expressions
            if position != previous and tear is None:
                tear = torn(chain, handle, position, previous)
            previous = handle
            handles.append(handle)
            if rules is not None:
                rules.append(decode_rule(buf, exprs, udata, family, memo))
                self.decoded += 1
                if pieces is not None:
                    at = exprs[0] - 4 if exprs else end
                    pieces.append(_rule_piece(bytes(buf[at:end])))
        if tear is not None:
            raise tear
        if nl.ended_apart:  # a large chain (KUBE-SERVICES): was a rule after its last skipped?
            nl.vouch(nfproto, table, [(chain, handles, None)], [chain])
        self.dumped += 1
        if pieces is None:
            return count, None
        return count, _digest(pieces)


def _chains_into(nl: NftNetlink, nfproto: int, states: dict[str, _Table]) -> None:
    """Every chain of the family's ``states`` tables into them, uncounted (its first dump
    counts it), straight from the chain dump: no object per chain but its name (interned:
    every jump to it shares it)."""
    wanted = {name.encode() + b"\0": state for name, state in states.items()}
    unpack = _NLA.unpack_from
    for buf, start, end in nl._replies(NFT_MSG_GETCHAIN, nfproto, NLM_F_DUMP, b"", "the chains"):
        state = name = handle = None
        at = start
        while at + 4 <= end:
            alen, t = unpack(buf, at)
            if alen < 4 or at + alen > end:
                raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
            t &= 0x3FFF
            if t == NFTA_CHAIN_TABLE:
                state = wanted.get(bytes(buf[at + 4:at + alen]))
                if state is None:
                    break  # another table's chain
            elif t == NFTA_CHAIN_NAME:
                name = sys.intern(bytes(buf[at + 4:at + alen]).split(b"\0", 1)[0].decode("utf-8", "replace"))
            elif t == NFTA_CHAIN_HANDLE:
                handle = _BE64.unpack_from(buf, at + 4)[0]
            at += (alen + 3) & ~3
        if state is not None and name is not None and handle is not None:
            state.chains[name] = UNCOUNTED
            if handle > state.newest:
                state.newest = handle


def _digested(chain: str) -> bool:
    """Whether the source keeps a digest of the chain: every chain but one Service's own."""
    return not chain.startswith(SERVICE_PREFIXES)


def _digest(pieces) -> bytes:
    """Of rules' bytes in order (an iterable), each framed by its length. Hashed as they
    come: KUBE-SERVICES at 10,000 Services is 10,000 rules, and framed copies joined
    first were ~20 MB at the peak of each read after a change (tracemalloc)."""
    digest = hashlib.blake2b(digest_size=16)
    update = digest.update
    for piece in pieces:
        update(len(piece).to_bytes(4, "little"))
        update(piece)
    return digest.digest()


def _rewritten(state: _Table, chain: str, events: list | None) -> tuple[int, bytes] | None:
    """(rules, digest) of a top-level chain that the feed's events flushed whole and wrote
    again (kube-proxy's partial sync does so to every top-level chain), from the events'
    own bytes; None when they do not show that (then the chain is dumped again).

    Whole: a rule deleted that no event created existed at the last read, and as many
    of those went as the chain had. In order: the kernel announces a new rule with the
    rule before it (its position) unless it was then the chain's first or last; so the
    rules left must each name the one left before it, but the first (none) and the
    last (none, or the one before it)."""
    if not events or chain not in state.digests or state.count(chain) < 0:
        return None
    if any(event.kind == "unkept" for event in events):
        return None  # a rule message whose bytes the feed did not keep
    created = {event.handle for event in events if event.kind == "newrule"}
    gone = {event.handle for event in events if event.kind == "delrule"}
    if len(gone - created) != state.count(chain):
        return None
    left = [event for event in events if event.kind == "newrule" and event.handle not in gone]
    previous = None
    for index, event in enumerate(left):
        if event.position != previous and not (event.position is None and index == len(left) - 1):
            return None
        previous = event.handle
    return len(left), _digest(event.body for event in left)  # the feed's bodies are _rule_piece's


def _rule_piece(raw: bytes) -> bytes:
    """What a chain's digest takes of one rule (its bytes from the expressions on): a
    digest of them without the counter, 16 bytes. The change feed keeps this of each
    rule it announces (``NftMonitor(rule_body=...)``), not the ~350 bytes."""
    return hashlib.blake2b(_without_counters(raw), digest_size=16).digest()


def _without_counters(raw: bytes) -> bytes:
    """A rule's expressions (and what follows them) minus its counter, whose values move
    with traffic: iptables-nft gives each rule one."""
    at = raw.find(_COUNTER_NAME)
    if at < 8:
        return raw
    elem = at - 4  # the counter's NFTA_LIST_ELEM header
    length, kind = _NLA.unpack_from(raw, elem)
    if kind & 0x3FFF != NFTA_LIST_ELEM:
        return raw
    return raw[:elem] + raw[elem + ((length + 3) & ~3):]
