"""kube-proxy's rules in the iptables-legacy backend (x_tables, ``ip_tables`` / ``ip6_tables``).

Legacy rules live in the kernel's x_tables blobs, which a getsockopt dumps
whole: ``ipt_entry`` records whose matches and targets are each extension's C
struct, the same structs iptables-nft hands nf_tables as compat expressions. So:

- the change signal is ``IPT_SO_GET_INFO`` / ``IP6T_SO_GET_INFO`` (SOL_IP /
  SOL_IPV6, option 64): a table's entry count and blob size, answered in
  microseconds. It is asked on a UDP socket: the kernel serves these options on
  any inet socket and checks CAP_NET_ADMIN only, whereas the raw socket iptables
  uses would need CAP_NET_RAW as well. Without CAP_NET_ADMIN the answer is EPERM.
- Only tables the kernel lists in ``/proc/thread-self/net/ip_tables_names``
  (``ip6_tables_names``) are asked about: asking for a table that does not exist
  yet makes the kernel create it, empty, in this network namespace, and then
  iptables-nft warns "iptables-legacy tables present" on every listing. The
  exporter never writes to the dataplane, and creating a table would be one.
  (thread-self, not self: the reader may run in a thread that joined another
  network namespace, and /proc/self/net is the thread group leader's.)
- the rules are read in this process from the same kernel: ``IPT_SO_GET_ENTRIES``
  (``IP6T_SO_GET_ENTRIES``, option 65) copies a table's whole x_tables blob into
  one buffer, and ``exporter.readers.iptables_blob`` decodes its ``ipt_entry``
  records into the ``IptablesRuleset`` shapes every source fills (no child, no
  iptables binary, no raw socket: CAP_NET_ADMIN alone). The blob is freed as soon
  as it is decoded (``lazy``: once the caller drops the chains it decoded one by
  one); what the source keeps is a memo of the shapes that repeat, by their bytes
  (``BlobMemo``), which a re-read does not decode again.
- A change can keep a table's count and size (one endpoint's address swapped
  for another), so the rules are also read every ``reread_interval`` seconds
  even when the signal did not move; otherwise the last read is reused and the
  tables are not fetched.

Every failure is ``LegacyReadError`` with one line that says what to do.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from typing import NamedTuple

from exporter.paths import Paths
from exporter.readers.iptables_blob import BlobError, BlobMemo, LazyChains, decode_table, rules_digest
from exporter.readers.iptables_rules import IptablesRuleset

SOL_IPV6 = 41  # socket.SOL_IPV6 is missing from Python's socket module
SO_GET_INFO = 64  # IPT_SO_GET_INFO and IP6T_SO_GET_INFO (linux/netfilter_ipv4/ip_tables.h)
SO_GET_ENTRIES = 65  # IPT_SO_GET_ENTRIES / IP6T_SO_GET_ENTRIES
TABLE_NAME_LEN = 32  # XT_TABLE_MAXNAMELEN
NF_HOOKS = 5
# struct ipt_getinfo / ip6t_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size.
_GETINFO = struct.Struct(f"={TABLE_NAME_LEN}sI{NF_HOOKS}I{NF_HOOKS}III")
# struct ipt_get_entries: name[32], size, then the entries, which hold u64 counters: the
# header is padded to 8 bytes, and the kernel wants exactly sizeof(header) + size.
_GET_ENTRIES_HEAD = struct.Struct(f"={TABLE_NAME_LEN}sI4x")
# A user chain starts with an entry whose target is ERROR with the chain's name as its data
# (struct xt_error_target: xt_entry_target header {u16 size, char name[29], u8 rev}, errorname[32]).
_ERROR_TARGET = struct.Struct("=H29sB32s")

TABLES = ("nat", "filter")  # kube-proxy writes only these two
FAMILIES = (4, 6)
NAMES_FILES = {4: "ip_tables_names", 6: "ip6_tables_names"}
SERVICES_CHAIN = "KUBE-SERVICES"
FETCH_TRIES = 3  # a table replaced between its info and its entries is fetched again

# Why 30 s: a change that keeps entry count and blob size (an endpoint's address replaced
# by one of the same length) moves no signal, so the rules are read again on this clock.
# In-process, a re-read of 10,000 Services' tables with the source's memos and chain
# templates (and the resolve) costs about 0.8 s (2.7% of a core at this rate; see
# bench/bench_iptables_legacy.py), less than the children's old once-a-minute run did per
# minute, so half a minute (a scrape or two) halves how long such drift can hide;
# reading on every scrape would spend that CPU all the time for a rare case.
REREAD_SECONDS = 30.0
# A re-read is due a little before its interval ends: reads begin at scrape times, and a
# scrape 30 s after the last read's start, a few milliseconds early, found it not due and
# the tables then waited a whole scrape interval more (every 45 s at 15 s scrapes).
REREAD_SLACK = 0.05

_libc = ctypes.CDLL(None, use_errno=True)


class LegacyReadError(Exception):
    """The legacy rules could not be read; the message is one line."""


class LegacyBlobError(LegacyReadError):
    """A table's blob this reader does not understand: the same bytes fail the same way."""


class TableInfo(NamedTuple):
    """What ``IPT_SO_GET_INFO`` says of one table: a change of either number is a change of rules."""

    family: int
    table: str
    entries: int
    size: int


def _getsockopt(sock: socket.socket, level: int, option: int, request: bytes, size: int) -> bytearray:
    """getsockopt(2) whose buffer carries a request in (the table's name): Python's own
    ``socket.getsockopt`` sends no bytes in, hence ctypes. The buffer is a bytearray the
    kernel writes into directly: a table's blob (60 MB at 10,000 Services) is held once,
    never copied."""
    buf = bytearray(size)
    buf[:len(request)] = request
    length = ctypes.c_uint32(size)
    view = (ctypes.c_char * size).from_buffer(buf)
    try:
        if _libc.getsockopt(sock.fileno(), level, option, view, ctypes.byref(length)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        del view  # a bytearray with an exported buffer cannot be resized or freed early
    del buf[length.value:]
    return buf


def _socket(family: int) -> socket.socket:
    return socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)


def _level(family: int) -> int:
    return socket.SOL_IP if family == 4 else SOL_IPV6


def _why(err: OSError, family: int, table: str) -> str:
    what = f"{'ip' if family == 4 else 'ip6'}_tables table {table}"
    if err.errno == errno.EPERM:
        return f"{what}: permission denied (the x_tables getsockopts need CAP_NET_ADMIN)"
    if err.errno in (errno.ENOPROTOOPT, errno.ENOENT):
        return f"{what}: not in the kernel ({'ip' if family == 4 else 'ip6'}_tables module not loaded)"
    if err.errno == errno.EAGAIN:
        return f"{what}: it kept changing while being read"
    return f"{what}: {err.strerror or err}"


class TableBlob(NamedTuple):
    """One table as the kernel handed it over: its info and the buffer holding its entries."""

    info: TableInfo
    hooks: dict[int, int]  # hook number -> offset of the built-in chain's first entry
    underflows: dict[int, int]  # hook number -> offset of the built-in chain's policy
    buffer: bytearray  # struct ipt_get_entries: a header, then ``info.size`` bytes of entries


def _info(sock: socket.socket, family: int, table: str) -> tuple:
    return _GETINFO.unpack(_getsockopt(sock, _level(family), SO_GET_INFO, table.encode(), _GETINFO.size))


def table_info(sock: socket.socket, family: int, table: str) -> TableInfo:
    fields = _info(sock, family, table)
    return TableInfo(family, table, fields[-2], fields[-1])


def fetch_table(sock: socket.socket, family: int, table: str, tries: int = FETCH_TRIES) -> TableBlob:
    """The table's info and whole blob, from one version of the table: the info is asked
    before and after, and the copy taken again if the table was replaced in between
    (the kernel itself refuses a copy whose size moved: EAGAIN)."""
    for _ in range(tries):
        fields = _info(sock, family, table)
        size = fields[-1]
        request = _GET_ENTRIES_HEAD.pack(table.encode(), size)
        try:
            buffer = _getsockopt(sock, _level(family), SO_GET_ENTRIES, request, _GET_ENTRIES_HEAD.size + size)
        except OSError as err:
            if err.errno == errno.EAGAIN:
                continue
            raise
        if _info(sock, family, table) != fields:
            continue
        valid = fields[1]
        hooks = {h: fields[2 + h] for h in range(NF_HOOKS) if valid & (1 << h)}
        underflows = {h: fields[2 + NF_HOOKS + h] for h in range(NF_HOOKS) if valid & (1 << h)}
        return TableBlob(TableInfo(family, table, fields[-2], size), hooks, underflows, buffer)
    raise OSError(errno.EAGAIN, "the table kept changing while being read")


def has_chain(sock: socket.socket, family: int, table: str, chain: str, tries: int = 3) -> bool:
    """Whether ``table`` holds a user chain named ``chain``, from the kernel's blob itself
    (``IPT_SO_GET_ENTRIES``, no child). A user chain's head is an ERROR target carrying its
    name: one byte search for that target finds it without decoding any entry."""
    wanted = _ERROR_TARGET.pack(_ERROR_TARGET.size, b"ERROR", 0, chain.encode())
    for _ in range(tries):
        info = table_info(sock, family, table)
        request = _GET_ENTRIES_HEAD.pack(table.encode(), info.size)
        try:
            blob = _getsockopt(sock, _level(family), SO_GET_ENTRIES, request, _GET_ENTRIES_HEAD.size + info.size)
        except OSError as err:
            if err.errno == errno.EAGAIN:  # the table changed between the two calls (its size moved)
                continue
            raise
        return blob.find(wanted, _GET_ENTRIES_HEAD.size) >= 0
    raise OSError(errno.EAGAIN, "the table kept changing while being read")


class IptablesLegacySource:
    """The iptables-legacy rules of the calling thread's network namespace.

    ``present()`` says whether kube-proxy's rules are here; ``change_signal()`` is the
    cheap check; ``read()`` returns the rules, reusing the last ones when the signal did
    not move and ``reread_interval`` has not passed (no table is fetched then). The object
    owns what it keeps between reads: one ``BlobMemo`` per table, and the last rules
    when ``keep``.

    ``lazy``: each table comes as ``LazyChains`` over its blob, a chain decoded only when
    asked for (the blob is held until the rules are dropped; a chain's bytes that turn out
    not to decode raise ``LegacyReadError`` then). For a caller that resolves the rules at
    once and drops them (``IptablesDataplane``): the decoded rules of a table never all
    live at once.
    """

    def __init__(self, paths: Paths | None = None, reread_interval: float = REREAD_SECONDS,
                 clock=time.monotonic, keep: bool = True, lazy: bool = False) -> None:
        self.paths = paths or Paths()
        self.reread_interval = reread_interval
        self.clock = clock
        self._lock = threading.Lock()
        # keep=False: the rules are not kept between reads (a caller that keeps what it made
        # of them asks ``due()`` first).
        self.keep = keep
        self.lazy = lazy
        self._last: list[IptablesRuleset] | None = None
        self._last_signal: tuple[TableInfo, ...] | None = None  # of the last read, kept or not
        self._last_at = float("-inf")
        self._present: tuple[tuple[TableInfo, ...], bool] | None = None  # (signal, answer)
        self._memos: dict[tuple[int, str], BlobMemo] = {}  # (family, table) -> decoded shapes
        self._digests: dict[tuple[int, str], bytes] = {}  # (family, table) -> rules_digest of the last read
        self.reread = False  # the last read() fetched and decoded the tables
        self._read_memos: list[BlobMemo] = []  # the memos of the tables the last read fetched
        self.blob_bytes = 0  # the largest table blob the last read held at once

    @property
    def decoded(self) -> int:
        """Repeated shapes the last read decoded anew (the rest came from the memos); with
        ``lazy``, so far: a table's chains are decoded when asked for."""
        return sum(memo.decoded for memo in self._read_memos)

    # -- the kernel's own answers -----------------------------------------------------

    def table_names(self, family: int) -> frozenset[str] | None:
        """The tables this network namespace has in that family; None when the kernel has no
        ip_tables (ip6_tables) at all."""
        path = self.paths.proc("thread-self", "net", NAMES_FILES[family])
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                return frozenset(line.strip() for line in fh if line.strip())
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LegacyReadError(f"{path}: {err.strerror or err}") from None

    def change_signal(self) -> tuple[TableInfo, ...]:
        """Entry count and size of every nat and filter table there is, both families.
        Empty when there is none (no legacy rules at all)."""
        out = []
        for family in FAMILIES:
            names = self.table_names(family)
            tables = [t for t in TABLES if names and t in names]
            if not tables:
                continue
            with _socket(family) as sock:
                for table in tables:
                    try:
                        out.append(table_info(sock, family, table))
                    except OSError as err:
                        if err.errno == errno.ENOENT:
                            continue  # deleted since listed (the module unloaded)
                        raise LegacyReadError(_why(err, family, table)) from None
        return tuple(out)

    def present(self) -> bool:
        """A legacy nat table (either family) holds kube-proxy's KUBE-SERVICES chain.
        From the last read when its rules are the kernel's current ones, else from the
        kernel's blob (a copy of the whole table into this process for a moment: only
        when the signal moved since the last answer)."""
        signal_now = self.change_signal()
        with self._lock:
            if self._present is not None and self._present[0] == signal_now:
                return self._present[1]
        found = False
        for info in signal_now:
            if info.table != "nat":
                continue
            with _socket(info.family) as sock:
                try:
                    found = has_chain(sock, info.family, "nat", SERVICES_CHAIN)
                except OSError as err:
                    if err.errno == errno.ENOENT:
                        continue
                    raise LegacyReadError(_why(err, info.family, "nat")) from None
            if found:
                break
        with self._lock:
            self._present = (signal_now, found)
        return found

    # -- the rules --------------------------------------------------------------------------

    def due(self, within: float | None = None) -> bool:
        """Whether ``read()`` would fetch the tables: never read, the signal moved, or
        ``reread_interval`` passed since the last read began (``within`` seconds, when
        shorter: a caller following a change)."""
        with self._lock:
            return self._due(self.change_signal(), within)

    def _due(self, signal_now: tuple[TableInfo, ...], within: float | None = None) -> bool:
        interval = self.reread_interval if within is None else min(within, self.reread_interval)
        return (self._last_signal is None or signal_now != self._last_signal
                or self.clock() - self._last_at >= interval * (1 - REREAD_SLACK))

    def read(self, known=None, unchanged_ok: bool = False, within: float | None = None
             ) -> list[IptablesRuleset] | None:
        """Every family's nat and filter rules (a family without legacy tables is left out).
        ``known`` is accepted for the nft source's interface and not used.

        ``unchanged_ok``: the caller keeps what it made of the last read; on a re-read the
        clock asked for (the signal did not move), None when every table holds the rules
        it held then, counters aside (``rules_digest``): no chain decoded, nothing resolved
        again (at 10,000 Services a whole re-read every 30 s cost 0.8 s of CPU and left
        ~10 MB more resident after a few). ``within``: as ``due()``'s."""
        with self._lock:
            signal_now = self.change_signal()
            if self._last is not None and not self._due(signal_now, within):
                self.reread = False
                return self._last
            periodic = unchanged_ok and self._digests and signal_now == self._last_signal
            started = self.clock()  # the clock counts from when the tables were fetched
            rulesets, signal_now = self._read_all(signal_now, periodic)
            if rulesets is None:
                self._last_at = started
                self.reread = False
                return None
            self._last = rulesets if self.keep else None
            self._last_signal, self._last_at = signal_now, started
            # Presence comes free with the rules: no second copy of the table's blob for it.
            self._present = (signal_now, any(SERVICES_CHAIN in r.tables.get("nat", {}) for r in rulesets))
            self.reread = True
            return rulesets

    def _read_all(self, listed: tuple[TableInfo, ...], periodic: bool = False
                  ) -> tuple[list[IptablesRuleset] | None, tuple[TableInfo, ...]]:
        """Each listed table fetched and decoded (with ``lazy``, every table's blob is held by
        its chains until they are dropped). The signal returned is the tables' info as
        fetched; when the tables moved while being read (nat and filter from two moments),
        they are read once more. ``periodic``: None when every table's digest is the last
        read's (the tables fetched, none decoded)."""
        for attempt in range(2):
            fetched = []  # (family, table, blob): every table fetched before any is decoded
            for family in FAMILIES:
                wanted = [info.table for info in listed if info.family == family]
                if not wanted:
                    continue
                with _socket(family) as sock:
                    for table in wanted:
                        blob = self._fetch(sock, family, table)
                        if blob is not None:
                            fetched.append((family, table, blob))
            infos = tuple(blob.info for _, _, blob in fetched)
            after = self.change_signal()
            if after != infos and attempt == 0:
                listed = after
                continue
            digests = {}
            if periodic or not self.lazy:
                # Without decoding: a lazy read takes them from its chains' walk (below).
                for family, table, blob in fetched:
                    try:
                        digests[(family, table)] = rules_digest(blob.buffer, _GET_ENTRIES_HEAD.size,
                                                                blob.info.size, family)
                    except BlobError as err:
                        raise _not_understood(_where(family, table), err) from None
                if periodic and digests == self._digests:
                    return None, infos
            break
        self.blob_bytes = max((len(blob.buffer) for _, _, blob in fetched), default=0)
        self._read_memos = []
        out = []
        for family in FAMILIES:
            tables = {}
            for index, (at_family, table, blob) in enumerate(fetched):
                if at_family == family:
                    fetched[index] = None, None, None  # the chains hold the blob from here on, or nothing does
                    tables[table] = chains = self._decode(family, table, blob)
                    if (family, table) not in digests:
                        digests[(family, table)] = chains.digest()
                    del blob
            if tables:
                out.append(IptablesRuleset(family, tables))
        # Only once decoded: a read that failed leaves its caller nothing, so the clock's
        # next re-read must not find "the same rules" by its digests. (Lazy chains decode
        # later: a caller whose use of them failed passes unchanged_ok=False next.)
        self._digests = digests
        return out, infos

    @staticmethod
    def _fetch(sock: socket.socket, family: int, table: str) -> TableBlob | None:
        """One table's blob, or None when it went away since listed."""
        try:
            return fetch_table(sock, family, table)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return None
            raise LegacyReadError(_why(err, family, table)) from None

    def _decode(self, family: int, table: str, blob: TableBlob):
        """One table's chains (lazy: over its blob, decoded when asked for)."""
        info = blob.info
        memo = self._memos.get((family, table))
        if memo is None:
            memo = self._memos[(family, table)] = BlobMemo()
        self._read_memos.append(memo)
        memo.start_read()
        try:
            if self.lazy:
                # The memo's last shapes stay until the next read's start: the chains are
                # decoded after this call.
                return _LegacyChains(_where(family, table), blob.buffer, _GET_ENTRIES_HEAD.size, info.size,
                                     family, blob.hooks, blob.underflows, memo)
            chains = decode_table(blob.buffer, _GET_ENTRIES_HEAD.size, info.size, family, blob.hooks,
                                  blob.underflows, memo)
            memo.end_read()
        except BlobError as err:
            memo.end_read()
            raise _not_understood(_where(family, table), err) from None
        finally:
            del blob
        return chains


def _not_understood(where: str, err: BlobError) -> LegacyBlobError:
    return LegacyBlobError(f"{where}: the kernel's blob not understood: {err}")


def _where(family: int, table: str) -> str:
    return f"{'ip' if family == 4 else 'ip6'}_tables table {table}"


class _LegacyChains(LazyChains):
    """``LazyChains`` whose decoding failures say which table, as ``LegacyReadError``."""

    __slots__ = ("where",)

    def __init__(self, where: str, *args) -> None:
        super().__init__(*args)
        self.where = where

    def __getitem__(self, name: str):
        try:
            return super().__getitem__(name)
        except BlobError as err:
            raise _not_understood(self.where, err) from None
