"""One ``DataplaneReader`` per proxy mode: the live table in the shapes of ``exporter.dataplane``.

- IPVS: a small adapter over the ``LiveTable`` the ``ipvs`` collector shares
  (to be replaced by the IPVS reader object itself).
- nftables: ``NftablesReader``, owned here and shared by the drift and the
  ``nftables`` collectors, so one scrape reads the rules once. No kube-proxy
  table at all is an empty table (every desired frontend missing: the nat
  table flushed or deleted behind the proxy's back), not an error.
- iptables: no reader yet (the next issue); unavailable, with that reason.
"""

from __future__ import annotations

import threading
import time

from exporter.dataplane import DataplaneReader, DataplaneUnavailable, LiveRead

NFTABLES_SERVICE = "nftables-dataplane"


class ReadFailed(Exception):
    """The dataplane is there but this read failed; the message is one line."""


class IPVSDataplane(DataplaneReader):
    mode = "ipvs"

    def __init__(self, live, paths) -> None:
        self.live = live  # the shared LiveTable
        self.paths = paths

    def read(self, max_age: float = 0.5) -> LiveRead:
        from exporter.readers.ipvs import IPVSUnavailable

        try:
            table = self.live.get(max_age)
        except IPVSUnavailable as err:
            raise DataplaneUnavailable(str(err)) from None
        except OSError as err:
            raise ReadFailed(f"reading {self.paths.proc('net', 'ip_vs')}: {err.strerror}") from None
        reason = table.unread_reason()
        unread = (reason,) if reason else ()
        # The reuse window is shorter than a scrape interval: the last real read is this scrape's.
        return LiveRead(table, {}, unread, self.live.read_seconds)


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

    def read_rules(self, max_age: float = 0.5):
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

    def read(self, max_age: float = 0.5) -> LiveRead:
        rules = self.read_rules(max_age)
        return LiveRead(rules.table, rules.rejected, rules.unread, rules.read_seconds)


class IptablesDataplane(DataplaneReader):
    mode = "iptables"

    def read(self, max_age: float = 0.5) -> LiveRead:
        raise DataplaneUnavailable("no reader of kube-proxy's iptables rules yet (it comes with the next "
                                   "issue): drift is not reported on iptables nodes")


def shared_nftables(ctx) -> NftablesDataplane:
    return ctx.service(NFTABLES_SERVICE, NftablesDataplane)


def dataplane_for(ctx, mode: str) -> DataplaneReader:
    """The reader of ``mode`` for this exporter (shared ones from ``ctx``)."""
    if mode == "ipvs":
        from exporter.collectors.ipvs import shared_live_table

        return IPVSDataplane(shared_live_table(ctx), ctx.paths)
    if mode == "nftables":
        return shared_nftables(ctx)
    if mode == "iptables":
        return IptablesDataplane()
    raise ValueError(f"unknown proxy mode {mode!r}")
