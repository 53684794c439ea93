"""One ``DataplaneReader`` per proxy mode: the live table in the shapes of ``exporter.dataplane``.

- IPVS: the ``IPVSReader`` the ``ipvs`` collector owns and shares (it is a
  ``DataplaneReader`` itself).
- nftables: ``NftablesReader``, owned here and shared by the drift and the
  ``nftables`` collectors, so one scrape reads the rules once. No kube-proxy
  table at all is an empty table (every desired frontend missing: the nat
  table flushed or deleted behind the proxy's back), not an error.
- iptables: ``IptablesDataplane``, owned here and shared by the drift and the
  ``iptables`` collectors: kube-proxy's rules from the iptables-nft backend
  (``exporter.readers.iptables_nft``) or the iptables-legacy one
  (``exporter.readers.iptables_legacy``: the kernel's x_tables blob, decoded in
  this process), resolved by ``exporter.readers.iptables``.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from exporter import allocator
from exporter.dataplane import SCRAPE_WINDOW, DataplaneReader, LiveRead

NFTABLES_SERVICE = "nftables-dataplane"
IPTABLES_SERVICE = "iptables-dataplane"


class ReadFailed(Exception):
    """The dataplane is there but this read failed; the message is one line."""


class NftablesDataplane(DataplaneReader):
    """kube-proxy's nftables tables of this network namespace; ``read_rules`` keeps the
    whole ``NftablesRead`` (sizes, generation) for the ``nftables`` collector."""

    mode = "nftables"

    def __init__(self, reader=None, clock=time.monotonic) -> None:
        from exporter.readers.nftables import NftablesReader

        self.reader = reader or NftablesReader()
        self.clock = clock
        self._lock = threading.Lock()  # one read at a time; a second caller reuses it
        self._last = None
        self._at = float("-inf")

    def read_rules(self, max_age: float = SCRAPE_WINDOW):
        """The last ``NftablesRead`` if not older than ``max_age`` seconds, else a new one."""
        from exporter.readers.nftables import NftablesRead, NoKubeProxyTable
        from exporter.readers.nftables_netlink import NftReadError

        with self._lock:
            if self._last is not None and self.clock() - self._at <= max_age:
                return self._last
            start = time.perf_counter()
            try:
                read = self.reader.read()
            except NoKubeProxyTable:
                read = NftablesRead({}, {}, frozenset(), (), {}, None, time.perf_counter() - start, True)
            except NftReadError as err:
                raise ReadFailed(f"kube-proxy's nftables rules not read: {err}") from None
            except OSError as err:
                raise ReadFailed(f"nf_tables netlink: {err.strerror or err}") from None
            self._last, self._at = read, self.clock()
            return read

    def read(self, max_age: float = SCRAPE_WINDOW) -> LiveRead:
        rules = self.read_rules(max_age)
        return LiveRead(rules.table, rules.rejected, rules.unread, rules.read_seconds)

    def close(self) -> None:
        with self._lock:
            self.reader.close()


class IptablesTableSize(NamedTuple):
    """One family's table as read, for `kubenode_iptables_*`."""

    family: int  # 4 or 6
    table: str  # "nat", "filter"
    chains: int
    rules: int
    kube_chains: int  # chains named KUBE-*


def ruleset_sizes(rulesets) -> tuple[IptablesTableSize, ...]:
    """Counts of every table of ``rulesets`` (``IptablesRuleset``s), sorted (pure)."""
    from exporter.readers.iptables_rules import chain_lengths

    out = []
    for ruleset in rulesets:
        for table, chains in ruleset.tables.items():
            counts = getattr(chains, "counts", None)  # kept by the source (iptables_nft)
            if counts is not None:
                chain_count, rules, kube = counts()[:3]
                out.append(IptablesTableSize(ruleset.family, table, chain_count, rules, kube))
                continue
            out.append(IptablesTableSize(ruleset.family, table, len(chains),
                                         sum(length for _, length in chain_lengths(chains)),
                                         sum(1 for name in chains if name.startswith("KUBE-"))))
    return tuple(sorted(out))


class IptablesLive(NamedTuple):
    """One read of kube-proxy's iptables rules, whole: what the drift and the ``iptables``
    collectors share."""

    read: object  # the resolver's IptablesRead (table, rejected, firewalled, unread, sizes)
    backend: str  # "nft" or "legacy": the backend read (the one holding KUBE-SERVICES, if any does)
    tables: tuple[IptablesTableSize, ...]
    read_seconds: float  # this call's own work (a change check only, when nothing moved)
    reread: bool  # this call read the rules again


NFT, LEGACY = "nft", "legacy"
NFT_VERIFY_TRIES = 3  # reads in a row when nf_tables moved during each one's resolve
# While the latency follower waits for a change to be programmed, the legacy tables are
# fetched more often than the re-read clock's 30 s (a swapped endpoint moves neither their
# entry count nor their size, so only a fetch sees it): every FOLLOW_LEGACY_SECONDS at the
# least, and no more often than FOLLOW_LEGACY_COST times what the last legacy read cost
# (at most 1/FOLLOW_LEGACY_COST of a core: 0.26 s at 10,000 Services, every 5 s).
FOLLOW_LEGACY_SECONDS = 1.0
FOLLOW_LEGACY_COST = 20
BACKEND_NAMES = {NFT: "iptables-nft", LEGACY: "iptables-legacy"}


def _nft_source():
    from exporter.readers.iptables_nft import IptablesNftSource

    return IptablesNftSource()


class IptablesDataplane(DataplaneReader):
    """kube-proxy's iptables rules of this network namespace, from whichever backend holds
    them: iptables-nft (nf_tables, read over netlink) or iptables-legacy (x_tables, the
    kernel's table blobs fetched by getsockopt and decoded in this process). Owned once per exporter (``shared_iptables``) and
    shared by the drift and ``iptables`` collectors, so one scrape reads the rules once.

    The backend is the one whose nat table has KUBE-SERVICES. Both holding it is kube-proxy
    run with one backend and something (an old kube-proxy, an iptables wrapper) with the
    other: traffic meets both sets of rules, so no drift figure can be honest, and the
    read fails naming both. Neither: the backend read last (else iptables-nft, else
    legacy) is read and resolved as it is: kube-proxy's filter chains without its nat
    rules (firewalld flushed the nat table) is every frontend missing; no trace at all is
    an empty table, as the nftables reader reports a deleted table.

    Nothing changed (the nf_tables generation, the legacy table info) means the last
    resolution is reused: a scrape then costs the change checks alone. iptables-nft is
    read again after ``safety_interval`` anyway, as the nftables reader is; the legacy
    source has its own bounded re-read (``IptablesLegacySource.reread_interval``).
    """

    mode = "iptables"

    def __init__(self, paths=None, legacy=None, nft=_nft_source, clock=time.monotonic,
                 safety_interval: float = 300.0) -> None:
        from exporter.readers.iptables_legacy import IptablesLegacySource

        # The source keeps no rules: this object keeps their resolution, reused while unchanged.
        # lazy: the legacy tables' chains decoded one by one as the resolver walks them.
        self.legacy = legacy if legacy is not None else IptablesLegacySource(paths, keep=False, lazy=True)
        self.nft = nft() if callable(nft) else nft
        self.clock = clock
        self.safety_interval = safety_interval
        # Service port names by chain, from the desired model (the drift collector sets it):
        # chain names are hashes, and kube-proxy drops comments past 1,000 endpoints.
        # A function giving the Mapping chain -> namespace/name (iptables.chain_services_for),
        # called only when the rules are resolved again; None: no names but comments.
        self.chain_services = None
        self._lock = threading.Lock()  # one read at a time; a second caller reuses it
        self._last: IptablesLive | None = None
        self._at = float("-inf")
        self._backend: str | None = None  # where the last read found kube-proxy's rules
        self._nft_seen: tuple[int, float, bool] | None = None  # (generation, when, KUBE-SERVICES there)
        self._nft_read_generation: int | None = None  # the generation the last nft rules are from
        self._nft_read_at = float("-inf")
        self._resolver_cache: dict = {}  # the resolver's, kept between reads: unchanged frontends stay the same objects
        # (legacy change signal, when, reason) of legacy tables that did not decode: the same
        # bytes fail the same way, so they are fetched again only as a good read would be
        # (the signal moved, or the clock's re-read is due), not on every scrape.
        self._legacy_failure: tuple | None = None
        self._legacy_cost = 0.0  # seconds the last legacy read that fetched the tables took

    def read_rules(self, max_age: float = SCRAPE_WINDOW, following: bool = False) -> IptablesLive:
        """The last read if not older than ``max_age`` seconds, else a new one; ``ReadFailed``
        with one line when the rules cannot be read whole. ``following``: for the latency
        follower, the legacy tables are due sooner (``FOLLOW_LEGACY_COST``)."""
        from exporter.readers.iptables_legacy import LegacyBlobError, LegacyReadError
        from exporter.readers.iptables_nft import NftReadError

        with self._lock:
            if self._last is not None and self.clock() - self._at <= max_age:
                return self._last
            self._failed_again()
            start = time.perf_counter()
            try:
                try:
                    live = self._read(start, self._follow_within() if following else None)
                except BaseException:
                    # The sources may have taken this read's change signal or generation as
                    # seen before it failed (the resolver decodes chains after they return):
                    # "unchanged since" would then serve the last good read, from before the
                    # change, as the rules now. The next read starts from the kernel again.
                    self._last = None
                    self._nft_read_generation = None
                    # And the resolution kept for the next read: it may hold chains dumped
                    # from a later generation than the read it was walked for.
                    self._resolver_cache = {}
                    raise
            except LegacyReadError as err:
                reason = f"kube-proxy's iptables-legacy rules not read: {err}"
                if isinstance(err, LegacyBlobError):
                    signal = self._legacy_signal()
                    if signal is not None:
                        self._legacy_failure = (signal, self.clock(), reason)
                raise ReadFailed(reason) from None
            except NftReadError as err:
                raise ReadFailed(f"kube-proxy's iptables-nft rules not read: {err}") from None
            except OSError as err:
                raise ReadFailed(f"iptables rules: {err.strerror or err}") from None
            if live.reread and live.backend == LEGACY:
                self._legacy_cost = live.read_seconds
                # A whole legacy read's transients (the blob's index, each chain's rules) are
                # freed by now; without handing their pages back, each re-read (every 30 s at
                # most, or on a change) left 10-14 MB more resident at 10,000 Services.
                allocator.trim()
            self._last, self._at = live, self.clock()
            return live

    def _failed_again(self) -> None:
        """ReadFailed again, without fetching, while the legacy tables that did not decode
        are still the kernel's as far as the change signal and the re-read clock can tell."""
        failed = self._legacy_failure
        if failed is None:
            return
        signal, when, reason = failed
        if self._legacy_signal() == signal and self.clock() - when < self.legacy.reread_interval:
            raise ReadFailed(reason)
        self._legacy_failure = None

    def _legacy_signal(self) -> tuple | None:
        from exporter.readers.iptables_legacy import LegacyReadError

        try:
            return self.legacy.change_signal()
        except (LegacyReadError, OSError):
            return None  # the read that follows says why

    def read(self, max_age: float = SCRAPE_WINDOW) -> LiveRead:
        live = self.read_rules(max_age)
        return LiveRead(live.read.table, live.read.rejected, live.read.unread, live.read_seconds)

    def read_following(self, max_age: float = SCRAPE_WINDOW) -> LiveRead:
        live = self.read_rules(max_age, following=True)
        return LiveRead(live.read.table, live.read.rejected, live.read.unread, live.read_seconds)

    def _follow_within(self) -> float:
        return max(FOLLOW_LEGACY_SECONDS, FOLLOW_LEGACY_COST * self._legacy_cost)

    def close(self) -> None:
        """The iptables-nft source's sockets (its requests and its change feed)."""
        with self._lock:
            if self.nft is not None:
                self.nft.close()

    # -- one read ------------------------------------------------------------------------

    def _nft_state(self) -> tuple[int | None, bool]:
        """The nf_tables generation and whether iptables-nft's nat table has KUBE-SERVICES
        (asked again only when the generation moved)."""
        if self.nft is None:
            return None, False
        generation = self.nft.generation()
        seen = self._nft_seen
        if seen is not None and seen[0] == generation:
            return generation, seen[2]
        present = self.nft.present()
        self._nft_seen = (generation, self.clock(), present)
        return generation, present

    def _read(self, start: float, within: float | None = None) -> IptablesLive:
        generation, in_nft = self._nft_state()
        last = self._last
        legacy_last = last is not None and last.backend == LEGACY  # a legacy read stands until changed

        def unchanged() -> IptablesLive:
            return last._replace(read_seconds=time.perf_counter() - start, reread=False)

        legacy_rulesets = None
        if not in_nft and self.legacy.change_signal() and (self.legacy.due(within) or not legacy_last):
            # The legacy rules are what this read needs unless nft holds kube-proxy's: read
            # them first, and presence then comes from them rather than from a second copy
            # of the table into this process.
            legacy_rulesets = self.legacy.read(unchanged_ok=legacy_last, within=within)
            if legacy_rulesets is None:  # the clock's re-read found the same rules: the last read stands
                self._legacy_cost = time.perf_counter() - start
                return unchanged()
        in_legacy = self.legacy.present()
        if in_nft and in_legacy:
            raise ReadFailed("kube-proxy's rules are in both iptables backends (KUBE-SERVICES in the nat table "
                             "of iptables-nft and of iptables-legacy): traffic meets both, so drift cannot be "
                             "told; remove the stale backend's rules (`iptables-legacy-save` / "
                             "`iptables-nft-save` show them)")
        if in_nft:
            backend = NFT
        elif in_legacy:
            backend = LEGACY
        elif self._backend is not None:
            backend = self._backend  # kube-proxy's rules gone from where they were: read there
        elif legacy_rulesets and any(name.startswith("KUBE-") for r in legacy_rulesets
                                     for chains in r.tables.values() for name in chains):
            backend = LEGACY  # its filter chains left, the nat ones flushed (firewalld)
        else:
            backend = NFT if self.nft is not None else LEGACY
        if backend == NFT:
            if (last is not None and last.backend == NFT and self._nft_read_generation == generation
                    and self.clock() - self._nft_read_at < self.safety_interval and self.nft.settled()):
                return unchanged()
            rulesets = self.nft.read()
            # The source reads the generation again around its dumps: the rules are that one's.
            self._nft_read_generation = self.nft.last_generation
            self._nft_read_at = self.clock()
        else:
            if legacy_rulesets is None and legacy_last and not self.legacy.due(within):
                return unchanged()
            rulesets = legacy_rulesets if legacy_rulesets is not None else self.legacy.read(
                unchanged_ok=legacy_last, within=within)
            if rulesets is None:
                return unchanged()
        self._backend = backend
        read = self._resolve(rulesets)
        if backend == NFT:
            read, rulesets = self._verified(read, rulesets)
        # (The iptables-nft source dumps here the chains no resolve counted: none of
        # kube-proxy's were found, so nothing was walked.)
        return IptablesLive(read, backend, ruleset_sizes(rulesets), time.perf_counter() - start, True)

    def _verified(self, read, rulesets):
        """The iptables-nft source decodes chains as the resolver asks for them: a read is
        the kernel's only if nf_tables did not move while the resolver walked. Read and
        resolve again until it did not (the feed names what moved)."""
        for _ in range(NFT_VERIFY_TRIES):
            if self.nft.verify():
                return read, rulesets
            rulesets = self.nft.read()
            self._nft_read_generation = self.nft.last_generation
            read = self._resolve(rulesets)
        raise ReadFailed(f"kube-proxy's iptables-nft rules changed during each of {NFT_VERIFY_TRIES} reads in a row")

    def _resolve(self, rulesets):
        from exporter.readers.iptables import IptablesRead, NoKubeProxyRules, resolve_rulesets

        try:
            names = self.chain_services() if self.chain_services is not None else None
            return resolve_rulesets(rulesets, names, self._resolver_cache)
        except NoKubeProxyRules:
            # No trace of kube-proxy in either backend: every desired frontend missing, as a
            # deleted nftables table is (the nat table flushed and its chains deleted too).
            return IptablesRead({}, {}, frozenset(), (), {})
        except BaseException:
            # A chain dumped or decoded as the resolver asked for it failed: what the cache
            # holds is half a walk.
            self._resolver_cache = {}
            raise


def shared_nftables(ctx) -> NftablesDataplane:
    return ctx.service(NFTABLES_SERVICE, NftablesDataplane)


def shared_iptables(ctx) -> IptablesDataplane:
    return ctx.service(IPTABLES_SERVICE, lambda: IptablesDataplane(ctx.paths))


def dataplane_for(ctx, mode: str) -> DataplaneReader:
    """The reader of ``mode`` for this exporter (shared ones from ``ctx``)."""
    if mode == "ipvs":
        from exporter.collectors.ipvs import shared_ipvs_reader

        return shared_ipvs_reader(ctx)
    if mode == "nftables":
        return shared_nftables(ctx)
    if mode == "iptables":
        return shared_iptables(ctx)
    raise ValueError(f"unknown proxy mode {mode!r}")
