"""The live IPVS reader: /proc/net/ip_vs read whole, as an object that owns what it keeps.

Why /proc and not netlink for the table: the kernel prints every virtual server
with its real servers in one record, so one pass over the text is the whole table
(lab.md: a Python pass costs about as much as `cat`, while a netlink walk asks
once per virtual server for its real servers and parses far more bytes).

Consistency: the file is read whole before parsing, so a record is never
half-parsed. A change between two read() calls may skip or repeat one record
(the seq_file position counts records); a repeat is harmless (same key), a skip
is a momentary absence, which is why drift has a grace period.
"""

from __future__ import annotations

import os
import threading
import time

from exporter.dataplane import DataplaneReader, LiveRead
from exporter.paths import Paths
from exporter.readers.ipvs.incremental import IncrementalParser
from exporter.readers.ipvs.netlink import dump_service_flags, hz_from_netlink, kernel_hz, merge_service_flags
from exporter.readers.ipvs.table import PROC_IP_VS, IPVSTable, IPVSUnavailable, with_hz
from exporter.readers.ipvs.text import parse_ip_vs


def read_ip_vs_text(paths: Paths = Paths()) -> str:
    """The whole of /proc/net/ip_vs, read before any parsing."""
    path = paths.proc(*PROC_IP_VS)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise IPVSUnavailable(f"ip_vs module not loaded (no {path})") from None
    try:
        chunks = []
        while True:
            # seq_file returns at most a page or so per call whatever we ask for.
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def read_ip_vs(paths: Paths = Paths(), hz: int | None = None) -> IPVSTable:
    """The live table from /proc/net/ip_vs under ``paths``. Raises IPVSUnavailable."""
    return parse_ip_vs(read_ip_vs_text(paths), hz)


class IPVSReader(DataplaneReader):
    """The live IPVS table, read at most once per ``max_age`` however many ask.

    One object per exporter: the ``ipvs`` collector's module makes it
    (``shared_ipvs_reader``) and the drift collector shares it, so both see one
    read per scrape; its owner sets ``max_age``, the window in which a read is
    reused. Everything kept between reads is this object's: the incremental
    parser (last shape, conversions), the HZ learned, the last table.

    ``get()`` gives the ``IPVSTable`` with its counters (the ``ipvs`` collector's
    connections and sizes); ``read()`` the ``LiveRead`` every mode's reader gives.
    Both raise IPVSUnavailable (a DataplaneUnavailable) when ip_vs is not loaded,
    OSError when /proc/net/ip_vs cannot be read. The table is shared: read-only.
    """

    mode = "ipvs"

    def __init__(self, paths: Paths = Paths(), max_age: float = 0.0,
                 scheduler_flags: bool = False) -> None:
        self.paths = paths
        self.max_age = max_age  # seconds a read is reused; 0: every call reads
        # Also one netlink dump of the services (no real servers) for the scheduler
        # flags /proc does not print. Off by default: it costs more than the /proc read
        # (see bench/bench_ipvs.py), and the proxies' default rules use no such flag.
        self.scheduler_flags = scheduler_flags and paths.procfs == "/proc"
        self._parser = IncrementalParser()
        self._lock = threading.Lock()
        self._table: IPVSTable | None = None
        self._read_at = 0.0
        self._config_hz: int | None = None  # from the kernel config, read once
        self._hz: int | None = None  # exact, once learned from netlink
        self.read_seconds = 0.0  # how long the last real read took

    def get(self, max_age: float | None = None) -> IPVSTable:
        """The live table, reusing a read not older than ``max_age`` (default: the owner's window)."""
        return self._shared_read(max_age)[0]

    def read(self, max_age: float | None = None) -> LiveRead:
        """The live table as every mode's reader gives it.

        ``read_seconds`` is the time of the read returned: one read per scrape,
        whichever collector of it asked first, so it is this scrape's work.
        """
        table, seconds = self._shared_read(max_age)
        reason = table.unread_reason()
        return LiveRead(table, {}, (reason,) if reason else (), seconds)

    def _shared_read(self, max_age: float | None) -> tuple[IPVSTable, float]:
        with self._lock:
            window = self.max_age if max_age is None else max_age
            if self._table is not None and time.monotonic() - self._read_at <= window:
                return self._table, self.read_seconds
            start = time.perf_counter()
            table = self._parser.parse(read_ip_vs_text(self.paths), self._hz or self._kernel_hz())
            if self._hz is None and table.persistent_jiffies and self.paths.procfs == "/proc":
                # A fixture tree's netlink would be ours, not its: this host's kernel only.
                self._hz = hz_from_netlink(table.persistent_jiffies)
                if self._hz:
                    table = with_hz(table, self._hz)
            if self.scheduler_flags:
                merge_service_flags(table, dump_service_flags())
            self.read_seconds = time.perf_counter() - start
            self._table = table
            self._read_at = time.monotonic()
            return table, self.read_seconds

    def _kernel_hz(self) -> int:
        if self._config_hz is None:
            self._config_hz = kernel_hz()
        return self._config_hz
