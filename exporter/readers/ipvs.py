"""The live IPVS table: /proc/net/ip_vs for the whole table, netlink for one service.

Why /proc and not netlink for the table: the kernel prints every virtual server
with its real servers in one record, so one pass over the text is the whole table
(lab.md: a Python pass costs about as much as `cat`, while a netlink walk asks
once per virtual server for its real servers and parses far more bytes).

What /proc lacks, netlink gives:
- the persistence timeout in seconds (/proc prints jiffies, so the kernel's HZ is
  needed; ``LiveTable`` learns it once, exactly, from one netlink read);
- scheduler flags such as sh-fallback/sh-port (/proc shows only "ops"): read
  them with ``read_virtual_server`` or ``dump_service_flags``.

Consistency: the kernel prints one virtual server and all its real servers in one
record, and the file is read whole before parsing, so an entry is never
half-parsed. A change between two read() calls may skip or repeat one record (the
seq_file position counts records); a repeat is harmless (same key), a skip is a
momentary absence, which is why drift has a grace period. Lines that do not parse
(a truncated file, garbage) drop their virtual server, never raise; the table
counts them (``skipped_lines``) and names the first (``first_unread``), so no
caller mistakes a table it did not read whole for a clean one.

Fields are separated by any run of blanks: the kernel's fixed widths are only the
fast way to find the counters (a copy with trailing blanks stripped, tabs, CRLF
or a counter wider than 10 characters reads the same, the slow way).

Reading again: a running exporter reads the same table every scrape, and what
changes between two reads is mostly connection counters, sometimes a record or
two. So the parse remembers the last text: the same text is the same table; the
same shape (the text without its fixed-width counters) is the same virtual
servers with new counters; another shape re-parses only the records between
the unchanged ones before and after. Counters live beside the virtual servers
(``IPVSTable.connections``), so a virtual server stays the same object while
only its counters move.
"""

from __future__ import annotations

import errno
import gc
import gzip
import os
import re
import socket
import struct
import threading
import time
from typing import NamedTuple

from exporter.dataplane import RealServer, Table, VirtualServer, VirtualServerKey
from exporter.paths import Paths

PROC_IP_VS = ("net", "ip_vs")
FALLBACK_HZ = 250  # Debian's and Ubuntu's CONFIG_HZ


class IPVSUnavailable(Exception):
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


# Conversions repeat heavily between scrapes and between services (the same pod
# address:port is a real server of its ClusterIP and of every NodePort entry),
# so hex tokens are converted once. Bounded: cleared when they grow too big.
_ENDPOINT_CACHE: dict[str, tuple[str, int]] = {}
_SERVICE_CACHES: dict[int, dict[str, tuple]] = {}  # by HZ: service line -> parsed
_RECORD_CACHES: dict[int, dict[str, tuple]] = {}  # by HZ: the last read's record shapes -> parsed
_CACHE_LIMIT = 500_000

_PROTOCOLS = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP"}
_new_tuple = tuple.__new__


def _endpoint(token: str) -> tuple[str, int]:
    """'0A000001:0050' or '[fd00:...:0001]:0050' -> ('10.0.0.1', 80). Raises ValueError."""
    found = _ENDPOINT_CACHE.get(token)
    if found is not None:
        return found
    host, sep, port_hex = token.rpartition(":")
    if not sep or len(port_hex) != 4:
        raise ValueError(token)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(token)
        try:
            address = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, host[1:-1]))
        except OSError:
            raise ValueError(token) from None
    else:
        if len(host) != 8:
            raise ValueError(token)
        address = socket.inet_ntoa(bytes.fromhex(host))
    found = (address, int(port_hex, 16))
    if len(_ENDPOINT_CACHE) >= _CACHE_LIMIT:
        _ENDPOINT_CACHE.clear()
    _ENDPOINT_CACHE[token] = found
    return found


def _netmask(text: str, ipv6: bool) -> str:
    value = int(text, 16)
    if ipv6:
        # The kernel prints ntohl() of an IPv6 prefix length kept in host order.
        return str(int.from_bytes(value.to_bytes(4, "big"), "little"))
    return socket.inet_ntoa(value.to_bytes(4, "big"))


# IPv4 masks whose low 24 bits are zero (/0 to /8): all but /1 are kept as IPv4.
_SHORT_IPV4_MASKS = {0x00000000, 0xC0000000, 0xE0000000, 0xF0000000, 0xF8000000,
                     0xFC000000, 0xFE000000, 0xFF000000}


def _fwmark_mask_is_ipv6(printed: int) -> bool:
    """Whether a fwmark service's printed persistence mask is an IPv6 prefix length.

    A fwmark line does not name its family. An IPv6 prefix length p (1..128) is
    printed byte-swapped, as p << 24; of those, only 0x80000000 (p=128, the default)
    is also an IPv4 mask (/1), which no one uses for persistence: read it as IPv6.
    """
    return printed & 0x00FFFFFF == 0 and 1 <= printed >> 24 <= 128 and printed not in _SHORT_IPV4_MASKS


def _service(parts: list[str], hz: int) -> tuple[VirtualServerKey, str, int | None, str | None, tuple, int | None]:
    """One service line, split. Raises ValueError/IndexError on anything malformed.

    TCP  0A000001:0050 rr [ops] [persistent <jiffies> <netmask hex>]
    TCP  [fd00:...:0001]:0050 wlc [persistent <jiffies> <prefix hex>]
    FWM  00000007 sh [ops] [persistent ...]
    """
    proto = parts[0]
    if proto == "FWM":
        if len(parts[1]) != 8:
            raise ValueError(parts[1])
        key = VirtualServerKey.for_fwmark(int(parts[1], 16))
        ipv6 = False  # the fwmark line does not say; see _fwmark_mask_is_ipv6
    else:
        address, port = _endpoint(parts[1])
        key = VirtualServerKey(_PROTOCOLS[proto], address, port)
        ipv6 = ":" in address
    scheduler = parts[2]
    rest = parts[3:]
    flags: tuple = ()
    if rest and rest[0] == "ops":
        flags = ("ops",)
        rest = rest[1:]
    timeout = netmask = jiffies = None
    if rest:
        if rest[0] != "persistent" or len(rest) != 3 or len(rest[2]) != 8:
            raise ValueError(" ".join(rest))
        jiffies = int(rest[1])
        timeout = jiffies // hz
        if proto == "FWM":
            ipv6 = _fwmark_mask_is_ipv6(int(rest[2], 16))
        netmask = _netmask(rest[2], ipv6)
    return key, scheduler, timeout, netmask, flags, jiffies


def parse_ip_vs(text: str, hz: int | None = None) -> IPVSTable:
    """Parse the text of /proc/net/ip_vs into a table. Never raises on bad lines.

    ``hz`` is the kernel's CONFIG_HZ, used to turn persistence timeouts from
    jiffies into seconds; default: this machine's (``kernel_hz()``). A virtual
    server whose record has the same shape as at the previous parse (only its
    counters may differ) is the same object as then: never mutate what this
    returns.
    """
    if hz is None:
        hz = kernel_hz()
    # The parse makes thousands of tuples and no reference cycle: the cyclic
    # collector would only walk them again and again.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse(text, hz)
    finally:
        if gc_was_enabled:
            gc.enable()


# One record per virtual server: its service line and the real-server lines after it
# (the kernel indents them "  -> "; any blanks before the arrow are accepted).
_RECORD_BOUNDARY = re.compile(r"\n(?![ \t]*->)")
# The kernel ends a real-server line with its two counters, "%-10d %-10d": the
# active and inactive connections, 21 characters while each fits in 10. That fixed
# width is only the fast way to find them: what defines them is the line's last two
# fields, whatever blanks separate them (a copy with trailing blanks stripped, a
# counter of 11 characters such as -2147483648).
_COUNTERS = 21


class _Shape(NamedTuple):
    """What the last parse learned, for the next one."""

    text: str
    # The records of its blank (the text with its counters blanked: its shape,
    # position for position), the last, empty piece left out.
    records: list[str]
    lead: int  # header records before the first virtual server
    clean: bool  # every record after the headers kept, none twice, none torn
    skeleton: IPVSTable  # the table without counters: copied, never handed out
    layout: Layout
    active: list[int]
    inactive: list[int]
    # The blank's bytes as one int, and a mask: 0 on the counters of every kept real
    # server, 0xFF elsewhere. None when the text does not allow them (not clean, not
    # ASCII): the next read then parses the whole text. (At 10,000 services the text
    # is 3.3 MB: this state holds about four times that.)
    blank_value: int | None
    mask: int | None


_SHAPES: dict[int, _Shape] = {}  # by HZ: the last parse


class _Numbers(dict):
    """Counter bytes -> int. The same values recur across real servers and reads,
    and a lookup costs a fifth of int() (measured in the emulated VM)."""

    def __missing__(self, text: bytes) -> int:
        # The kernel's "%d" only: int() alone would also take "+5", "1_000" or " 5".
        if not (text.isdigit() or text[:1] == b"-" and text[1:].isdigit()):
            raise ValueError(text)
        value = self[text] = int(text)
        return value


_NUMBERS = _Numbers()
# A counter byte XOR a space: a digit becomes 0x10-0x19 (back to "0"-"9" here), a
# padding space 0 and a tab 0x29 (blanks here), a minus sign 0x0D (back to "-": IPVS
# has printed negative counts). The bytes that would otherwise turn into ASCII
# whitespace and split a number silently (from ")*+,") become "x", which fails.
_COUNTER_BYTES = bytes.maketrans(bytes(range(0x10, 0x1A)) + b"\0\x29\x0d\x09\x0a\x0b\x0c",
                                 b"0123456789  -xxxx")
_MASK_BYTES = bytes.maketrans(b"\0" + bytes(range(1, 256)), b"\0" + b"\xff" * 255)


def _parse(text: str, hz: int) -> IPVSTable:
    last = _SHAPES.get(hz)
    if last is not None and text == last.text:
        return _with_counters(last.skeleton, last.active, last.inactive)
    if last is not None and last.mask is not None and text.isascii() and "\0" not in text:
        # The text as one int: one C-level pass compares its shape with the last one
        # (XOR, then the mask hides the counters), another takes all its counters.
        value = int.from_bytes(text.encode("ascii"), "little")
        state = None
        if len(text) == len(last.text) and (value ^ last.blank_value) & last.mask == 0:
            counters = _counters(value, last.blank_value, last.mask, len(text), last.layout)
            if counters is not None:
                state = last._replace(text=text, active=counters[0], inactive=counters[1])
        else:
            state = _patch_text(last, text, value, hz)
        if state is not None:
            _SHAPES[hz] = state
            return _with_counters(state.skeleton, state.active, state.inactive)
    return _parse_text(text, hz)


def _with_counters(skeleton: IPVSTable, active: list[int], inactive: list[int]) -> IPVSTable:
    table = skeleton.copy()
    table._active, table._inactive = active, inactive
    table.shape = skeleton
    return table


def _counters(value: int, blank_value: int, mask: int, length: int,
              layout: Layout) -> tuple[list[int], list[int]] | None:
    """Every counter of a text whose shape is the blank's; None if one is not a number."""
    digits = ((value ^ blank_value) & ~mask).to_bytes(length, "little").translate(_COUNTER_BYTES)
    return _numbers(digits.split(), layout.starts[-1])


def _numbers(numbers: list, real_servers: int) -> tuple[list[int], list[int]] | None:
    if len(numbers) != 2 * real_servers:
        return None  # not two counters per real server: not the kernel's text
    if len(_NUMBERS) > _CACHE_LIMIT:
        _NUMBERS.clear()
    try:
        values = list(map(_NUMBERS.__getitem__, numbers))
    except ValueError:
        return None
    return values[0::2], values[1::2]


def _fixed_width(line: str) -> bool:
    """Whether a real-server line ends with the kernel's two 10-wide counter fields.

    A field starts at each of the last 21 and the last 10 characters, after a blank:
    then those 21 characters hold the last two fields (at least two, and the count of
    all counters checks there are not more). The same test is inlined in ``_marked``.
    """
    return (len(line) > _COUNTERS and line[-22] == " " and line[-11] == " "
            and line[-21] > " " and line[-10] > " ")


def _counter_start(line: str) -> int:
    """Where the counters of a real-server line start: its last two fields.

    ``len(line)`` when it has no two fields after the arrow (nothing to read).
    """
    if _fixed_width(line):
        return len(line) - _COUNTERS
    fields = line.rsplit(None, 2)
    if len(fields) != 3:
        return len(line)
    before_last = line.rstrip()[:-len(fields[2])].rstrip()
    return len(before_last) - len(fields[1])


def _counter_end(line: str) -> int:
    """Where the counters end: the line's end (kernel widths), else the last field's end."""
    return len(line) if _fixed_width(line) else len(line.rstrip())


def _is_real_server_line(line: str) -> bool:
    """An arrow line, not the header's "-> RemoteAddress"."""
    body = line.lstrip()
    return body[:2] == "->" and not body[2:].lstrip().startswith("RemoteAddress")


def _marked_slowly(line: str, mark: str) -> str:
    """``_marked`` for a line not in the kernel's fixed widths (stripped, tabs, wide counters)."""
    if not _is_real_server_line(line):
        return line
    start, end = _counter_start(line), _counter_end(line)
    if start >= end:
        return line
    return line[:start] + mark * (end - start) + line[end:]


def _marked(lines: list[str], mark: str = "\0") -> str:
    """Lines, the counters of real-server lines replaced by ``mark`` (one character each), joined.

    The fast test is the kernel's: "  -> " then an address (hex or "["), not the
    header's "RemoteAddress", ending in the fixed widths (``_fixed_width``, inlined:
    1-character slices make no new string). Service lines start with a letter and
    are kept as they are; any other line goes the slow way.
    """
    fixed = mark * _COUNTERS
    return "\n".join([
        line[:-_COUNTERS] + fixed
        if line[2:3] == "-" and line[5:6] != "R" and line[-22:-21] == " " and line[-11:-10] == " "
        and line[-21:-20] > " " and line[-10:-9] > " " and len(line) > _COUNTERS
        else line if line[:1] > " " else _marked_slowly(line, mark)
        for line in lines])


def _parse_text(text: str, hz: int) -> IPVSTable:
    """The whole text, record by record (the first read, or after anything unusual)."""
    lines = text.split("\n")
    torn = lines[-1]  # "" after the final newline; else a cut line, kept as cut
    marked = _marked(lines[:-1]) + "\n" + torn if len(lines) > 1 else torn
    if "\0" not in text:
        blank = marked.replace("\0", " ")
    else:  # NULs of its own (never the kernel's): blank it apart
        blank = _marked(lines[:-1], " ") + "\n" + torn if len(lines) > 1 else torn
    records = _RECORD_BOUNDARY.split(blank)
    parsed = _parse_shape(records, hz)
    clean, skeleton, layout = parsed[2:]
    blank_value = mask = counters = None
    if clean and text.isascii() and "\0" not in text:
        # Clean: every marked line is a kept real server, so the marks are its counters,
        # all taken in two C-level passes as a re-read takes them (``_counters``).
        blank_value = int.from_bytes(blank.encode("ascii"), "little")
        mask = int.from_bytes(marked.encode("ascii").translate(_MASK_BYTES), "little")
        counters = _counters(int.from_bytes(text.encode("ascii"), "little"), blank_value, mask, len(text),
                             layout)
    else:
        counted = list(map(lines.__getitem__, layout.counter_lines))
        # All counters in one split: two numbers per line, or the text is not the kernel's.
        numbers = " ".join([line[-_COUNTERS:] if _fixed_width(line) else line[_counter_start(line):]
                            for line in counted]).encode("ascii", "replace").split()
        counters = _numbers(numbers, len(counted))
    if counters is None:
        # A counter that is not a number (never from the kernel): drop its virtual
        # server, as for any other line that does not parse.
        _SHAPES.pop(hz, None)
        return _with_first_unread(_drop_bad_counters(skeleton.copy(), lines, layout), lines)
    _with_first_unread(skeleton, lines)
    state = _Shape(text, *parsed, *counters, blank_value, mask)
    _SHAPES[hz] = state
    return _with_counters(skeleton, state.active, state.inactive)


def _with_first_unread(table: IPVSTable, lines: list[str]) -> IPVSTable:
    """Name the first line the parse could not read (index -> number and text)."""
    index = table.first_unread_index
    table.first_unread = (index + 1, lines[index]) if index is not None and index < len(lines) else None
    return table


def _patch_text(last: _Shape, text: str, value: int, hz: int) -> _Shape | None:
    """The last parse with the records that changed replaced; None if it cannot be.

    The shape before the first change and after the last one is the last text's:
    found with two C-level passes over the text as an int. Only the lines in
    between are blanked and masked one by one, and only the records that changed
    are parsed again (``_patch_shape``). None when the text is cut or the change
    is not a clean one: the caller parses the whole text.
    """
    if not text.endswith("\n"):
        return None
    old_length, new_length = len(last.text), len(text)
    common = min(old_length, new_length)
    shift = new_length - old_length
    # Shape differences (byte i of the int is text position i): the lowest set bit is
    # the first one. (The mask is as long as the last text: beyond it, nothing counts.)
    differ = (value ^ last.blank_value) & last.mask
    first = min(common, ((differ & -differ).bit_length() - 1) // 8) if differ else common
    # Then the ends aligned (new[i + shift] against old[i]): the highest set bit is
    # the last difference, and what follows it is the same at the end of both.
    if shift > 0:
        differ = ((value >> 8 * shift) ^ last.blank_value) & last.mask
    elif shift < 0:
        differ = (value ^ (last.blank_value >> -8 * shift)) & (last.mask >> -8 * shift)
    same_end = common - 1 - (differ.bit_length() - 1) // 8 if differ else common
    same_end = min(same_end, old_length - first, new_length - first)
    # Widen to whole lines (blanks and marks are made line by line).
    start = text.rfind("\n", 0, first) + 1
    stop = new_length - same_end
    if stop > 0 and text[stop - 1] != "\n":
        stop = text.find("\n", stop) + 1
    old_stop = stop - shift
    marked = _marked(text[start:stop].split("\n"))
    old_blank = "\n".join(last.records) + "\n"
    blank = old_blank[:start] + marked.replace("\0", " ") + old_blank[old_stop:]
    records = _RECORD_BOUNDARY.split(blank)
    if records[-1] != "":
        return None
    parsed = _patch_shape(last, records[:-1], hz)
    if parsed is None:
        return None
    old_mask = last.mask.to_bytes(old_length, "little")
    mask = int.from_bytes(old_mask[:start] + marked.encode("ascii").translate(_MASK_BYTES) + old_mask[old_stop:],
                          "little")
    blank_value = int.from_bytes(blank.encode("ascii"), "little")
    counters = _counters(value, blank_value, mask, new_length, parsed[4])
    if counters is None:
        return None
    return _Shape(text, *parsed, *counters, blank_value, mask)


def _parse_shape(records: list[str], hz: int) -> tuple[list[str], int, bool, IPVSTable, Layout]:
    """The table of a text without counters, record by record, and its layout."""
    table = IPVSTable()
    table.hz = hz
    jiffies_by_key: dict[VirtualServerKey, int] = {}
    keys: list[VirtualServerKey] = []
    first_lines: list[int] = []
    starts: list[int] = []
    counter_lines: list[int] = []

    def drop_last() -> None:
        # The record before a bad line may have lost lines to it: drop it whole.
        table.pop(keys[-1], None)
        jiffies_by_key.pop(keys[-1], None)
        del keys[-1], first_lines[-1], counter_lines[starts.pop():]

    # A record whose shape is the one of the last parse is the same virtual server:
    # reuse its parse (a dict lookup instead of a line-by-line parse). Only the last
    # parse's records are kept, so the cache never outgrows one table.
    previous = _RECORD_CACHES.get(hz, {})
    current: dict[str, tuple[VirtualServer, int | None]] = {}
    records = list(records)
    # The kernel ends every line with "\n", so the last piece is "" unless the text
    # was cut: then the last record is torn and dropped whole.
    torn = records.pop()
    skipped = torn.count("\n") + 1 if torn else 0
    clean = not torn
    lead = 0  # header records before the first virtual server
    kept_last = False  # whether the record before was kept (and may still be dropped)
    line_no = 0  # of the record's first line
    first_unread: int | None = None  # index of the first line not read
    for record in records:
        try:
            cached = _known_or_parsed(previous, record, hz)
        except (ValueError, IndexError, KeyError):
            # A line that is not a service (garbage, or a header) starts a record
            # of its own; it may sit among the real servers of the record before
            # it, so drop that one too: no entry is ever half-read.
            lines = record.split("\n")
            if not keys and clean:
                lead += 1
            else:
                clean = False
            if not record.strip():
                # An empty line (a paste's): nothing to read, nothing lost. Not the
                # kernel's text, so no fast path for the next read (not clean).
                clean = False
                line_no += len(lines)
                continue
            extra = _header_extra_lines(lines)
            if extra >= 0:
                skipped += extra
                clean = clean and not extra
                if extra and first_unread is None:
                    first_unread = line_no + len(lines) - extra
            else:
                skipped += len(lines)
                clean = False
                if first_unread is None:
                    first_unread = line_no + _first_bad_line(lines, hz)
                if kept_last:
                    drop_last()
            line_no += len(lines)
            kept_last = False
            continue
        current[record] = cached
        vs, jiffies = cached
        key = vs.key
        if key in table:
            clean = False  # printed twice (seq_file): the last printing counts
        table[key] = vs
        keys.append(key)
        first_lines.append(line_no)
        starts.append(len(counter_lines))
        # The record is its service line and one line per real server (never two for one).
        real_servers = len(vs.real_servers)
        counter_lines.extend(range(line_no + 1, line_no + 1 + real_servers))
        line_no += 1 + real_servers
        if jiffies is not None:
            jiffies_by_key[key] = jiffies
        kept_last = True
    if torn and torn[:1] not in "TUSF" and kept_last:
        # A cut within "  -> " splits off as a piece of its own: the record before is short.
        drop_last()
    if torn and first_unread is None:
        first_unread = line_no + torn.count("\n")  # the cut line
    starts.append(len(counter_lines))
    _RECORD_CACHES[hz] = current
    table.skipped_lines = skipped
    table.first_unread_index = first_unread
    table.persistent_jiffies = jiffies_by_key
    if clean:
        layout = Layout.build(keys, first_lines, starts, counter_lines, line_no)
    else:
        layout = _compact(table, Layout(keys, {}, first_lines, starts, counter_lines, line_no))
    table._layout = layout
    return records, lead, clean, table, layout


def _header_extra_lines(lines: list[str]) -> int:
    """Lines of a header record beyond the kernel's header; -1 when it is no header."""
    first = lines[0].split()
    if first[:3] == ["IP", "Virtual", "Server"]:
        return len(lines) - 1
    if first[:1] == ["Prot"] and first[1:2] and first[1].startswith("LocalAddress"):
        second = lines[1].split()[:2] if len(lines) > 1 else []
        return len(lines) - 1 - (second[:1] == ["->"] and second[1:2] != [] and second[1].startswith("RemoteAddress"))
    return -1


def _first_bad_line(lines: list[str], hz: int) -> int:
    """Which line of a record that did not parse is the first one not understood.

    The error path only (``_record`` raises for the record as a whole): the
    service line is checked, then each real-server line as ``_record`` reads it.
    """
    try:
        _service(lines[0].split(), hz)
    except (ValueError, IndexError, KeyError):
        return 0
    seen = set()
    for n, line in enumerate(lines[1:], 1):
        parts = line.split()
        try:
            if len(parts) != 4 or parts[0] != "->":
                raise ValueError(line)
            endpoint = _endpoint(parts[1])
            int(parts[3])
        except (ValueError, IndexError):
            return n
        if endpoint in seen:
            return n
        seen.add(endpoint)
    return 0


def _compact(table: IPVSTable, layout: Layout) -> Layout:
    """Each kept virtual server once, at its last printing; none the table dropped."""
    last = dict(zip(layout.keys, range(len(layout.keys))))
    keys: list[VirtualServerKey] = []
    first_lines: list[int] = []
    starts: list[int] = []
    counter_lines: list[int] = []
    for place, key in enumerate(layout.keys):
        if key in table and last[key] == place:
            keys.append(key)
            first_lines.append(layout.first_lines[place])
            starts.append(len(counter_lines))
            counter_lines += layout.counter_lines[layout.starts[place]:layout.starts[place + 1]]
    starts.append(len(counter_lines))
    return Layout.build(keys, first_lines, starts, counter_lines, layout.lines)


def _patch_shape(last: _Shape, records: list[str],
                 hz: int) -> tuple[list[str], int, bool, IPVSTable, Layout] | None:
    """The last parse with the records that changed since replaced; None if it cannot be.

    A Service or an endpoint changes one record or a few, somewhere in the text:
    the records before and after the change are the last parse's, so only the
    middle is parsed and only the middle's entries are replaced (the rest of the
    layout is shifted, not rebuilt). Anything unusual (garbage, a header, a record
    printed twice) gives None, and the whole text is parsed record by record.
    """
    old = last.records
    same = list(map(str.__eq__, old, records))  # C-level: one comparison per record
    head = same.index(False) if False in same else len(same)
    same = list(map(str.__eq__, reversed(old), reversed(records)))
    tail = same.index(False) if False in same else len(same)
    tail = min(tail, len(old) - head, len(records) - head)
    if head < last.lead:
        return None
    old_middle = old[head:len(old) - tail]
    new_middle = records[head:len(records) - tail]
    previous = _RECORD_CACHES.get(hz)
    if previous is None:
        return None
    try:
        added = [_known_or_parsed(previous, record, hz) for record in new_middle]
    except (ValueError, IndexError, KeyError):
        return None  # garbage: the full parse says what to drop
    skeleton = last.skeleton
    gone = {previous[record][0].key for record in old_middle}
    new_keys = [vs.key for vs, _ in added]
    if len(set(new_keys)) != len(new_keys) or any(k in skeleton and k not in gone for k in new_keys):
        return None  # a record printed twice: the full parse says which counts
    table = skeleton.copy()
    jiffies_by_key = dict(skeleton.persistent_jiffies)
    for key in gone.difference(new_keys):
        del table[key]
        jiffies_by_key.pop(key, None)
    for vs, jiffies in added:
        table[vs.key] = vs
        if jiffies is None:
            jiffies_by_key.pop(vs.key, None)
        else:
            jiffies_by_key[vs.key] = jiffies
    table.persistent_jiffies = jiffies_by_key
    current = dict(previous)
    for record in old_middle:
        del current[record]
    current.update(zip(new_middle, added))
    _RECORD_CACHES[hz] = current

    # The layout: entries [start, stop) of the last one make way for the middle's.
    layout = last.layout
    start, stop = head - last.lead, len(old) - tail - last.lead
    line_no = layout.first_lines[start] if start < len(layout.keys) else layout.lines
    counter = layout.starts[start]
    first_lines, starts = [], []
    for vs, _ in added:
        first_lines.append(line_no)
        starts.append(counter)
        counter += len(vs.real_servers)
        line_no += 1 + len(vs.real_servers)
    old_end = layout.first_lines[stop] if stop < len(layout.keys) else layout.lines
    line_shift = line_no - old_end
    counter_shift = counter - layout.starts[stop]
    if not line_shift and not counter_shift and new_keys == layout.keys[start:stop] \
            and starts == layout.starts[start:stop] and first_lines == layout.first_lines[start:stop]:
        # The same virtual servers on the same lines (a weight changed, say): same layout.
        table._layout = layout
        return records, last.lead, True, table, layout
    table._layout = Layout.build(
        layout.keys[:start] + new_keys + layout.keys[stop:],
        layout.first_lines[:start] + first_lines + list(map(line_shift.__add__, layout.first_lines[stop:])),
        layout.starts[:start] + starts + list(map(counter_shift.__add__, layout.starts[stop:])),
        None, layout.lines + line_shift)
    return records, last.lead, True, table, table._layout


def _known_or_parsed(previous: dict[str, tuple[VirtualServer, int | None]], record: str,
                     hz: int) -> tuple[VirtualServer, int | None]:
    """The last parse's virtual server for this record, or a new parse (raises as ``_record``)."""
    cached = previous.get(record)
    return cached if cached is not None else _record(record, hz)


def _drop_bad_counters(table: IPVSTable, lines: list[str], layout: Layout) -> IPVSTable:
    """The slow way: counters virtual server by virtual server, dropping bad ones."""
    active: list[int] = []
    inactive: list[int] = []
    keys: list[VirtualServerKey] = []
    starts: list[int] = []
    table.persistent_jiffies = dict(table.persistent_jiffies)
    for place, key in enumerate(layout.keys):
        numbers = layout.counter_lines[layout.starts[place]:layout.starts[place + 1]]
        try:
            got = [_two_counters(lines[n]) for n in numbers]
        except ValueError:
            bad = next(n for n in numbers if not _reads_as_counters(lines[n]))
            if table.first_unread_index is None or bad < table.first_unread_index:
                table.first_unread_index = bad
            del table[key]
            table.persistent_jiffies.pop(key, None)
            table.skipped_lines += len(numbers) + 1
            continue
        keys.append(key)
        starts.append(len(active))
        active += [a for a, _ in got]
        inactive += [i for _, i in got]
    starts.append(len(active))
    table._layout = Layout.build(keys, [], starts, [], layout.lines)
    table._active, table._inactive = active, inactive
    return table


def _two_counters(line: str) -> tuple[int, int]:
    """(active, inactive) of one real-server line, read as every other path reads them."""
    fields = line[_counter_start(line):].encode("ascii").split()
    if len(fields) != 2:
        raise ValueError(line)
    return _NUMBERS[fields[0]], _NUMBERS[fields[1]]


def _reads_as_counters(line: str) -> bool:
    try:
        _two_counters(line)
    except ValueError:
        return False
    return True


def _record(record: str, hz: int) -> tuple[VirtualServer, int | None]:
    """One virtual server's record, counters cut. Raises ValueError/IndexError/KeyError if any line is bad."""
    lines = record.split("\n")
    service_line = lines[0]
    service_cache = _SERVICE_CACHES.setdefault(hz, {})
    parsed = service_cache.get(service_line)
    if parsed is None:
        parsed = _service(service_line.split(), hz)
        if len(service_cache) >= _CACHE_LIMIT:
            service_cache.clear()
        service_cache[service_line] = parsed
    key, scheduler, timeout, netmask, flags, jiffies = parsed
    reals = {}
    endpoint_cache = _ENDPOINT_CACHE
    new_tuple = _new_tuple  # tuple.__new__: a NamedTuple without its Python-level __new__
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != 4 or parts[0] != "->":
            raise ValueError(line)
        token = parts[1]
        ep = endpoint_cache.get(token) or _endpoint(token)
        if ep in reals:
            raise ValueError(line)  # the kernel never lists a real server twice
        reals[ep] = new_tuple(RealServer, (ep[0], ep[1], int(parts[3]), parts[2]))
    return new_tuple(VirtualServer, (key, scheduler, timeout, reals, None, flags, netmask)), jiffies


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


def with_hz(table: IPVSTable, hz: int) -> IPVSTable:
    """Redo the jiffies->seconds conversion of a parsed table with the right HZ."""
    if hz == table.hz:
        return table
    for key, jiffies in table.persistent_jiffies.items():
        table[key] = table[key]._replace(persistent_timeout=jiffies // hz)
    table.hz = hz
    return table


# --- the kernel's HZ ---------------------------------------------------------

_hz_lock = threading.Lock()
_hz_known: int | None = None


def kernel_hz() -> int:
    """This machine's CONFIG_HZ from the kernel config, else FALLBACK_HZ.

    Exact only when the config is readable; ``LiveTable`` does better from netlink.
    """
    global _hz_known
    with _hz_lock:
        if _hz_known is None:
            _hz_known = _hz_from_config() or FALLBACK_HZ
        return _hz_known


def _hz_from_config() -> int | None:
    sources = [("/proc/config.gz", gzip.open), (f"/boot/config-{os.uname().release}", open)]
    for path, opener in sources:
        try:
            with opener(path, "rt") as fh:
                for line in fh:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except (OSError, ValueError):
            continue
    return None


# --- netlink (generic netlink family "IPVS") -----------------------------------

_NETLINK_GENERIC = 16
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3

_IPVS_CMD_GET_SERVICE = 4
_IPVS_CMD_GET_DEST = 8
_IPVS_CMD_ATTR_SERVICE = 1
_SVC_AF, _SVC_PROTOCOL, _SVC_ADDR, _SVC_PORT, _SVC_FWMARK = 1, 2, 3, 4, 5
_SVC_SCHED_NAME, _SVC_FLAGS, _SVC_TIMEOUT, _SVC_NETMASK = 6, 7, 8, 9
_DEST_ADDR, _DEST_PORT, _DEST_FWD_METHOD, _DEST_WEIGHT = 1, 2, 3, 4
_DEST_ADDR_FAMILY = 11

_IP_VS_SVC_F_PERSISTENT = 0x1
_IP_VS_SVC_F_ONEPACKET = 0x4
_SCHED_FLAG_BITS = (0x8, 0x10, 0x20)
# ipvsadm's names for the three scheduler flags, by scheduler.
_SCHED_FLAG_NAMES = {
    "sh": ("sh-fallback", "sh-port", "flag-3"),
    "mh": ("mh-fallback", "mh-port", "flag-3"),
}
_FORWARD_NAMES = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route", 4: "Bypass"}
_PROTOCOL_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
_PROTOCOL_NAMES = {v: k for k, v in _PROTOCOL_NUMBERS.items()}


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    out = {}
    end = len(data)
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def scheduler_flag_names(scheduler: str, flags: int) -> tuple[str, ...]:
    names = _SCHED_FLAG_NAMES.get(scheduler, ("flag-1", "flag-2", "flag-3"))
    out = tuple(name for bit, name in zip(_SCHED_FLAG_BITS, names) if flags & bit)
    if flags & _IP_VS_SVC_F_ONEPACKET:
        out = ("ops",) + out
    return out


class IPVSNetlink:
    """A small generic-netlink client for the IPVS family: reads only, never writes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self.seq = 0
        try:
            reply = self._request(_GENL_ID_CTRL, _CTRL_CMD_GETFAMILY,
                                  _attr(_CTRL_ATTR_FAMILY_NAME, b"IPVS\0"), dump=False)
        except OSError as err:
            self.close()
            if err.errno == errno.ENOENT:
                raise IPVSUnavailable("ip_vs module not loaded (no IPVS netlink family)") from None
            raise
        self.family = struct.unpack("=H", _attrs(reply[0])[_CTRL_ATTR_FAMILY_ID][:2])[0]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "IPVSNetlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, family: int, cmd: int, payload: bytes, dump: bool) -> list[bytes]:
        """Send one request; return the attribute area of each reply message."""
        self.seq += 1
        flags = _NLM_F_REQUEST | (_NLM_F_DUMP if dump else _NLM_F_ACK)
        body = struct.pack("=BBH", cmd, 1, 0) + payload
        self.sock.send(struct.pack("=IHHII", 16 + len(body), family, flags, self.seq, 0) + body)
        out = []
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    raise OSError(errno.EPROTO, "bad netlink message")
                if seq == self.seq:
                    if kind == _NLMSG_DONE:
                        return out
                    if kind == _NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, offset + 16)[0]
                        if code:
                            raise OSError(-code, os.strerror(-code))
                        return out  # the ACK of a non-dump request
                    out.append(data[offset + 20:offset + length])  # after nlmsghdr + genlmsghdr
                offset += (length + 3) & ~3

    def _service_key_attrs(self, key: VirtualServerKey, af: int | None = None) -> bytes:
        if key.fwmark is not None:
            # A fwmark service is looked up by (family, mark).
            inner = _attr(_SVC_AF, struct.pack("=H", af or socket.AF_INET)) + \
                _attr(_SVC_FWMARK, struct.pack("=I", key.fwmark))
        else:
            ipv6 = ":" in key.address
            af = socket.AF_INET6 if ipv6 else socket.AF_INET
            raw = socket.inet_pton(af, key.address)
            inner = (_attr(_SVC_AF, struct.pack("=H", af))
                     + _attr(_SVC_PROTOCOL, struct.pack("=H", _PROTOCOL_NUMBERS[key.protocol]))
                     + _attr(_SVC_ADDR, raw.ljust(16, b"\0"))
                     + _attr(_SVC_PORT, struct.pack("!H", key.port)))
        return _attr(_IPVS_CMD_ATTR_SERVICE, inner)

    def get_service(self, key: VirtualServerKey) -> dict[int, bytes] | None:
        """The raw service attributes of one virtual server, or None when absent."""
        families = (socket.AF_INET, socket.AF_INET6) if key.fwmark is not None else (None,)
        for af in families:
            try:
                replies = self._request(self.family, _IPVS_CMD_GET_SERVICE,
                                        self._service_key_attrs(key, af), dump=False)
            except OSError as err:
                if err.errno in (errno.ESRCH, errno.ENOENT):
                    continue
                raise
            if replies:
                return _attrs(_attrs(replies[0]).get(_IPVS_CMD_ATTR_SERVICE, b""))
        return None

    def dump_services(self) -> list[dict[int, bytes]]:
        return [_attrs(_attrs(r).get(_IPVS_CMD_ATTR_SERVICE, b""))
                for r in self._request(self.family, _IPVS_CMD_GET_SERVICE, b"", dump=True)]

    def dump_dests(self, key: VirtualServerKey, af: int | None = None) -> list[dict[int, bytes]]:
        replies = self._request(self.family, _IPVS_CMD_GET_DEST,
                                self._service_key_attrs(key, af), dump=True)
        return [_attrs(_attrs(r).get(2, b"")) for r in replies]  # IPVS_CMD_ATTR_DEST

    def read_virtual_server(self, key: VirtualServerKey) -> VirtualServer | None:
        svc = self.get_service(key)
        if svc is None:
            return None
        af = struct.unpack("=H", svc[_SVC_AF][:2])[0]
        try:
            dests = self.dump_dests(key, af)
        except OSError as err:
            if err.errno in (errno.ESRCH, errno.ENOENT):
                return None  # deleted between the two requests
            raise
        return _virtual_server_from_attrs(key, svc, dests)


def _address(af: int, raw: bytes) -> str:
    if af == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[:16])
    return socket.inet_ntoa(raw[:4])


def _virtual_server_from_attrs(key: VirtualServerKey, svc: dict[int, bytes],
                               dests: list[dict[int, bytes]]) -> VirtualServer:
    af = struct.unpack("=H", svc[_SVC_AF][:2])[0]
    scheduler = svc[_SVC_SCHED_NAME].rstrip(b"\0").decode()
    flags = struct.unpack("=I", svc[_SVC_FLAGS][:4])[0] if _SVC_FLAGS in svc else 0
    timeout = netmask = None
    if flags & _IP_VS_SVC_F_PERSISTENT:
        timeout = struct.unpack("=I", svc[_SVC_TIMEOUT][:4])[0]
        raw_mask = svc.get(_SVC_NETMASK, b"\xff\xff\xff\xff")[:4]
        if af == socket.AF_INET6:
            netmask = str(struct.unpack("=I", raw_mask)[0])
        else:
            netmask = socket.inet_ntoa(raw_mask)
    reals = {}
    for d in dests:
        d_af = struct.unpack("=H", d[_DEST_ADDR_FAMILY][:2])[0] if _DEST_ADDR_FAMILY in d else af
        address = _address(d_af, d[_DEST_ADDR])
        port = struct.unpack("!H", d[_DEST_PORT][:2])[0]
        fwd = struct.unpack("=I", d[_DEST_FWD_METHOD][:4])[0] & 0x7
        reals[(address, port)] = RealServer(
            address, port,
            struct.unpack("=i", d[_DEST_WEIGHT][:4])[0],
            _FORWARD_NAMES.get(fwd, str(fwd)))
    return VirtualServer(key, scheduler, timeout, reals, None,
                         scheduler_flag_names(scheduler, flags), netmask)


def read_virtual_server(key: VirtualServerKey) -> VirtualServer | None:
    """One virtual server and its real servers over netlink (two requests), or None.

    For following one service closely (programming latency) without reading the
    whole table. Raises IPVSUnavailable when ip_vs is not loaded.
    """
    with IPVSNetlink() as nl:
        return nl.read_virtual_server(key)


def dump_service_flags() -> dict[VirtualServerKey, tuple[tuple[str, ...], int | None]]:
    """Every service's (flags as ipvsadm names them, persistence timeout in seconds).

    One netlink dump of services only (no real servers): what /proc does not print.
    """
    out = {}
    with IPVSNetlink() as nl:
        for svc in nl.dump_services():
            af = struct.unpack("=H", svc[_SVC_AF][:2])[0]
            if _SVC_FWMARK in svc and struct.unpack("=I", svc[_SVC_FWMARK][:4])[0]:
                key = VirtualServerKey.for_fwmark(struct.unpack("=I", svc[_SVC_FWMARK][:4])[0])
            else:
                proto = _PROTOCOL_NAMES.get(struct.unpack("=H", svc[_SVC_PROTOCOL][:2])[0], "?")
                key = VirtualServerKey(proto, _address(af, svc[_SVC_ADDR]),
                                       struct.unpack("!H", svc[_SVC_PORT][:2])[0])
            scheduler = svc[_SVC_SCHED_NAME].rstrip(b"\0").decode()
            flags = struct.unpack("=I", svc[_SVC_FLAGS][:4])[0]
            timeout = (struct.unpack("=I", svc[_SVC_TIMEOUT][:4])[0]
                       if flags & _IP_VS_SVC_F_PERSISTENT else None)
            out[key] = (scheduler_flag_names(scheduler, flags), timeout)
    return out


def merge_service_flags(table: IPVSTable,
                        flags_by_key: dict[VirtualServerKey, tuple[tuple[str, ...], int | None]]) -> IPVSTable:
    """Put netlink's flags and exact timeouts into a table parsed from /proc."""
    for key, (flags, timeout) in flags_by_key.items():
        vs = table.get(key)
        if vs is not None and (vs.flags != flags or vs.persistent_timeout != timeout):
            table[key] = vs._replace(flags=flags, persistent_timeout=timeout)
    return table


# --- one read per scrape, shared by collectors ---------------------------------

class LiveTable:
    """The live table, read at most once per ``max_age`` however many ask.

    Collectors share one instance: ``ctx.service("ipvs-table", lambda: LiveTable(ctx.paths))``.
    ``get()`` raises IPVSUnavailable when ip_vs is not loaded. The returned table
    is shared: treat it as read-only.
    """

    def __init__(self, paths: Paths = Paths(), scheduler_flags: bool = False) -> None:
        self.paths = paths
        # Also one netlink dump of the services (no real servers) for the scheduler
        # flags /proc does not print. Off by default: it costs more than the /proc read
        # (see bench/bench_ipvs.py), and the proxies' default rules use no such flag.
        self.scheduler_flags = scheduler_flags and paths.procfs == "/proc"
        self._lock = threading.Lock()
        self._table: IPVSTable | None = None
        self._read_at = 0.0
        self._hz: int | None = None  # exact, once learned from netlink
        self.read_seconds = 0.0  # how long the last real read took

    def get(self, max_age: float = 1.0) -> IPVSTable:
        with self._lock:
            now = time.monotonic()
            if self._table is not None and now - self._read_at <= max_age:
                return self._table
            start = time.perf_counter()
            table = read_ip_vs(self.paths, self._hz or kernel_hz())
            if self._hz is None and table.persistent_jiffies:
                self._hz = self._learn_hz(table)
                if self._hz:
                    table = with_hz(table, self._hz)
            if self.scheduler_flags:
                merge_service_flags(table, dump_service_flags())
            self.read_seconds = time.perf_counter() - start
            self._table = table
            self._read_at = time.monotonic()
            return table

    def _learn_hz(self, table: IPVSTable) -> int | None:
        """HZ = jiffies in /proc / seconds over netlink, for one persistent service."""
        if self.paths.procfs != "/proc":
            return None  # a fixture tree: its netlink would be ours, not its
        for key, jiffies in table.persistent_jiffies.items():
            try:
                vs = read_virtual_server(key)
            except (IPVSUnavailable, OSError):
                return None
            if vs is not None and vs.persistent_timeout:
                return round(jiffies / vs.persistent_timeout)
        return None
