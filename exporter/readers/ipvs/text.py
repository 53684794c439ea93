"""The text of /proc/net/ip_vs, parsed: one whole parse, pure apart from what it is given.

One record per virtual server: its service line and its real-server lines. A
line that does not parse drops its virtual server, never raises; the table
counts such lines (``skipped_lines``) and names the first (``first_unread``).
Fields are separated by any run of blanks: the kernel's fixed widths are only
the fast way to find the counters.

What may be kept between parses is handed in, never kept here: the
``Conversions`` (hex tokens, service lines, counters) and the last parse's
records; ``IncrementalParser`` owns them for a reader, ``parse_ip_vs`` makes
fresh ones for a one-shot parse.
"""

from __future__ import annotations

import gc
import re
import socket
from array import array
from itertools import accumulate
from typing import NamedTuple

from exporter.dataplane import RealServers, VirtualServer, VirtualServerKey
from exporter.readers.ipvs.netlink import kernel_hz
from exporter.readers.ipvs.table import IPVSTable, Layout

_CACHE_LIMIT = 500_000  # entries of one conversion cache before it is cleared


class _Numbers(dict):
    """Counter bytes -> int. The same values recur across real servers and reads,
    and a lookup costs a fifth of int() (measured in the emulated VM)."""

    def __missing__(self, text: bytes) -> int:
        # The kernel's "%d" only: int() alone would also take "+5", "1_000" or " 5".
        if not (text.isdigit() or text[:1] == b"-" and text[1:].isdigit()):
            raise ValueError(text)
        value = self[text] = int(text)
        return value


class Conversions:
    """Hex tokens and counter bytes already converted, for one owner.

    Conversions repeat heavily between services (the same pod address:port is a
    real server of its ClusterIP and of every NodePort entry), so each is converted
    once in a parse. Bounded: a cache is cleared when it grows too big. A one-shot
    parse makes its own; a reader keeps one from read to read, and ``after_parse``
    drops what only a whole parse reuses.
    """

    def __init__(self) -> None:
        # Hex token -> its address, the port read from the token's last four digits
        # (``ports``): no (address, port) tuple per token, which would outlive its use by
        # the whole parse and leave its memory in holes among the table's objects.
        self.endpoints: dict[str, str] = {}
        # Address text and hex port -> int: one object for each in a parse. An address
        # recurs with other ports (a node's NodePorts) and a port with other addresses
        # (every endpoint of a Deployment), and each kept copy is a string or an int per
        # real server (2.8 MiB at 68,000 of them).
        self.addresses: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.numbers = _Numbers()

    def after_parse(self) -> None:
        """Forget the hex tokens and addresses: kept between reads they cost a string
        per real server and virtual server (7 MB at 70,000 real servers), and buy
        nothing then: a re-read reuses whole records (``known_or_parsed``), and only
        the few records that changed are converted again. Counter values stay (few,
        small, and every re-read takes them all)."""
        self.endpoints = {}
        self.addresses = {}

    def endpoint(self, token: str) -> tuple[str, int]:
        """'0A000001:0050' or '[fd00:...:0001]:0050' -> ('10.0.0.1', 80). Raises ValueError."""
        address = self.endpoints.get(token)
        if address is not None:
            return address, self.ports[token[-4:]]
        host, sep, port_hex = token.rpartition(":")
        if not sep or len(port_hex) != 4:
            raise ValueError(token)
        address = _address(host, token)
        address = self.addresses.setdefault(address, address)  # keyed by itself: no other string kept
        port = self.ports.get(port_hex)
        if port is None:
            port = int(port_hex, 16)
            if not port_hex.isalnum():  # int() takes "+1F", " 1F", "1_F" too: never cached
                return address, port
            self.ports[port_hex] = port
        if len(self.endpoints) >= _CACHE_LIMIT:
            self.endpoints.clear()
            self.addresses.clear()
        self.endpoints[token] = address
        return address, port


def _address(host: str, token: str) -> str:
    """A token's hex address ('0A000001', '[fd00:...:0001]') as text. Raises ValueError."""
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(token)
        try:
            return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, host[1:-1]))
        except OSError:
            raise ValueError(token) from None
    if len(host) != 8:
        raise ValueError(token)
    return socket.inet_ntoa(bytes.fromhex(host))


_PROTOCOLS = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP"}
# ipvsadm's forward names, one object each: a string split out of every real-server
# line would be one copy per real server kept (3.6 MB at 70,000 of them).
_FORWARDS = {name: name for name in ("Masq", "Local", "Route", "Tunnel")}
_new_tuple = tuple.__new__


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


def _service(parts: list[str], hz: int,
             conv: Conversions) -> tuple[VirtualServerKey, str, int | None, str | None, tuple, int | None]:
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
        address, port = conv.endpoint(parts[1])
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
    """Parse the text of /proc/net/ip_vs into a table, from nothing. Never raises on bad lines.

    ``hz`` is the kernel's CONFIG_HZ, used to turn persistence timeouts from
    jiffies into seconds; default: this machine's (``kernel_hz()``). One-shot:
    nothing is kept for a next parse (a reader that reads again owns an
    ``IncrementalParser``).
    """
    if hz is None:
        hz = kernel_hz()
    # A parse makes thousands of tuples and no reference cycle: the cyclic collector
    # would only walk them again and again. Turned off inline, before anything is
    # allocated (a helper's arguments would give it a run inside the parse).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return parse_whole(text, hz, Conversions())[0]
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


class Shape(NamedTuple):
    """What a parse learned, for the next one (``IncrementalParser`` keeps it).

    Kept small: at 10,000 services the text is about 4 MB, and this holds one
    text-sized thing (``marked``, bytes) besides compact arrays; neither the text
    nor its records are kept.
    """

    # hash() and length of the text: the same text is the same table. (SipHash with
    # this process's random key: two texts that differ hash alike once in 2**64.)
    text_hash: int
    length: int
    lead: int  # header records before the first virtual server
    clean: bool  # every record after the headers kept, none twice, none torn
    skeleton: IPVSTable  # the table without counters: copied, never handed out
    layout: Layout
    active: list[int]
    inactive: list[int]
    # The text with the counters of every kept real server as NUL bytes: its shape,
    # position for position. None when the text does not allow it (not clean, not
    # ASCII, NULs of its own): the next read then parses the whole text.
    marked: bytes | None
    marked_counters: int  # NUL bytes in ``marked``: counter characters of the text
    # Where each record (headers first) starts in the text, then the text's length:
    # the records a change touches are found from these, not from copies of them.
    starts: array | None


class KnownRecords(NamedTuple):
    """The last parse's records by the hash of their blank text, for a whole parse to reuse.

    Parallel, in the text's order: the hash of each record and its virtual server
    (None where it did not parse). A persistence timeout's jiffies come from the
    last table's ``persistent_jiffies``. Kept instead of the records themselves (a
    few bytes per record, not the record's text). A record is matched by its 64-bit
    hash alone: at 10,000 records, two that differ collide once in about 10^11 parses.
    """

    hashes: array
    virtual_servers: list
    jiffies: dict

    def index(self) -> "_KnownIndex":
        return _KnownIndex(self)


class _KnownIndex:
    """``known_or_parsed``'s view of ``KnownRecords``: record text -> parsed, or None."""

    def __init__(self, known: KnownRecords) -> None:
        self.known = known
        self.places = dict(zip(known.hashes, range(len(known.hashes))))

    def get(self, record: str) -> tuple | None:
        place = self.places.get(hash(record))
        if place is None:
            return None
        vs = self.known.virtual_servers[place]
        if vs is None:
            return None
        if vs.persistent_timeout is None:
            return vs, None
        jiffies = self.known.jiffies.get(vs.key)
        return None if jiffies is None else (vs, jiffies)


NO_RECORDS = KnownRecords(array("q"), [], {})


# The XOR of a text with its marked shape, at counter positions: the counter
# character itself; elsewhere NUL, which is a blank here. A tab is a blank too (a
# counter field's separator); other ASCII whitespace would split a number silently,
# so it becomes "x", which fails.
_COUNTER_CHARS = bytes.maketrans(b"\0\t\n\v\f\r", b"  xxxx")
_MASK_BYTES = bytes.maketrans(b"\0" + bytes(range(1, 256)), b"\0" + b"\xff" * 255)


def with_counters(skeleton: IPVSTable, active: list[int], inactive: list[int]) -> IPVSTable:
    table = skeleton.copy()
    table._active, table._inactive = active, inactive
    table.shape = skeleton
    return table


def counter_chars(value: int, marked: bytes, marked_counters: int) -> bytes | None:
    """The text's counter characters in place, NUL elsewhere; None if its shape is not ``marked``'s.

    ``value`` is the text's bytes as one int, as long as ``marked``. One C-level XOR:
    where the marked text has a NUL, the text's own (never NUL) byte; elsewhere NUL
    if and only if the two agree. So the shape is the same exactly when the NULs
    number the text's length less the counter characters.
    """
    length = len(marked)
    chars = (value ^ int.from_bytes(marked, "little")).to_bytes(length, "little")
    return chars if chars.count(0) == length - marked_counters else None


def counters_of(chars: bytes, layout: Layout, numbers: _Numbers) -> tuple[list[int], list[int]] | None:
    """Every counter of ``counter_chars``' result; None if one is not a number."""
    return _numbers(chars.translate(_COUNTER_CHARS).split(), layout.starts[-1], numbers)


def _numbers(numbers: list, real_servers: int, cache: _Numbers) -> tuple[list[int], list[int]] | None:
    if len(numbers) != 2 * real_servers:
        return None  # not two counters per real server: not the kernel's text
    if len(cache) > _CACHE_LIMIT:
        cache.clear()
    try:
        values = list(map(cache.__getitem__, numbers))
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


def parse_whole(text: str, hz: int, conv: Conversions, known: KnownRecords = NO_RECORDS,
                text_hash: int | None = None) -> tuple[IPVSTable, Shape | None, KnownRecords]:
    """The whole text, record by record (the first read, or after anything unusual).

    ``known``: the last parse's records, reused where the same. Returns the table,
    what a next parse may start from (None when nothing may be), and this parse's
    records. ``text_hash``: ``hash(text)`` if the caller has it.
    """
    # Each text-sized temporary (the lines, the marked and blank copies, the records, the
    # ints of the counters' XOR) is dropped as soon as it is used: at 10,000 services
    # they are 4 to 9 MiB each, and together they were the first read's peak. The lines
    # are split again only on the rare paths that name or re-read one.
    lines = text.split("\n")
    torn = lines[-1]  # "" after the final newline; else a cut line, kept as cut
    marked = _marked(lines[:-1]) + "\n" + torn if len(lines) > 1 else torn
    if "\0" not in text:
        del lines
        blank = marked.replace("\0", " ")
    else:  # NULs of its own (never the kernel's): blank it apart
        blank = _marked(lines[:-1], " ") + "\n" + torn if len(lines) > 1 else torn
        del lines
    records = _RECORD_BOUNDARY.split(blank)
    del blank
    current: dict[str, VirtualServer] = {}
    parsed = _parse_shape(records, hz, conv, known.index() if known.hashes else {}, current)
    records, lead, clean, skeleton, layout = parsed
    conv.after_parse()  # the hex tokens' cache (a string per real server) is done with: not beside the XOR's ints
    # What a next whole parse may reuse: the hash of each record and its parse.
    hashes = array("q", map(hash, records))
    virtual_servers = list(map(current.get, records))
    del current
    marked_bytes = starts = counters = None
    marked_counters = 0
    fast = clean and text.isascii() and "\0" not in text
    if fast:
        starts = array("q", accumulate(map(len, records), lambda at, size: at + size + 1, initial=0))
    del records
    if fast:
        # Clean: every marked line is a kept real server, so the marks are its counters,
        # all taken in a few C-level passes as a re-read takes them.
        marked_bytes = marked.encode("ascii")
        del marked
        marked_counters = marked_bytes.count(0)
        chars = counter_chars(int.from_bytes(text.encode("ascii"), "little"), marked_bytes, marked_counters)
        if chars is not None:
            counters = counters_of(chars, layout, conv.numbers)
        del chars
    else:
        del marked
        lines = text.split("\n")
        counted = list(map(lines.__getitem__, layout.counter_lines))
        # All counters in one split: two numbers per line, or the text is not the kernel's.
        numbers = " ".join([line[-_COUNTERS:] if _fixed_width(line) else line[_counter_start(line):]
                            for line in counted]).encode("ascii", "replace").split()
        counters = _numbers(numbers, len(counted), conv.numbers)
        del counted, numbers
    kept = KnownRecords(hashes, virtual_servers, skeleton.persistent_jiffies)
    if counters is None:
        # A counter that is not a number (never from the kernel): drop its virtual
        # server, as for any other line that does not parse.
        lines = text.split("\n")
        table = _drop_bad_counters(skeleton.copy(), lines, layout, conv.numbers)
        return _with_first_unread(table, text), None, kept
    _with_first_unread(skeleton, text)
    # The counters are read: their line numbers (an int per real server) are not kept.
    skeleton._layout = layout = layout._replace(counter_lines=None)
    state = Shape(hash(text) if text_hash is None else text_hash, len(text), lead, clean, skeleton, layout,
                  *counters, marked_bytes, marked_counters, starts)
    return with_counters(skeleton, state.active, state.inactive), state, kept


def _with_first_unread(table: IPVSTable, text: str) -> IPVSTable:
    """Name the first line the parse could not read (index -> number and text)."""
    index = table.first_unread_index
    line = _line_at(text, index) if index is not None else None
    table.first_unread = (index + 1, line) if line is not None else None
    return table


def _line_at(text: str, index: int) -> str | None:
    """The text's line ``index`` (from 0, as ``text.split("\\n")`` numbers them), or None
    past its last; found without splitting the whole text."""
    at = 0
    for _ in range(index):
        at = text.find("\n", at) + 1
        if at == 0:
            return None
    end = text.find("\n", at)
    return text[at:] if end < 0 else text[at:end]


def _parse_shape(records: list[str], hz: int, conv: Conversions, previous: dict[str, tuple],
                 current: dict[str, VirtualServer]) -> tuple[list[str], int, bool, IPVSTable, Layout]:
    """The table of a text without counters, record by record, and its layout.

    Each record parsed is put in ``current`` (record text -> its virtual server; not the
    (virtual server, jiffies) pair, which would live through the parse and die after it).
    """
    table = IPVSTable()
    table.hz = hz
    jiffies_by_key: dict[VirtualServerKey, int] = {}
    keys: list[VirtualServerKey] = []
    first_lines: list[int] = []
    starts: list[int] = []
    counter_lines = array("q")  # an int object per real server would outlive its use as a hole

    def drop_last() -> None:
        # The record before a bad line may have lost lines to it: drop it whole.
        table.pop(keys[-1], None)
        jiffies_by_key.pop(keys[-1], None)
        del keys[-1], first_lines[-1], counter_lines[starts.pop():]

    # A record whose shape is the one of the last parse is the same virtual server:
    # reuse its parse (a dict lookup instead of a line-by-line parse). Only the last
    # parse's records are kept, so the cache never outgrows one table.
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
            cached = known_or_parsed(previous, record, hz, conv)
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
                    first_unread = line_no + _first_bad_line(lines, hz, conv)
                if kept_last:
                    drop_last()
            line_no += len(lines)
            kept_last = False
            continue
        vs, jiffies = cached
        current[record] = vs
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


def _first_bad_line(lines: list[str], hz: int, conv: Conversions) -> int:
    """Which line of a record that did not parse is the first one not understood.

    The error path only (``_record`` raises for the record as a whole): the
    service line is checked, then each real-server line as ``_record`` reads it.
    """
    try:
        _service(lines[0].split(), hz, conv)
    except (ValueError, IndexError, KeyError):
        return 0
    seen = set()
    for n, line in enumerate(lines[1:], 1):
        parts = line.split()
        try:
            if len(parts) != 4 or parts[0] != "->":
                raise ValueError(line)
            endpoint = conv.endpoint(parts[1])
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
    counter_lines = array("q")
    for place, key in enumerate(layout.keys):
        if key in table and last[key] == place:
            keys.append(key)
            first_lines.append(layout.first_lines[place])
            starts.append(len(counter_lines))
            counter_lines += layout.counter_lines[layout.starts[place]:layout.starts[place + 1]]
    starts.append(len(counter_lines))
    return Layout.build(keys, first_lines, starts, counter_lines, layout.lines)


def known_or_parsed(previous: dict[str, tuple[VirtualServer, int | None]], record: str,
                    hz: int, conv: Conversions) -> tuple[VirtualServer, int | None]:
    """The last parse's virtual server for this record, or a new parse (raises as ``_record``)."""
    cached = previous.get(record)
    return cached if cached is not None else _record(record, hz, conv)


def _drop_bad_counters(table: IPVSTable, lines: list[str], layout: Layout, cache: _Numbers) -> IPVSTable:
    """The slow way: counters virtual server by virtual server, dropping bad ones."""
    active: list[int] = []
    inactive: list[int] = []
    keys: list[VirtualServerKey] = []
    starts: list[int] = []
    table.persistent_jiffies = dict(table.persistent_jiffies)
    for place, key in enumerate(layout.keys):
        numbers = layout.counter_lines[layout.starts[place]:layout.starts[place + 1]]
        try:
            got = [_two_counters(lines[n], cache) for n in numbers]
        except ValueError:
            bad = next(n for n in numbers if not _reads_as_counters(lines[n], cache))
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


def _two_counters(line: str, cache: _Numbers) -> tuple[int, int]:
    """(active, inactive) of one real-server line, read as every other path reads them."""
    fields = line[_counter_start(line):].encode("ascii").split()
    if len(fields) != 2:
        raise ValueError(line)
    return cache[fields[0]], cache[fields[1]]


def _reads_as_counters(line: str, cache: _Numbers) -> bool:
    try:
        _two_counters(line, cache)
    except ValueError:
        return False
    return True


def _record(record: str, hz: int, conv: Conversions) -> tuple[VirtualServer, int | None]:
    """One virtual server's record, counters cut. Raises ValueError/IndexError/KeyError if any line is bad."""
    lines = record.split("\n")
    # A service line is printed once per parse: converted each time, not cached (a cache
    # kept a string and a tuple per virtual server through the parse, for no hit).
    key, scheduler, timeout, netmask, flags, jiffies = _service(lines[0].split(), hz, conv)
    # One flat RealServers per virtual server (dataplane.py says why), not a dict of tuples.
    flat: list = []
    weights: list[int] = []
    forwards: list[str] = []
    seen = set()
    endpoint_cache, ports = conv.endpoints, conv.ports
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != 4 or parts[0] != "->":
            raise ValueError(line)
        token = parts[1]
        address = endpoint_cache.get(token)
        ep = (address, ports[token[-4:]]) if address is not None else conv.endpoint(token)
        if ep in seen:
            raise ValueError(line)  # the kernel never lists a real server twice
        seen.add(ep)
        flat += ep
        weights.append(int(parts[3]))
        forward = parts[2]
        forwards.append(_FORWARDS.get(forward, forward))
    reals = RealServers.of_flat(tuple(flat), weights, forwards)
    new_tuple = _new_tuple  # tuple.__new__: a NamedTuple without its Python-level __new__
    return new_tuple(VirtualServer, (key, scheduler, timeout, reals, None, flags, netmask)), jiffies
