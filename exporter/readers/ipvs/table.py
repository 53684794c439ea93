"""The parsed live IPVS table: virtual servers by key, their counters kept apart.

Plain data: what a read produced, no parsing and no caches (``text`` parses,
``incremental`` re-reads, ``reader`` owns what is kept between reads).
"""

from __future__ import annotations

from typing import NamedTuple

from exporter.dataplane import DataplaneUnavailable, Table, VirtualServerKey

PROC_IP_VS = ("net", "ip_vs")
FALLBACK_HZ = 250  # Debian's and Ubuntu's CONFIG_HZ


class IPVSUnavailable(DataplaneUnavailable):
    """/proc/net/ip_vs (or the IPVS netlink family) is absent: ip_vs is not loaded."""


class Layout(NamedTuple):
    """Where the kept virtual servers and their counters sit, in the text's order."""

    keys: list[VirtualServerKey]  # each kept virtual server once
    index: dict[VirtualServerKey, int]  # key -> its place in ``keys``
    first_lines: list[int]  # line number of each one's service line
    starts: list[int]  # index of each one's first counter; then the number of counters
    # Line number of each kept real server: from a whole parse only (None after a
    # patch, whose counters are read through the mask, not line by line).
    counter_lines: list[int] | None
    lines: int  # lines of the text, the last complete one included

    @classmethod
    def build(cls, keys: list[VirtualServerKey], first_lines: list[int], starts: list[int],
              counter_lines: list[int] | None, lines: int) -> "Layout":
        return cls(keys, dict(zip(keys, range(len(keys)))), first_lines, starts, counter_lines, lines)


_EMPTY_LAYOUT = Layout([], {}, [], [0], [], 0)


class IPVSTable(dict):
    """A table (``exporter.dataplane.Table``: virtual servers by key) plus what the parse dropped.

    ``skipped_lines``: lines that did not parse (their virtual server is dropped).
    ``first_unread``: (line number from 1, the line) of the first of them, or None.
    ``persistent_jiffies``: raw /proc timeouts, kept so a caller that learns HZ later
    can convert (``VirtualServer.persistent_timeout`` is already in seconds).

    Connection counters are kept beside the virtual servers, not in them: they
    change on every read of a busy node while the rest of a virtual server does
    not, so a virtual server stays the same object from read to read (and what is
    compared against it need not be compared again). ``connections(key)`` gives
    them per real server, ``total_connections()`` summed.
    """

    skipped_lines: int = 0
    first_unread_index: int | None = None  # of the text's lines, from 0
    first_unread: tuple[int, str] | None = None
    hz: int = FALLBACK_HZ
    persistent_jiffies: dict[VirtualServerKey, int] = {}
    # The same object for every table read with the same shape (all but counters),
    # None when not known: what is derived from the shape alone can be kept by it.
    shape: object | None = None
    # Counters of every kept real server, in the order of ``_layout``.
    _layout: Layout = _EMPTY_LAYOUT
    _active: list[int] = []
    _inactive: list[int] = []

    def copy(self) -> "IPVSTable":
        out = IPVSTable(self)
        out.__dict__.update(self.__dict__)
        return out

    def unread_reason(self) -> str | None:
        """One line saying what was not read (for a log, an error, a user), or None."""
        if self.first_unread is None and not self.skipped_lines:
            return None
        if self.first_unread is None:
            return f"{self.skipped_lines} lines not read"
        number, line = self.first_unread
        shown = line if len(line) <= 100 else line[:100] + "..."
        return (f"line {number} is not IPVS text as /proc/net/ip_vs prints it: {shown!r} "
                f"({self.skipped_lines} lines not read)")

    def connections(self, key: VirtualServerKey) -> dict[tuple[str, int], tuple[int, int]]:
        """(active, inactive) connections of each real server of one virtual server."""
        vs = self.get(key)
        place = self._layout.index.get(key)
        if vs is None or place is None:
            return {}
        start, stop = self._layout.starts[place], self._layout.starts[place + 1]
        return dict(zip(vs.real_servers, zip(self._active[start:stop], self._inactive[start:stop])))

    def total_connections(self) -> tuple[int, int]:
        """(active, inactive) connections summed over every real server."""
        return sum(self._active), sum(self._inactive)

    @classmethod
    def of(cls, table: Table,
           connections: dict[tuple[VirtualServerKey, tuple[str, int]], tuple[int, int]] | None = None,
           ) -> "IPVSTable":
        """A table built by hand (tests, tools) with its counters (default 0)."""
        out = cls(table)
        connections = connections or {}
        active: list[int] = []
        inactive: list[int] = []
        starts = []
        for key, vs in out.items():
            starts.append(len(active))
            for rkey in vs.real_servers:
                a, i = connections.get((key, rkey), (0, 0))
                active.append(a)
                inactive.append(i)
        starts.append(len(active))
        out._layout = Layout.build(list(out), [], starts, [], 0)
        out._active, out._inactive = active, inactive
        out.persistent_jiffies = {}
        return out


def with_hz(table: IPVSTable, hz: int) -> IPVSTable:
    """Redo the jiffies->seconds conversion of a parsed table with the right HZ."""
    if hz == table.hz:
        return table
    for key, jiffies in table.persistent_jiffies.items():
        table[key] = table[key]._replace(persistent_timeout=jiffies // hz)
    table.hz = hz
    return table
