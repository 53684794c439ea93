"""nf_tables' own change feed: the NFNLGRP_NFTABLES multicast group of this network namespace.

Every committed nf_tables transaction is announced to that group, object by object
(NEWRULE/DELRULE with the rule's table, chain and handle, NEWCHAIN/DELCHAIN,
NEWTABLE/DELTABLE, ...), and closed by one NEWGEN carrying the generation id the
commit made. A reader that opened its ``NftMonitor`` before its full dump learns
from these messages which chains changed (the iptables-nft source,
``exporter.readers.iptables_nft``), instead of dumping tens of thousands of chains
again after kube-proxy rewrote one Service.

What this module does: subscribe (with a large receive buffer: the kernel drops
messages, and says ENOBUFS once, when a listener's buffer is full), ``drain()``
whatever is queued without blocking, and hand back each complete transaction as a
``Batch`` (its generation, its events per (family, table)): table and chain events
as they came, and one "rules" event per chain whose rules it touched; the rule
messages of the few chains the caller asks for are kept whole (their bytes, not
decoded: decoding is the reader's).

"resync": an overflow, or a message this module cannot parse, means the events no
longer describe the ruleset; the caller must read it whole again.

Announcements only (``NftMonitor(announcements_only=True)``): a reader that dumps the
rules itself needs no events, only to know when a commit is finished. The kernel
numbers a commit (the generation NFT_MSG_GETGEN answers) before it makes its objects
live and unlinks the deleted ones, and announces it with NEWGEN last: a read is the
kernel's once the generation it read at was announced before its dumps began. A
classic BPF socket filter keeps only datagrams whose first message is NEWGEN (the
kernel sends it in a datagram of its own; the other notifications of a commit come
coalesced, and the filter drops them before they are queued), so a 10,000-Service
sync costs the socket one small datagram, not 26 MB of element and rule messages.

Cost: the kernel only builds these messages while someone listens, so a listener
adds work to every nf_tables commit on the node (kube-proxy's restores included),
and what waits in the buffer is kernel memory charged to the listener's memory
cgroup. A drain costs O(messages queued).
"""

from __future__ import annotations

import ctypes
import errno
import select
import socket
import struct
import time
from typing import Callable, NamedTuple

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
NFT_MSG_NEWSET, NFT_MSG_DELSET, NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 9, 11, 12, 14
NFT_MSG_NEWGEN = 15
# attributes
NFTA_TABLE_NAME, NFTA_TABLE_HANDLE = 1, 4
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME = 1, 2, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS = 1, 2, 3, 4
NFTA_RULE_POSITION, NFTA_RULE_USERDATA = 6, 7
NFTA_GEN_ID = 1
NFTA_SET_HANDLE = 16
NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_LIST_ELEM = 3, 1
# The kernel grants twice what is asked (32 MiB here) and charges only what waits, to the
# exporter's memory cgroup (the DaemonSet's limit is 256 MiB, and a 10,000-Service first
# read peaks near 190 MB RSS): so not more. Measured: one partial sync of kube-proxy
# queues 2.6 MB at 1,000 Services x 5, 7.9 MB at 3,000, 26 MB at 10,000 (24,000 rule
# messages): a dozen syncs between reads at 1,000, one at 10,000; past that the kernel
# drops them and the next read is a full one (counted), never a wrong one.
DEFAULT_RECEIVE_BUFFER = 16 << 20
# Announcements only: one NEWGEN datagram per commit. Thousands of them fit; past that
# (hours of syncs unread) the kernel drops the newest and says ENOBUFS, which a reader
# takes as "an announcement may be lost" (see ``announced``), never as settled.
ANNOUNCEMENT_BUFFER = 1 << 20
# How long a reader waits for the announcement of a generation the kernel already
# numbers (its commit is still being applied) before it reads anyway.
FEED_WAIT_SECONDS = 1.0
SO_ATTACH_FILTER = 26
# classic BPF (<linux/filter.h>): BPF_LD|BPF_H|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
_BPF_LD_HALF, _BPF_JEQ, _BPF_RET = 0x28, 0x15, 0x06
_BPF_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_SOCK_FPROG = struct.Struct("@HP")  # struct sock_fprog: len, filter
_RECV_BUFFER = 1 << 16  # a notification datagram is at most a page or two
_RECV_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_TRUNC)  # once: an enum's | per datagram was 6,000 calls
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
# Message types this module reads; set, element, object, flowtable messages are skipped.
_TABLE_MESSAGES = {NFT_MSG_NEWTABLE: "newtable", NFT_MSG_DELTABLE: "deltable"}
_CHAIN_MESSAGES = {NFT_MSG_NEWCHAIN: "newchain", NFT_MSG_DELCHAIN: "delchain"}
_RULE_MESSAGES = {NFT_MSG_NEWRULE: "newrule", NFT_MSG_DELRULE: "delrule"}
_RULE_TYPES = frozenset((NFNL_SUBSYS_NFTABLES << 8) | command for command in _RULE_MESSAGES)
# A set or map made, deleted, or its elements changed (their table and set name are the
# first two attributes of each: NFTA_SET_TABLE/NAME, NFTA_SET_ELEM_LIST_TABLE/SET).
_SET_TYPES = frozenset((NFNL_SUBSYS_NFTABLES << 8) | command for command in
                       (NFT_MSG_NEWSET, NFT_MSG_DELSET, NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM))


def newgen_filter() -> bytes:
    """A classic BPF program (``struct sock_filter``s) that keeps a netlink datagram whose
    first message is NFT_MSG_NEWGEN and drops any other (a datagram too short too)."""
    newgen = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
    # nlmsg_type (offset 4) is in host byte order; BPF loads a half-word in network order.
    wanted = struct.unpack(">H", struct.pack("=H", newgen))[0]
    program = ((_BPF_LD_HALF, 0, 0, 4), (_BPF_JEQ, 0, 1, wanted), (_BPF_RET, 0, 0, 0xFFFFFFFF), (_BPF_RET, 0, 0, 0))
    return b"".join(_BPF_INSN.pack(*insn) for insn in program)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER of ``program`` (``struct sock_filter``s); the kernel copies it."""
    insns = ctypes.create_string_buffer(program, len(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    _SOCK_FPROG.pack(len(program) // _BPF_INSN.size, ctypes.addressof(insns)))


class FeedError(Exception):
    """The feed cannot be opened; one line saying why."""


class Event(NamedTuple):
    """One object change of a committed transaction.

    ``kind``: newtable, deltable, newchain, delchain, newrule, delrule, "rules" (some
    of the chain's rules changed; handle 0; ``delta``: rules added less rules deleted); with
    ``NftMonitor(sets=True)``, "newset"/"delset" (a named set, ``chain`` its name: made, or
    added again as it is, which nf_tables announces too; deleted) and "elements" (some of
    its elements changed; handle 0); anonymous sets live and die with their rule. For the named
    sets of ``NftMonitor(elements_of=...)``, each element added or deleted instead: "newelem" /
    "delelem" (``chain`` the set's name, in the order they came, ``body`` the element's
    attributes as the kernel wrote them, NFTA_LIST_ELEM's payload: decoding is the reader's);
    a message of such a set without elements (one this module cannot split) is its "elements"
    event. ``handle`` is the table's, chain's or rule's. For a NEWRULE: ``position`` (the handle of the rule just before it when the
    kernel announced it, if any), ``append`` (written with NLM_F_APPEND). For both rule
    kinds, ``body``: the message's attributes from the expressions on (the expressions
    and user data, framed), so that a chain flushed and written again (kube-proxy's
    partial sync does so to every top-level chain) can be digested from the feed alone;
    for a NEWRULE, what ``NftMonitor(rule_body=...)`` makes of them when it is given."""

    kind: str
    chain: str | None
    handle: int
    position: int | None = None
    append: bool = False
    body: bytes = b""
    delta: int = 0


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


def parse_message(buf, start: int, end: int, msg_type: int) -> tuple[int, str, Event] | int | None:
    """One nf_tables notification (``start``: its nfgenmsg): (nfproto, table, Event), the
    generation id of a NEWGEN, or None for a message kind the feed does not follow.
    Raises ValueError (or KeyError, an attribute missing) when it cannot be read."""
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
    if command in _RULE_MESSAGES:  # a layout ``drain``'s straight read does not take
        fields = _attributes(buf, body, end)
        return nfproto, _string(buf, *fields[NFTA_RULE_TABLE]), Event(
            _RULE_MESSAGES[command], _string(buf, *fields[NFTA_RULE_CHAIN]),
            _BE64.unpack_from(buf, fields[NFTA_RULE_HANDLE][0])[0])
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
    capped by net.core.rmem_max). ``receive_buffer_bytes`` is what the kernel granted.
    ``sets``: named sets' changes are events too ("sets"); ``elements_of``: the names of the
    sets whose elements come one by one ("newelem"/"delelem"; ``Event``).
    ``announcements_only``: the NEWGEN datagrams alone reach the socket (``newgen_filter``);
    ``drain()`` then gives batches without events. ``announced``: the newest generation it
    announced, None before its first or after an overflow (the newest are the ones lost)."""

    sets = False  # "sets" events too (``Event``)
    elements_of: frozenset[str] = frozenset()  # sets whose elements come one by one

    def __init__(self, receive_buffer: int = DEFAULT_RECEIVE_BUFFER, announcements_only: bool = False,
                 sets: bool = False, elements_of: frozenset[str] = frozenset(),
                 rule_body: Callable[[bytes], bytes] | None = None) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        except OSError as err:
            raise FeedError(f"cannot open a netfilter netlink socket: {err.strerror}") from None
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            if announcements_only:
                attach_filter(self.sock, newgen_filter())  # before it subscribes: nothing else queued
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError as err:
            self.sock.close()
            raise FeedError(f"cannot subscribe to nf_tables changes: {err.strerror}") from None
        self.receive_buffer_bytes = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.buf = bytearray(_RECV_BUFFER)
        self.announced: int | None = None
        self.sets = sets
        self.elements_of = elements_of
        # What a kept NEWRULE event holds of the rule's bytes: a partial sync at 10,000
        # Services writes ~12,000 rules again, and their bytes were 12.5 MB between a
        # drain and the read that digests them.
        self.rule_body = rule_body or _as_is
        self._open: dict[tuple[int, str], list[Event]] = {}  # the transaction whose NEWGEN has not come yet

    def close(self) -> None:
        self.sock.close()

    def wait(self, timeout: float) -> bool:
        """Whether a message came within ``timeout`` seconds (none waited for when it is not positive)."""
        if timeout <= 0:
            return False
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def until_announced(self, generation: int, deadline: float, keep=None) -> Drained:
        """``drain(keep)`` until the feed has announced ``generation`` (the kernel numbers a
        commit before it applies and announces it) or until ``deadline`` (``time.monotonic``),
        stopping at a resync; nothing waited for while ``announced`` is None (a commit
        finished before the subscription is never announced, and after an overflow the
        newest announcements are the ones lost)."""
        batches: list[Batch] = []
        messages = 0
        while self.announced is not None and newer(generation, self.announced):
            if not self.wait(deadline - time.monotonic()):
                break
            drained = self.drain(keep)
            messages += drained.messages
            if drained.resync:
                return Drained([], drained.resync, messages)
            batches += drained.batches
        return Drained(batches, None, messages)

    def drain(self, keep=None) -> Drained:
        """Every message queued now, without blocking: the transactions it completes, each
        with its table and chain events as they came and one ``Event("rules", chain, 0)``
        per chain whose rules it touched (after them: which chains, not which rules; a
        partial sync at 10,000 Services announces 24,000 rule messages). The rule messages
        of chains ``keep(chain)`` is true of are kept too, as "newrule"/"delrule" events with
        their handle, position, append flag and ``body`` (the bytes from the expressions
        on). ``resync`` says why the events no longer describe the ruleset (an overflow, a
        message that cannot be read: the rest of the queue is read and dropped then)."""
        batches: list[Batch] = []
        resync = None
        messages = 0
        buf = self.buf
        names: dict[bytes, tuple[str, str]] = {}
        keeps: dict[str, bool] = {}  # keep(chain), asked once per chain
        open_events: dict[tuple[int, str], list[Event]] = self._open
        self._open = {}
        # (nfproto, table) -> chain -> rules added less rules deleted, of the open transaction
        open_rules: dict[tuple[int, str], dict[str, int]] = {}
        open_sets: dict[tuple[int, str], set[str]] = {}
        sets = self.sets
        elements_of = self.elements_of
        sock = self.sock
        while True:
            try:
                size = sock.recv_into(buf, 0, _RECV_FLAGS)
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
                            chains = open_rules[key] = {}
                            open_events.setdefault(key, [])
                        chain = found[1]
                        chains[chain] = chains.get(chain, 0) + (1 if msg_type & 0xFF == NFT_MSG_NEWRULE else -1)
                        kept = keeps.get(chain)
                        if kept is None:
                            kept = keeps[chain] = keep is not None and bool(keep(chain))
                        if kept:
                            try:
                                open_events[key].append(_rule_rest(buf, found[2], end, msg_type & 0xFF, flags, chain,
                                                                         self.rule_body))
                            except (ValueError, struct.error) as err:
                                resync = f"an nf_tables notification this reader cannot parse ({err})"
                        continue
                if msg_type in _SET_TYPES:
                    if sets and end - start >= 4:
                        try:
                            fields = _attributes(buf, start + 4, end)
                            table, name = _string(buf, *fields[1]), _string(buf, *fields[2])
                            command = msg_type & 0xFF
                            handle = (_BE64.unpack_from(buf, fields[NFTA_SET_HANDLE][0])[0]
                                      if command in (NFT_MSG_NEWSET, NFT_MSG_DELSET) else 0)
                            one_by_one = (_list_elements(buf, *fields[NFTA_SET_ELEM_LIST_ELEMENTS])
                                          if name in elements_of and NFTA_SET_ELEM_LIST_ELEMENTS in fields
                                          and command in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM) else ())
                        except (KeyError, ValueError, struct.error) as err:
                            resync = f"an nf_tables notification this reader cannot parse ({err or type(err).__name__})"
                            continue
                        if not name.startswith("__"):  # anonymous: its rule's events say it
                            key = (buf[start], table)
                            events = open_events.setdefault(key, [])
                            if command == NFT_MSG_NEWSET:
                                events.append(Event("newset", name, handle))
                            elif command == NFT_MSG_DELSET:
                                events.append(Event("delset", name, handle))
                            elif one_by_one:
                                kind = "newelem" if command == NFT_MSG_NEWSETELEM else "delelem"
                                events.extend(Event(kind, name, 0, body=raw) for raw in one_by_one)
                            else:
                                open_sets.setdefault(key, set()).add(name)
                    continue
                try:
                    parsed = parse_message(buf, start, end, msg_type)
                except (KeyError, ValueError, struct.error, IndexError) as err:
                    resync = f"an nf_tables notification this reader cannot parse ({err or type(err).__name__})"
                    continue
                if parsed is None:
                    continue
                if isinstance(parsed, int):
                    _close(open_events, open_rules, open_sets)
                    batches.append(Batch(parsed, open_events))
                    open_events, open_rules, open_sets = {}, {}, {}
                    continue
                nfproto, table, event = parsed
                if event.kind in ("newrule", "delrule"):  # a layout the quick path did not take
                    chains = open_rules.setdefault((nfproto, table), {})
                    chains[event.chain] = chains.get(event.chain, 0) + (1 if event.kind == "newrule" else -1)
                    events = open_events.setdefault((nfproto, table), [])
                    if keep is not None and keep(event.chain):
                        # Its bytes are not kept: the reader must not digest this chain from
                        # the feed's messages, but dump it.
                        events.append(Event("unkept", event.chain, event.handle))
                else:
                    open_events.setdefault((nfproto, table), []).append(event)
        if resync:
            self.announced = None
            return Drained([], resync, messages)
        if batches:
            self.announced = batches[-1].generation
        if open_events:
            # A transaction whose NEWGEN has not come yet: the caller reads again (its generation
            # check finds the kernel past what was applied) and the next drain has the rest.
            _close(open_events, open_rules, open_sets)
            self._open = open_events
        return Drained(batches, resync, messages)


def _close(open_events: dict, open_rules: dict, open_sets: dict) -> None:
    """A transaction's events get one "rules" event per chain whose rules it touched
    (with the net change of their number) and one "elements" event per named set whose
    elements it changed."""
    for key, chains in open_rules.items():
        open_events[key].extend(Event("rules", chain, 0, delta=delta) for chain, delta in chains.items())
    for key, names in open_sets.items():
        open_events[key].extend(Event("elements", name, 0) for name in sorted(names))


def _list_elements(buf, start: int, end: int) -> list[bytes]:
    """The payload of each NFTA_LIST_ELEM in an NFTA_SET_ELEM_LIST_ELEMENTS (``start``..``end``),
    in order (``_attributes`` keeps one attribute per type)."""
    out = []
    while start + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, start)
        if alen < 4 or start + alen > end:
            raise ValueError("bad attribute length")
        if atype & 0x3FFF == NFTA_LIST_ELEM:
            out.append(bytes(buf[start + 4:start + alen]))
        start += (alen + 3) & ~3
    return out


def newer(generation: int, than: int) -> bool:
    """Generation ids are u32 that wrap: ``generation`` came after ``than``."""
    return 0 < (generation - than) & 0xFFFFFFFF < 0x80000000


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


def _as_is(raw: bytes) -> bytes:
    """A NEWRULE's bytes kept as they are: a feed made without ``rule_body``."""
    return raw


def _rule_rest(buf, at: int, end: int, command: int, flags: int, chain: str,
               rule_body: Callable[[bytes], bytes] = _as_is) -> Event:
    """A rule message past its table and chain: handle, position, and the bytes from its
    expressions on (``body``; a NEWRULE's through ``rule_body`` when given), for a reader
    that digests a chain's rules."""
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
            return Event("newrule", chain, handle, position, bool(flags & NLM_F_APPEND), rule_body(bytes(buf[at:end])))
        return Event("newrule", chain, handle, position, bool(flags & NLM_F_APPEND), rule_body(b""))
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
    return Event(kind, chain, handle, position, bool(flags & NLM_F_APPEND),
                 rule_body(body) if kind == "newrule" else body)
