"""One ``DataplaneReader`` per proxy mode: the live table in the shapes of ``exporter.dataplane``.

- IPVS: the ``IPVSReader`` the ``ipvs`` collector owns and shares (it is a
  ``DataplaneReader`` itself).
- nftables: ``NftablesReader``, owned here and shared by the drift and the
  ``nftables`` collectors, so one scrape reads the rules once. No kube-proxy
  table at all is an empty table (every desired frontend missing: the nat
  table flushed or deleted behind the proxy's back), not an error.
- iptables: no reader yet (the next issue); unavailable, with that reason.
"""

from __future__ import annotations

import threading
import time

from exporter.dataplane import SCRAPE_WINDOW, DataplaneReader, DataplaneUnavailable, LiveRead

NFTABLES_SERVICE = "nftables-dataplane"


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


class IptablesDataplane(DataplaneReader):
    mode = "iptables"

    def read(self, max_age: float = SCRAPE_WINDOW) -> LiveRead:
        raise DataplaneUnavailable("no reader of kube-proxy's iptables rules yet (it comes with the next "
                                   "issue): drift is not reported on iptables nodes")


def shared_nftables(ctx) -> NftablesDataplane:
    return ctx.service(NFTABLES_SERVICE, NftablesDataplane)


def dataplane_for(ctx, mode: str) -> DataplaneReader:
    """The reader of ``mode`` for this exporter (shared ones from ``ctx``)."""
    if mode == "ipvs":
        from exporter.collectors.ipvs import shared_ipvs_reader

        return shared_ipvs_reader(ctx)
    if mode == "nftables":
        return shared_nftables(ctx)
    if mode == "iptables":
        return IptablesDataplane()
    raise ValueError(f"unknown proxy mode {mode!r}")
