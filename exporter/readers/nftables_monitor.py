"""nf_tables' own change feed: the NFNLGRP_NFTABLES multicast group of this network namespace.

Every committed nf_tables transaction is announced to that group, object by object
(NEWRULE/DELRULE with the rule's table, chain and handle, NEWCHAIN/DELCHAIN,
NEWTABLE/DELTABLE, ...), and closed by one NEWGEN carrying the generation id the
commit made. A reader that opened its ``NftMonitor`` before its full dump can bring
what it keeps up to date from these messages alone, instead of dumping tens of
thousands of rules again after kube-proxy rewrote one Service.

What this module does: subscribe (with a large receive buffer: the kernel drops
messages, and says ENOBUFS once, when a listener's buffer is full), ``drain()``
whatever is queued without blocking, and hand back each complete transaction as a
``Batch`` (its generation, its events per (family, table)). The raw bytes of a
NEWRULE are kept, not decoded: decoding is the reader's. ``ChainOrder`` applies
rule events to one chain's handle order as the kernel orders them.

"resync": an overflow, or a message this module cannot parse, means the events no
longer describe the ruleset; the caller must read it whole again.

Cost: the kernel only builds these messages while someone listens, so a listener
adds work to every nf_tables commit on the node (kube-proxy's restores included),
and what waits in the buffer is kernel memory charged to the listener's memory
cgroup. A drain costs O(messages queued).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import NamedTuple

from exporter.readers.ipset import NETLINK_NETFILTER, NLMSG_DONE, NLMSG_ERROR, _NLA, _NLMSGHDR
from exporter.readers.nftables_netlink import NFNL_SUBSYS_NFTABLES

NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NLMSG_NOOP = 1
NLM_F_APPEND = 0x800
# <linux/netfilter/nf_tables.h> message types
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE = 0, 2
NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN = 3, 5
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFT_MSG_NEWGEN = 15
# attributes
NFTA_TABLE_NAME, NFTA_TABLE_HANDLE = 1, 4
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME = 1, 2, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS = 1, 2, 3, 4
NFTA_RULE_POSITION, NFTA_RULE_USERDATA = 6, 7
NFTA_GEN_ID = 1
# The kernel grants twice what is asked (32 MiB here) and charges only what waits, to the
# exporter's memory cgroup (the DaemonSet's limit is 256 MiB, and a 10,000-Service first
# read peaks near 190 MB RSS): so not more. Measured: one partial sync of kube-proxy
# queues 2.6 MB at 1,000 Services x 5, 7.9 MB at 3,000, 26 MB at 10,000 (24,000 rule
# messages): a dozen syncs between reads at 1,000, one at 10,000; past that the kernel
# drops them and the next read is a full one (counted), never a wrong one.
DEFAULT_RECEIVE_BUFFER = 16 << 20
_RECV_BUFFER = 1 << 16  # a notification datagram is at most a page or two
_RECV_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_TRUNC)  # once: an enum's | per datagram was 6,000 calls
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
# Message types this module reads; set, element, object, flowtable messages are skipped.
_TABLE_MESSAGES = {NFT_MSG_NEWTABLE: "newtable", NFT_MSG_DELTABLE: "deltable"}
_CHAIN_MESSAGES = {NFT_MSG_NEWCHAIN: "newchain", NFT_MSG_DELCHAIN: "delchain"}
_RULE_MESSAGES = {NFT_MSG_NEWRULE: "newrule", NFT_MSG_DELRULE: "delrule"}
_RULE_TYPES = frozenset((NFNL_SUBSYS_NFTABLES << 8) | command for command in _RULE_MESSAGES)


class FeedError(Exception):
    """The feed cannot be opened; one line saying why."""


class Event(NamedTuple):
    """One object change of a committed transaction.

    ``kind``: newtable, deltable, newchain, delchain, newrule, delrule. ``handle`` is
    the table's, chain's or rule's. For a NEWRULE: ``position`` (the handle of the
    rule just before it when the kernel announced it, if any), ``append`` (written
    with NLM_F_APPEND). For both rule kinds, ``body``: the message's attributes past
    table, chain, handle and position (the expressions and user data a decode depends
    on, framed: the one copy made of a message), so that a rule deleted and added again
    with the same bytes (kube-proxy's partial sync flushes and rewrites every top-level
    chain) can keep its decode; ``rule_parts`` finds the expressions and user data in
    it (only for the few rules decoded: not walked per message)."""

    kind: str
    chain: str | None
    handle: int
    position: int | None = None
    append: bool = False
    body: bytes = b""


def rule_parts(event: Event) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Where a rule event's expressions and user data sit in its ``body``: ((start, end) or
    None) each. Raises ValueError on a bad attribute length."""
    body = event.body
    exprs = udata = None
    offset, size = 0, len(body)
    while offset + 4 <= size:
        alen, atype = _NLA.unpack_from(body, offset)
        if alen < 4 or offset + alen > size:
            raise ValueError("bad attribute length")
        atype &= 0x3FFF
        if atype == NFTA_RULE_EXPRESSIONS:
            exprs = (offset + 4, offset + alen)
        elif atype == NFTA_RULE_USERDATA:
            udata = (offset + 4, offset + alen)
        offset += (alen + 3) & ~3
    return exprs, udata


class Batch(NamedTuple):
    """One committed transaction: the generation it made, its events per (nfproto, table)."""

    generation: int
    tables: dict[tuple[int, str], list[Event]]


class Drained(NamedTuple):
    batches: list[Batch]
    resync: str | None  # why the events no longer describe the ruleset, or None
    messages: int  # how many messages were read


def _string(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).split(b"\0", 1)[0].decode("utf-8", "replace")


def _attributes(buf, start: int, end: int) -> dict[int, tuple[int, int]]:
    out = {}
    while start + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, start)
        if alen < 4 or start + alen > end:
            raise ValueError("bad attribute length")
        out[atype & 0x3FFF] = (start + 4, start + alen)
        start += (alen + 3) & ~3
    return out


_new_event = tuple.__new__  # Event's fields by place, without NamedTuple's keyword __new__ (24,000 a sync)


def _rule_message(buf, start: int, end: int, command: int, flags: int, nfproto: int,
                  names: dict) -> tuple[int, str, Event]:
    """A NEWRULE/DELRULE (``buf[start:end]``: its attributes; a partial sync at 10,000
    Services announces 24,000): the kernel writes table, chain, handle and (a NEWRULE
    after another) position first (nf_tables_fill_rule_info), read in place; the rest
    copied once, as the body. Any other layout: a walk of every attribute."""
    if not isinstance(buf, bytes):
        buf, start, end = bytes(buf[start:end]), 0, end - start
    unpack = _NLA.unpack_from
    is_new = command == NFT_MSG_NEWRULE
    if start + 12 <= end:
        # The leading attributes, each checked for its type and bounds.
        tlen, ttype = unpack(buf, start)
        chain_at = start + ((tlen + 3) & ~3)
        if ttype & 0x3FFF == NFTA_RULE_TABLE and 4 <= tlen and chain_at + 4 <= end:
            clen, ctype = unpack(buf, chain_at)
            handle_at = chain_at + ((clen + 3) & ~3)
            if (ctype & 0x3FFF == NFTA_RULE_CHAIN and 4 <= clen and handle_at + 12 <= end
                    and buf.startswith(_HANDLE_HEADER, handle_at)):
                value = buf[start + 4:start + tlen]
                table = names.get(value)
                if table is None:
                    table = names[value] = value.split(b"\0", 1)[0].decode("utf-8", "replace")
                value = buf[chain_at + 4:chain_at + clen]
                chain = names.get(value)
                if chain is None:
                    chain = names[value] = value.split(b"\0", 1)[0].decode("utf-8", "replace")
                offset = handle_at + 12
                position = None
                if offset + 12 <= end and buf.startswith(_POSITION_HEADER, offset):
                    position = _BE64.unpack_from(buf, offset + 4)[0] if is_new else None
                    offset += 12
                return nfproto, table, _new_event(Event, (_RULE_MESSAGES[command], chain,
                                                          _BE64.unpack_from(buf, handle_at + 4)[0], position,
                                                          bool(flags & NLM_F_APPEND), buf[offset:end]))
    table = chain = handle = position = body_at = None
    offset = start
    while offset + 4 <= end:
        alen, atype = unpack(buf, offset)
        if alen < 4 or offset + alen > end:
            raise ValueError("bad attribute length")
        s, e, atype = offset + 4, offset + alen, atype & 0x3FFF
        if atype == NFTA_RULE_CHAIN or atype == NFTA_RULE_TABLE:
            value = buf[s:e]
            name = names.get(value)
            if name is None:
                name = names[value] = value.split(b"\0", 1)[0].decode("utf-8", "replace")
            if atype == NFTA_RULE_CHAIN:
                chain = name
            else:
                table = name
        elif atype == NFTA_RULE_HANDLE:
            handle = _BE64.unpack_from(buf, s)[0]
        elif atype == NFTA_RULE_POSITION:
            position = _BE64.unpack_from(buf, s)[0]
        elif (atype == NFTA_RULE_EXPRESSIONS or atype == NFTA_RULE_USERDATA) and body_at is None:
            body_at = offset
        offset += (alen + 3) & ~3
    if table is None or chain is None or handle is None:
        raise ValueError("a rule message without its table, chain or handle")
    return nfproto, table, _new_event(Event, (_RULE_MESSAGES[command], chain, handle, position if is_new else None,
                                              bool(flags & NLM_F_APPEND),
                                              buf[body_at:end] if body_at is not None else b""))


# A u64 handle's and position's attribute headers, as the kernel writes them.
_HANDLE_HEADER, _POSITION_HEADER = _NLA.pack(12, NFTA_RULE_HANDLE), _NLA.pack(12, NFTA_RULE_POSITION)


def parse_message(buf, start: int, end: int, msg_type: int, flags: int,
                  names: dict | None = None) -> tuple[int, str, Event] | int | None:
    """One nf_tables notification (``start``: its nfgenmsg): (nfproto, table, Event), the
    generation id of a NEWGEN, or None for a message kind the feed does not follow.
    ``names``: table and chain names already read (bytes -> str), filled here.
    Raises ValueError when it cannot be read."""
    if msg_type >> 8 != NFNL_SUBSYS_NFTABLES or end - start < 4:
        raise ValueError(f"message type {msg_type:#x}")
    nfproto = buf[start]
    command = msg_type & 0xFF
    body = start + 4
    if command == NFT_MSG_NEWGEN:
        fields = _attributes(buf, body, end)
        where = fields.get(NFTA_GEN_ID)
        if where is None or where[1] - where[0] < 4:
            raise ValueError("NEWGEN without an id")
        return _BE32.unpack_from(buf, where[0])[0]
    if command in _RULE_MESSAGES:
        return _rule_message(buf, body, end, command, flags, nfproto, names if names is not None else {})
    if command in _CHAIN_MESSAGES:
        fields = _attributes(buf, body, end)
        return nfproto, _string(buf, *fields[NFTA_CHAIN_TABLE]), Event(
            _CHAIN_MESSAGES[command], _string(buf, *fields[NFTA_CHAIN_NAME]),
            _BE64.unpack_from(buf, fields[NFTA_CHAIN_HANDLE][0])[0])
    if command in _TABLE_MESSAGES:
        fields = _attributes(buf, body, end)
        where = fields.get(NFTA_TABLE_HANDLE)
        return nfproto, _string(buf, *fields[NFTA_TABLE_NAME]), Event(
            _TABLE_MESSAGES[command], None, _BE64.unpack_from(buf, where[0])[0] if where else 0)
    return None


class NftMonitor:
    """A NETLINK_NETFILTER socket subscribed to NFNLGRP_NFTABLES in the network namespace
    of the thread that opens it. Open it before a full dump, so that no commit between
    the dump and the subscription goes unseen. ``receive_buffer``: bytes the kernel
    may queue for it (SO_RCVBUFFORCE, which needs CAP_NET_ADMIN; else SO_RCVBUF,
    capped by net.core.rmem_max). ``receive_buffer_bytes`` is what the kernel granted."""

    def __init__(self, receive_buffer: int = DEFAULT_RECEIVE_BUFFER) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        except OSError as err:
            raise FeedError(f"cannot open a netfilter netlink socket: {err.strerror}") from None
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError as err:
            self.sock.close()
            raise FeedError(f"cannot subscribe to nf_tables changes: {err.strerror}") from None
        self.receive_buffer_bytes = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.buf = bytearray(_RECV_BUFFER)
        self._open: dict[tuple[int, str], list[Event]] = {}  # the transaction whose NEWGEN has not come yet
        self._open_touched: dict[tuple[int, str], list[Event]] = {}  # the same, for drain_touched()

    def close(self) -> None:
        self.sock.close()

    def drain_touched(self, keep=None) -> Drained:
        """``drain()`` with each transaction's rule messages folded into one ``Event("rules",
        chain, 0)`` per chain they touched (see ``_drain_touched``)."""
        return _drain_touched(self, keep)

    def drain(self) -> Drained:
        """Every message queued now, without blocking: the transactions it completes, and
        a resync reason on overflow or a message that cannot be read (the rest of the
        queue is read and dropped then: a full read follows)."""
        batches: list[Batch] = []
        resync = None
        messages = 0
        buf = self.buf
        view = memoryview(buf)
        names: dict[bytes, str] = {}
        open_tables = self._open
        last_nfproto = last_table = last_events = None
        while True:
            try:
                size = self.sock.recv_into(buf, 0, _RECV_FLAGS)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    resync = resync or "the change feed overflowed (ENOBUFS)"
                    continue
                raise FeedError(f"nf_tables change feed: {err.strerror}") from None
            if size > len(buf):
                resync = resync or f"a {size}-byte nf_tables notification does not fit the receive buffer"
                continue
            data = view[:size].tobytes()  # one copy: each message is read from it in place
            offset = 0
            while offset + 16 <= size:
                length, msg_type, flags, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < 16 or offset + length > size:
                    resync = resync or "a malformed nf_tables notification"
                    break
                start, end = offset + 16, offset + length
                offset += (length + 3) & ~3
                messages += 1
                if resync or msg_type in (NLMSG_NOOP, NLMSG_DONE):
                    continue
                if msg_type == NLMSG_ERROR:
                    resync = "an error message on the change feed"
                    continue
                try:
                    if msg_type in _RULE_TYPES and end - start >= 4:  # most messages: straight to the walk
                        parsed = _rule_message(data, start + 4, end, msg_type & 0xFF, flags, data[start], names)
                    else:
                        parsed = parse_message(data, start, end, msg_type, flags, names)
                except (KeyError, ValueError, struct.error, IndexError) as err:
                    resync = f"an nf_tables notification this reader cannot parse ({err or type(err).__name__})"
                    continue
                if parsed is None:
                    continue
                if isinstance(parsed, int):
                    batches.append(Batch(parsed, open_tables))
                    open_tables = self._open = {}
                    last_table = None
                    continue
                nfproto, table, event = parsed
                if table is not last_table or nfproto != last_nfproto:  # a transaction comes table by table
                    last_events = open_tables.get((nfproto, table))
                    if last_events is None:
                        last_events = open_tables[(nfproto, table)] = []
                    last_nfproto, last_table = nfproto, table  # names are one object each (``names``)
                last_events.append(event)
        view.release()
        if resync:
            self._open = {}
            batches = []
        return Drained(batches, resync, messages)


def newer(generation: int, than: int) -> bool:
    """Generation ids are u32 that wrap: ``generation`` came after ``than``."""
    return 0 < (generation - than) & 0xFFFFFFFF < 0x80000000


class Unordered(Exception):
    """The events do not say where a rule sits: read the chain (or the table) again."""


_HEAD = -1  # the sentinel before a chain's first rule (rule handles are positive)


class ChainOrder:
    """One chain's rule handles in the kernel's order, edited by NEWRULE/DELRULE events
    of committed transactions, in the order the kernel announced them.

    The kernel announces a transaction's objects after linking all of its rules, so a
    NEWRULE's ``position`` (the rule just before it then) may name a rule announced
    later in the same transaction: such a rule waits for that one. No position: the
    rule was first or last then; a rule written with NLM_F_APPEND (iptables' -A) was
    last unless nothing it follows was left, one without (iptables' -I) was first.
    A guess next to a deletion in the same chain (iptables' -R, or -D with -A in one
    restore) could be wrong either way: ``Unordered``, and the caller reads again."""

    __slots__ = ("after", "before", "tail", "waiting", "guessed_tail", "just_deleted", "_kept", "_kept_left")

    def __init__(self, handles=()) -> None:
        self.after: dict[int, int | None] = {_HEAD: None}
        self.before: dict[int, int] = {}
        self.tail = _HEAD
        self.waiting: dict[int, list[int]] = {}  # position -> rules announced after it
        self.guessed_tail = False  # this chain's last event placed a rule at the tail by its flag
        self.just_deleted = False  # this chain's last event deleted a rule
        # The handles the chain starts with, linked only when an event needs their order:
        # a chain flushed whole (kube-proxy's partial sync flushes every top-level chain,
        # 11,000 rules at 10,000 Services) is a set emptied, never a list linked and unlinked.
        self._kept: tuple[int, ...] | None = tuple(handles) or None
        self._kept_left: set[int] | None = None  # of them, those not deleted yet (made at the first delete)

    def _link_kept(self) -> None:
        kept, left = self._kept, self._kept_left
        self._kept = self._kept_left = None
        for handle in kept:
            if left is None or handle in left:
                self._link(self.tail, handle)

    def _link(self, previous: int, handle: int) -> None:
        following = self.after[previous]
        self.after[previous] = handle
        self.after[handle] = following
        self.before[handle] = previous
        if following is None:
            self.tail = handle
        else:
            self.before[following] = handle

    def new_transaction(self) -> None:
        self.guessed_tail = self.just_deleted = False

    def add(self, handle: int, position: int | None, append: bool) -> None:
        if self._kept is not None:
            self._link_kept()
        if handle in self.after or self.waiting and any(handle in rules for rules in self.waiting.values()):
            raise Unordered(f"rule handle {handle} announced twice")
        guessed, just_deleted = False, self.just_deleted
        self.guessed_tail = self.just_deleted = False
        if position is not None:
            if position not in self.after:
                self.waiting.setdefault(position, []).append(handle)
                return
            previous = position
        elif just_deleted and self.tail != _HEAD:
            raise Unordered("a rule without a position next to a deletion")
        elif append and self.tail != _HEAD:
            previous, guessed = self.tail, True
        else:
            previous = _HEAD
        self._link(previous, handle)
        self.guessed_tail = guessed
        if self.waiting:
            self._place_waiting(handle)

    def _place_waiting(self, handle: int) -> None:
        placing = [handle]
        while placing:
            at = placing.pop()
            for waiting in self.waiting.pop(at, ()):
                self._link(at, waiting)
                placing.append(waiting)

    def delete(self, handle: int) -> None:
        if self.guessed_tail:
            raise Unordered("a rule deleted next to a guessed append")
        self.just_deleted = True
        if self._kept is not None:  # nothing added yet (guessed_tail is an add's): only kept rules are linked
            left = self._kept_left
            if left is None:
                left = self._kept_left = set(self._kept)
            if handle in left:
                left.remove(handle)
                return
            self._link_kept()  # not one of them (or deleted twice): the linked order says what it is
        if handle in self.after:
            previous, following = self.before.pop(handle), self.after.pop(handle)
            self.after[previous] = following
            if following is None:
                self.tail = previous
            else:
                self.before[following] = previous
            return
        for position, rules in self.waiting.items():
            if handle in rules:
                rules.remove(handle)
                return
        raise Unordered(f"rule handle {handle} deleted but never seen")

    def handles(self) -> list[int]:
        if self._kept is not None:
            self._link_kept()
        if any(self.waiting.values()):
            raise Unordered("a rule placed after one never announced")
        out = []
        at = self.after[_HEAD]
        while at is not None:
            out.append(at)
            at = self.after[at]
        return out


def _touched_rule(buf, body: int, end: int, names: dict) -> tuple[str, str, int] | None:
    """(table, chain, where the rest starts) of a NEWRULE/DELRULE whose first two
    attributes are its table and chain (as the kernel writes them); None for any other layout."""
    if body + 8 > end:
        return None
    tlen, ttype = _NLA.unpack_from(buf, body)
    chain_at = body + ((tlen + 3) & ~3)
    if ttype & 0x3FFF != NFTA_RULE_TABLE or tlen < 5 or chain_at + 4 > end:
        return None
    clen, ctype = _NLA.unpack_from(buf, chain_at)
    stop = chain_at + ((clen + 3) & ~3)
    if ctype & 0x3FFF != NFTA_RULE_CHAIN or clen < 5 or stop > end:
        return None
    key = bytes(buf[body:stop])
    found = names.get(key)
    if found is None:
        found = names[key] = (_string(buf, body + 4, body + tlen), _string(buf, chain_at + 4, chain_at + clen))
    return found[0], found[1], stop


_HANDLE_HEADER = _NLA.pack(12, NFTA_RULE_HANDLE)  # a u64 attribute's header, as the kernel writes it
_POSITION_HEADER = _NLA.pack(12, NFTA_RULE_POSITION)


def _rule_rest(buf, at: int, end: int, command: int, flags: int, chain: str) -> Event:
    """A rule message past its table and chain: handle, position, and the bytes from its
    expressions on (``body``), for a reader that digests a chain's rules."""
    if buf[at:at + 4] == _HANDLE_HEADER:  # as the kernel writes it: handle, [position], expressions
        handle = _BE64.unpack_from(buf, at + 4)[0]
        if command != NFT_MSG_NEWRULE:
            return Event("delrule", chain, handle)
        at += 12
        position = None
        if buf[at:at + 4] == _POSITION_HEADER:
            position = _BE64.unpack_from(buf, at + 4)[0]
            at += 12
        if at + 4 <= end and _NLA.unpack_from(buf, at)[1] & 0x3FFF == NFTA_RULE_EXPRESSIONS:
            return Event("newrule", chain, handle, position, bool(flags & NLM_F_APPEND), bytes(buf[at:end]))
        return Event("newrule", chain, handle, position, bool(flags & NLM_F_APPEND))
    handle = position = None
    body = b""
    while at + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, at)
        if alen < 4 or at + alen > end:
            raise ValueError("bad attribute length")
        atype &= 0x3FFF
        if atype == NFTA_RULE_HANDLE and alen >= 12:
            handle = _BE64.unpack_from(buf, at + 4)[0]
        elif atype == NFTA_RULE_POSITION and alen >= 12:
            position = _BE64.unpack_from(buf, at + 4)[0]
        elif atype == NFTA_RULE_EXPRESSIONS:
            body = bytes(buf[at:end])
            break
        at += (alen + 3) & ~3
    if handle is None:
        raise ValueError("a rule message without its handle")
    kind = "newrule" if command == NFT_MSG_NEWRULE else "delrule"
    return Event(kind, chain, handle, position, bool(flags & NLM_F_APPEND), body)


def _drain_touched(monitor: "NftMonitor", keep=None) -> Drained:
    """``NftMonitor.drain_touched()``: ``drain()`` for a reader that keeps no rules: each transaction's table and
    chain events as they came, and one ``Event("rules", chain, 0)`` per chain whose rules
    it touched (after them: only which chains, not which rules, is read; a partial sync
    at 10,000 Services announces 24,000 rule messages). The rule messages of chains
    ``keep(chain)`` is true of are kept too, as "newrule"/"delrule" events with their
    handle, position, append flag and ``body`` (the bytes from the expressions on)."""
    batches: list[Batch] = []
    resync = None
    messages = 0
    buf = monitor.buf
    names: dict[bytes, tuple[str, str]] = {}
    keeps: dict[str, bool] = {}  # keep(chain), asked once per chain
    open_events: dict[tuple[int, str], list[Event]] = monitor._open_touched
    monitor._open_touched = {}
    open_rules: dict[tuple[int, str], set[str]] = {}
    sock = monitor.sock
    while True:
        try:
            size = sock.recv_into(buf, 0, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except BlockingIOError:
            break
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                resync = resync or "the change feed overflowed (ENOBUFS)"
                continue
            raise FeedError(f"nf_tables change feed: {err.strerror}") from None
        if size > len(buf):
            resync = resync or f"a {size}-byte nf_tables notification does not fit the receive buffer"
            continue
        offset = 0
        while offset + 16 <= size:
            length, msg_type, flags, _, _ = _NLMSGHDR.unpack_from(buf, offset)
            if length < 16 or offset + length > size:
                resync = resync or "a malformed nf_tables notification"
                break
            start, end = offset + 16, offset + length
            offset += (length + 3) & ~3
            messages += 1
            if resync or msg_type in (NLMSG_NOOP, NLMSG_DONE):
                continue
            if msg_type == NLMSG_ERROR:
                resync = "an error message on the change feed"
                continue
            if msg_type in _RULE_TYPES and end - start >= 4:
                found = _touched_rule(buf, start + 4, end, names)
                if found is not None:
                    key = (buf[start], found[0])
                    chains = open_rules.get(key)
                    if chains is None:
                        chains = open_rules[key] = set()
                        open_events.setdefault(key, [])
                    chain = found[1]
                    chains.add(chain)
                    kept = keeps.get(chain)
                    if kept is None:
                        kept = keeps[chain] = keep is not None and bool(keep(chain))
                    if kept:
                        try:
                            open_events[key].append(_rule_rest(buf, found[2], end, msg_type & 0xFF, flags, chain))
                        except (ValueError, struct.error) as err:
                            resync = f"an nf_tables notification this reader cannot parse ({err})"
                    continue
            try:
                parsed = parse_message(buf, start, end, msg_type, flags, {})
            except (KeyError, ValueError, struct.error, IndexError) as err:
                resync = f"an nf_tables notification this reader cannot parse ({err or type(err).__name__})"
                continue
            if parsed is None:
                continue
            if isinstance(parsed, int):
                for key, chains in open_rules.items():
                    open_events[key].extend(Event("rules", chain, 0) for chain in chains)
                batches.append(Batch(parsed, open_events))
                open_events, open_rules = {}, {}
                continue
            nfproto, table, event = parsed
            if event.kind in ("newrule", "delrule"):  # a layout the quick path did not take
                open_rules.setdefault((nfproto, table), set()).add(event.chain)
                open_events.setdefault((nfproto, table), [])
            else:
                open_events.setdefault((nfproto, table), []).append(event)
    if resync:
        return Drained([], resync, messages)
    if open_events:
        # A transaction whose NEWGEN has not come yet: the caller reads again (its generation
        # check finds the kernel past what was applied) and the next drain has the rest.
        for key, chains in open_rules.items():
            open_events[key].extend(Event("rules", chain, 0) for chain in chains)
        monitor._open_touched = open_events
    return Drained(batches, resync, messages)
