"""nf_tables over raw netlink: the generation id, a table's chains, rules, sets and elements.

Why not `nft` or pyroute2 (field.md, bench/bench_nftables.py): `nft -j list ruleset`
of a 10,000-service table takes seconds and hundreds of MB, libnftables in our own
process could take the exporter down with it, and pyroute2's generic nf_tables
parser is far slower than `nft`. This module sends the same requests nft sends
(NFNL_SUBSYS_NFTABLES dumps) on a plain NETLINK_NETFILTER socket and decodes only
what a kube-proxy reader needs, with struct on one receive buffer.

Decoding stops at plain data: a rule is a ``Rule`` (its chain, handle, and the few
facts its expressions state: the verdict it ends in, whether it matches anything
first, what it DNATs to, which sets it looks up or updates); an element is an
``Element`` (raw key bytes, verdict or raw data, comment). What those mean for a
Service is the job of ``exporter.readers.nftables``.

The socket lives in the network namespace of the thread that opens it (as the
ipset reader's), so tests read a namespace of their own from a thread that joined it.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import sys
from typing import Iterator, NamedTuple

from exporter.readers.ipset import (NETLINK_NETFILTER, NFNETLINK_V0, NLA_F_NESTED, NLM_F_DUMP, NLM_F_MULTI,
                                    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, _NLA, _NLMSGHDR, _nla)

# <linux/netfilter/nfnetlink.h>, <linux/netfilter/nf_tables.h>
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETTABLE = 1
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFT_MSG_GETSETELEM = 13
NFT_MSG_GETGEN = 16
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

NFTA_TABLE_NAME, NFTA_TABLE_HANDLE = 1, 4
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK = 1, 2, 3, 4
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 3, 4, 7
# In a dump, the handle of the rule before this one in its chain (absent for the first).
NFTA_RULE_POSITION = 6
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS = 1, 2, 3
NFTA_SET_KEY_LEN, NFTA_SET_DATA_TYPE, NFTA_SET_DATA_LEN, NFTA_SET_TIMEOUT, NFTA_SET_HANDLE = 5, 6, 7, 11, 16
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_USERDATA = 1, 2, 3, 6
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFTA_GEN_ID = 1
NFT_SET_ANONYMOUS, NFT_SET_INTERVAL, NFT_SET_MAP, NFT_SET_TIMEOUT = 0x1, 0x4, 0x8, 0x10
NFT_SET_ELEM_INTERVAL_END = 0x1
NFT_REG_VERDICT = 0
NLM_F_ACK = 0x4
NFTA_NG_MODULUS = 2
# Verdict codes (netfilter.h, nf_tables.h).
NF_DROP, NF_ACCEPT = 0, 1
NFT_CONTINUE, NFT_BREAK, NFT_JUMP, NFT_GOTO, NFT_RETURN = -1, -2, -3, -4, -5
VERDICT_NAMES = {NF_DROP: "drop", NF_ACCEPT: "accept", NFT_CONTINUE: "continue", NFT_BREAK: "break",
                 NFT_JUMP: "jump", NFT_GOTO: "goto", NFT_RETURN: "return"}
# Expression attributes used below.
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_DREG, NFTA_LOOKUP_FLAGS = 1, 2, 3, 5
NFTA_NAT_TYPE, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN = 1, 2, 3, 5
NFT_NAT_DNAT = 1
NFTA_DYNSET_SET_NAME = 1
NFTA_NG_DREG = 1
# Expressions that test the packet (a rule holding one is conditional).
MATCHING_EXPRESSIONS = frozenset({b"cmp", b"range"})
_DECODED_EXPRESSIONS = frozenset({b"immediate", b"lookup", b"dynset", b"reject", b"nat", b"numgen"})
# An expression's name attribute as the kernel writes it (length, NFTA_EXPR_NAME,
# name, NUL): rules without any of these need no decoding (``Rule`` fast path).
_ACTING_EXPRESSIONS = re.compile(b"|".join(re.escape(_NLA.pack(4 + len(n) + 1, NFTA_EXPR_NAME) + n + b"\0")
                                           for n in (b"nat", b"lookup", b"dynset", b"reject", b"range",
                                                     b"numgen", b"objref", b"queue", b"dup", b"fwd")))
_CMP_EXPRESSION = _NLA.pack(8, NFTA_EXPR_NAME) + b"cmp\0"
# libnftnl's user-data TLV type of a comment, for rules and elements alike.
UDATA_COMMENT = 0

_BE32 = struct.Struct(">I")
_BE32S = struct.Struct(">i")
_BE64 = struct.Struct(">Q")
_ERRNO = struct.Struct("=i")  # an NLMSG_ERROR / NLMSG_DONE's code
_RECV_BUFFER = 65536  # the kernel fills dump datagrams up to ~32 KB
# A dump's message ends early only when the next rule does not fit. The kernel gives a
# dump's message the room of the socket's largest receive so far (ours: 64 KB, capped at
# 32 KB less the skb's overhead) or, before any or when memory is short, NLMSG_GOODSIZE
# (a page, at most 8 KB, less the overhead); the overhead is 320 bytes on x86-64, 768
# at most (CONFIG_MAX_SKB_FRAGS=45). kube-proxy's largest rule dumps to 868 bytes (a
# 256-byte comment of it): a message shorter than either room less 1 KB left no rule out.
_PAGE_ROOM = min(os.sysconf("SC_PAGE_SIZE"), 8192)
_SMALL_ROOM = _PAGE_ROOM - 768, _PAGE_ROOM - 320
_LARGE_ROOM = 32768 - 768
_RULE_ROOM = 1024


def could_be_cut(size: int) -> bool:
    """Whether a dump's message of ``size`` bytes may have ended for want of room (and the
    next message resumed the dump), rather than at the dump's end. Most chains of a
    per-chain read (a KUBE-SEP: two rules, ~1.2 KB; a KUBE-SVC of five endpoints: six,
    ~2.2 KB) and most dumps' last messages are not: no boundary after them to vouch for."""
    return _SMALL_ROOM[0] - _RULE_ROOM < size <= _SMALL_ROOM[1] or size > _LARGE_ROOM - _RULE_ROOM


class NftReadError(Exception):
    """Reading nf_tables failed; the message is one line saying why."""

    def __init__(self, message: str, errno_: int = 0) -> None:
        super().__init__(message)
        self.errno = errno_


class NftConversationError(NftReadError):
    """The conversation with the kernel failed (no answer in time, a socket error, the
    socket closed): it says nothing of the rules, and the same read may go through."""


class NftDumpTorn(NftReadError):
    """A rule dump that is not one chain's list as it stands: a rule came after one other
    than the rule before it. The kernel resumes a dump that fills several messages by
    counting rules from the chain's (or table's) start, and counts the rules a transaction
    being prepared has added; when that transaction is aborted, or adds more meanwhile,
    the count lands elsewhere and the dump repeats or skips rules. Nothing else says so:
    an aborted transaction moves no generation and announces nothing. Read again."""


def fails_again(err: NftReadError) -> bool:
    """Whether the same read, of the same generation, would fail the same way: the rules'
    own content (a map missing, a message not understood), not the conversation, a
    kernel's error code (busy, out of memory) or a transaction under the dump."""
    return not isinstance(err, (NftConversationError, NftDumpTorn)) and not err.errno


def _handle_only(_buf, _chain: str, handle: int, _exprs, _udata) -> int:
    return handle


def torn(chain: str, handle: int, position: int, previous: int) -> NftDumpTorn:
    after = f"rule {position}" if position else "the chain's start"
    before = f"rule {previous}" if previous else "nothing"
    return NftDumpTorn(f"the dump of chain {chain} was torn by a transaction (rule {handle} "
                       f"follows {after} in the kernel, {before} in the dump)")


class Verdict(NamedTuple):
    code: int  # NF_DROP, NFT_GOTO, ...
    chain: str | None = None

    @property
    def name(self) -> str:
        return VERDICT_NAMES.get(self.code, str(self.code))


class Chain(NamedTuple):
    name: str
    handle: int
    base: bool  # attached to a hook


class Rule(NamedTuple):
    """What one rule states, in the terms a kube-proxy reader needs."""

    chain: str
    handle: int
    verdict: Verdict | None  # the immediate verdict it ends in, if any
    conditional: bool  # it tests the packet (cmp/range/lookup) before acting
    dnat: tuple | None  # ("value", addr bytes, port bytes|None) or ("map", set name, family)
    vmap: str | None  # the set a verdict-map lookup reads (``numgen ... vmap { }``)
    lookups: tuple[str, ...]  # sets it matches against (``ip saddr @affinity-...``)
    updates: tuple[str, ...]  # sets it updates (``update @affinity-... { ip saddr }``)
    rejects: bool  # a reject expression
    comment: str | None
    unknown: tuple[str, ...] = ()  # what could not be decoded (a reason each)
    modulus: int | None = None  # N of a ``numgen ... mod N`` (the keys of its map are 0..N-1)


class SetInfo(NamedTuple):
    name: str
    handle: int
    flags: int
    key_len: int
    data_len: int
    timeout_ms: int | None


class Element(NamedTuple):
    key: bytes
    data: bytes | Verdict | None  # raw value bytes, or a verdict
    flags: int
    comment: str | None


class Table(NamedTuple):
    name: str
    handle: int


def _attrs(buf, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(payload start, payload end, type without flags) of each attribute in offset..end."""
    while offset + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, offset)
        if alen < 4 or offset + alen > end:
            raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
        yield offset + 4, offset + alen, atype & 0x3FFF
        offset += (alen + 3) & ~3


def _string(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).split(b"\0", 1)[0].decode("utf-8", "replace")


def _comment(buf, start: int, end: int) -> str | None:
    """The comment in libnftnl's user data (TLVs of one-byte type and length)."""
    while start + 2 <= end:
        kind, length = buf[start], buf[start + 1]
        if kind == UDATA_COMMENT:
            return _string(buf, start + 2, min(start + 2 + length, end))
        start += 2 + length
    return None


def _verdict(buf, start: int, end: int) -> Verdict:
    code, chain = NFT_CONTINUE, None
    for s, e, t in _attrs(buf, start, end):
        if t == NFTA_VERDICT_CODE and e - s >= 4:
            code = _BE32S.unpack_from(buf, s)[0]
        elif t == NFTA_VERDICT_CHAIN:
            chain = sys.intern(_string(buf, s, e))  # one str per chain name, with the chain dump's
    return Verdict(code, chain)


def _data(buf, start: int, end: int) -> bytes | Verdict | None:
    """NFTA_DATA_*: raw value bytes or a verdict."""
    if start + 4 <= end:
        alen, t = _NLA.unpack_from(buf, start)
        if t & 0x3FFF == NFTA_DATA_VALUE and 4 <= alen <= end - start:
            return bytes(buf[start + 4:start + alen])  # the usual case: the only attribute
    for s, e, t in _attrs(buf, start, end):
        if t == NFTA_DATA_VALUE:
            return bytes(buf[s:e])
        if t == NFTA_DATA_VERDICT:
            return _verdict(buf, s, e)
    return None


def _error_text(code: int, what: str) -> str:
    if code == errno.EPERM:
        return f"permission denied reading {what}: nf_tables over netlink needs CAP_NET_ADMIN in this network namespace"
    if code == errno.ENOENT:
        return f"{what}: not found"
    if code in (errno.EPROTONOSUPPORT, errno.EOPNOTSUPP, errno.EAFNOSUPPORT):
        return f"no nf_tables in this kernel ({what}): {os.strerror(code)}"
    return f"the kernel refused {what}: {os.strerror(code)}"


def _socket_error(err: Exception, timeout: float, what: str) -> NftReadError:
    """The one-line reason for what a request's socket or a reply's bytes raised."""
    if isinstance(err, struct.error):
        return NftReadError(f"malformed nf_tables netlink message ({what})")
    if isinstance(err, (BlockingIOError, TimeoutError)) or err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return NftConversationError(f"no answer from nf_tables within {timeout:g} s ({what})")
    return NftConversationError(f"nf_tables netlink socket error ({what}): {err.strerror}", err.errno)


class NftNetlink:
    """One NETLINK_NETFILTER socket speaking nf_tables; use as a context manager."""

    def __init__(self, timeout: float = 5.0) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                      NETLINK_NETFILTER)
        except OSError as err:
            raise NftConversationError(f"cannot open a netfilter netlink socket: {err.strerror}", err.errno) from None
        seconds = int(timeout)
        self.timeout = timeout
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("@ll", seconds, int((timeout - seconds) * 1e6)))
        self.sock.bind((0, 0))
        self.seq = 0
        self.ended_apart = False  # of the last dump by _replies
        self.buf = bytearray(_RECV_BUFFER)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "NftNetlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the conversation --------------------------------------------------------

    def _send(self, command: int, family: int, flags: int, attrs: bytes) -> int:
        self.seq += 1
        body = struct.pack("=BBH", family, NFNETLINK_V0, 0) + attrs
        header = _NLMSGHDR.pack(16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | command,
                                NLM_F_REQUEST | flags, self.seq, 0)
        self.sock.send(header + body)
        return self.seq

    def _replies(self, command: int, family: int, flags: int, attrs: bytes, what: str):
        """Yield (buffer, attributes start, end) of each reply; the buffer is reused.

        A dump ends with NLMSG_DONE; a request sent with NLM_F_ACK (several
        single replies) ends with the acknowledgement; any other after its reply.
        ``ended_apart``: the dump's end came in a message of its own after one the kernel
        could have cut for room (``could_be_cut``), so no rule vouches that none was skipped
        after the last one (``NftDumpTorn``); the caller asks ``vouch``.
        """
        until_ack = bool(flags & NLM_F_ACK)
        seq = self._send(command, family, flags, attrs)
        buf = self.buf
        self.ended_apart = cut = False
        try:
            while True:
                size = self.sock.recv_into(buf, 0, socket.MSG_TRUNC)
                if size == 0:
                    raise NftConversationError(f"the kernel closed the netlink conversation ({what})")
                if size > len(buf):
                    raise NftReadError(f"a {size}-byte nf_tables message does not fit the receive buffer")
                after_cut, cut = cut, could_be_cut(size)
                offset = 0
                while offset + 16 <= size:
                    length, msg_type, msg_flags, msg_seq, _ = _NLMSGHDR.unpack_from(buf, offset)
                    if length < 16 or offset + length > size:
                        raise NftReadError("malformed netlink message from the kernel (bad length)")
                    start, end = offset + 16, offset + length
                    offset += (length + 3) & ~3
                    if msg_seq != seq:
                        continue
                    if msg_type in (NLMSG_ERROR, NLMSG_DONE):
                        code = -struct.unpack_from("=i", buf, start)[0] if end - start >= 4 else 0
                        if code > 0:
                            raise NftReadError(_error_text(code, what), code)
                        self.ended_apart = after_cut and start == 16
                        return
                    yield buf, start + 4, end  # past nfgenmsg
                    if not msg_flags & NLM_F_MULTI and not until_ack:
                        return
        except (struct.error, OSError) as err:
            raise _socket_error(err, self.timeout, what) from None

    # -- requests ----------------------------------------------------------------

    def generation(self) -> int:
        """The ruleset generation id: every committed nf_tables change bumps it."""
        for buf, start, end in self._replies(NFT_MSG_GETGEN, socket.AF_UNSPEC, 0, b"", "the ruleset generation"):
            for s, e, t in _attrs(buf, start, end):
                if t == NFTA_GEN_ID and e - s >= 4:
                    return _BE32.unpack_from(buf, s)[0]
        raise NftReadError("the kernel's generation answer has no id")

    def table(self, family: int, name: str) -> Table | None:
        """The table's handle (a new one each time the table is created), or None if absent."""
        attrs = _nla(NFTA_TABLE_NAME, name.encode() + b"\0")
        try:
            for buf, start, end in self._replies(NFT_MSG_GETTABLE, family, 0, attrs, f"table {name}"):
                for s, e, t in _attrs(buf, start, end):
                    if t == NFTA_TABLE_HANDLE:
                        return Table(name, _BE64.unpack_from(buf, s)[0])
        except NftReadError as err:
            if err.errno == errno.ENOENT:
                return None
            raise
        raise NftReadError(f"the kernel's answer for table {name} has no handle")

    def chain_exists(self, family: int, table: str, name: str) -> bool:
        """Whether ``table`` has chain ``name`` (one get, not a dump of every chain)."""
        attrs = _nla(NFTA_CHAIN_TABLE, table.encode() + b"\0") + _nla(NFTA_CHAIN_NAME, name.encode() + b"\0")
        try:
            for _ in self._replies(NFT_MSG_GETCHAIN, family, 0, attrs, f"chain {name} of table {table}"):
                return True
        except NftReadError as err:
            if err.errno == errno.ENOENT:
                return False
            raise
        return False

    def chains(self, family: int, table: str) -> list[Chain]:
        return self.chains_by_table(family, (table,)).get(table, [])

    def chains_by_table(self, family: int, tables: tuple[str, ...]) -> dict[str, list[Chain]]:
        """The chains of ``tables`` (of one family), from one dump: the kernel dumps the
        chains of every table of the family whatever the request names."""
        wanted = {name.encode() + b"\0": name for name in tables}
        out: dict[str, list[Chain]] = {}
        unpack = _NLA.unpack_from
        for buf, start, end in self._replies(NFT_MSG_GETCHAIN, family, NLM_F_DUMP, b"", "the chains"):
            name, handle, table, base = "", 0, None, False
            offset = start
            while offset + 4 <= end:  # flat, not _attrs(): a large table has ~60,000 chains
                alen, t = unpack(buf, offset)
                if alen < 4 or offset + alen > end:
                    raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
                s, e, t = offset + 4, offset + alen, t & 0x3FFF
                offset += (alen + 3) & ~3
                if t == NFTA_CHAIN_TABLE:
                    raw_table = bytes(buf[s:e])
                    table = wanted.get(raw_table) or wanted.get(raw_table.rstrip(b"\0") + b"\0")
                elif t == NFTA_CHAIN_NAME:
                    name = sys.intern(_string(buf, s, e))  # jumps to it share this str (_verdict)
                elif t == NFTA_CHAIN_HANDLE:
                    handle = _BE64.unpack_from(buf, s)[0]
                elif t == NFTA_CHAIN_HOOK:
                    base = True
            if table is not None:
                out.setdefault(table, []).append(Chain(name, handle, base))
        return out

    def sets(self, family: int, table: str) -> tuple[list[SetInfo], int]:
        """Every named set of the table, and how many anonymous ones (``__set%d``/``__map%d``) it has."""
        out = []
        anonymous = 0
        attrs = _nla(NFTA_SET_TABLE, table.encode() + b"\0")
        for buf, start, end in self._replies(NFT_MSG_GETSET, family, NLM_F_DUMP, attrs, "the sets"):
            info = _set_info(buf, start, end)
            if info is None:
                anonymous += 1  # read with the rule that owns it
            elif info.name:
                out.append(info)
        return out, anonymous

    def set_info(self, family: int, table: str, name: str) -> SetInfo | None:
        """One named set (a get, not a dump of every set), or None when there is none."""
        attrs = _nla(NFTA_SET_TABLE, table.encode() + b"\0") + _nla(NFTA_SET_NAME, name.encode() + b"\0")
        try:
            for buf, start, end in self._replies(NFT_MSG_GETSET, family, 0, attrs, f"set {name}"):
                return _set_info(buf, start, end)
        except NftReadError as err:
            if err.errno == errno.ENOENT:
                return None
            raise
        return None

    def elements(self, family: int, table: str, set_name: str,
                 known: dict[bytes, Element] | None = None) -> list[Element]:
        """The elements of one set. ``known`` (raw element bytes -> Element) skips
        decoding elements already seen; the caller owns it and it is filled here."""
        attrs = (_nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                 + _nla(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        out = []
        unpack = _NLA.unpack_from
        for buf, start, end in self._replies(NFT_MSG_GETSETELEM, family, NLM_F_DUMP, attrs,
                                             f"the elements of set {set_name}"):
            # Flat loops, not _attrs(): a first read walks ~10,000 such messages.
            offset = start
            while offset + 4 <= end:
                alen, t = unpack(buf, offset)
                if alen < 4 or offset + alen > end:
                    raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
                s, e = offset + 4, offset + alen
                offset += (alen + 3) & ~3
                if t & 0x3FFF != NFTA_SET_ELEM_LIST_ELEMENTS:
                    continue
                while s + 4 <= e:
                    elen, et = unpack(buf, s)
                    if elen < 4 or s + elen > e:
                        raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
                    es, ee = s + 4, s + elen
                    s += (elen + 3) & ~3
                    if et & 0x3FFF != NFTA_LIST_ELEM:
                        continue
                    if known is not None:
                        raw = bytes(buf[es:ee])
                        element = known.get(raw)
                        if element is None:
                            element = known[raw] = _element(buf, es, ee)
                    else:
                        element = _element(buf, es, ee)
                    out.append(element)
        return out

    def elements_by_keys(self, family: int, table: str, set_name: str, keys: list[bytes]) -> list[Element]:
        """The elements of ``keys`` in one set, asked for by key rather than dumped.

        For a ``numgen random mod N`` map the keys are 0..N-1. A get costs the
        kernel one look-up of the set by name, where a dump walks the table's set
        list twice more (once per dump call) to find its place again.
        """
        items = b"".join(_nla(NFTA_LIST_ELEM | NLA_F_NESTED,
                              _nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _nla(NFTA_DATA_VALUE, key)))
                         for key in keys)
        attrs = (_nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                 + _nla(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
                 + _nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, items))
        out = []
        for buf, start, end in self._replies(NFT_MSG_GETSETELEM, family, NLM_F_ACK, attrs,
                                             f"the elements of set {set_name}"):
            for s, e, t in _attrs(buf, start, end):
                if t == NFTA_SET_ELEM_LIST_ELEMENTS:
                    for es, ee, et in _attrs(buf, s, e):
                        if et == NFTA_LIST_ELEM:
                            out.append(_element(buf, es, ee))
        return out

    def rules(self, family: int, table: str, known: dict[int, Rule] | None = None,
              order: list[str] | None = None) -> tuple[list[Rule], int]:
        """Every rule of the table, in chain order, and how many were decoded anew.

        A rule's expressions never change under its handle (a rewritten rule gets
        a new one), so ``known`` (handle -> Rule: a table numbers its rules from one
        counter; owned by the caller and filled here) lets a re-read decode only the
        rules that are new.
        """
        return self.each_rule(family, table, rule_decoder(family), known, known, by_handle=True, order=order)

    def chain_rules(self, family: int, table: str, chain: str) -> tuple[list[Rule] | None, int]:
        """One chain's rules decoded as ``rules`` does (None: no such chain), and how many."""
        for _chain, rules, decoded in self.each_chain_rules(family, table, [chain], rule_decoder(family)):
            return rules, decoded
        raise AssertionError("unreachable: one dump asked for, one answered")

    def each_rule(self, family: int, table: str, decode, known: dict | None = None,
                  seen: dict | None = None, by_handle: bool = False,
                  order: list[str] | None = None) -> tuple[list, int]:
        """``decode(buf, chain, handle, exprs, udata)`` of every rule of the table, in chain
        order (``exprs``/``udata``: (start, end) in ``buf``, or None), and how many rules
        were decoded anew. ``known`` ((chain, handle) -> decoded; with ``by_handle``,
        handle -> decoded, whose ``.chain`` is checked: one tuple less per rule) is looked
        up first; ``seen`` (may be ``known`` itself) gets every rule of this dump.

        A dump of a whole table costs the kernel a walk from its first rule again for
        every message it fills (about 30 KB each): quadratic in the rules of a large
        table. One dump per chain walks only that chain (``each_chain_rules``).

        ``NftDumpTorn`` when the dump is not the table's lists as they stand; ``order``:
        the table's chains in the kernel's order (``chains``), else asked for when needed."""
        for _chain, rules, decoded, doubtful in self._rule_dumps(family, table, [None], decode, known, seen,
                                                                 by_handle):
            if doubtful:
                self.vouch(family, table, doubtful, order or [c.name for c in self.chains(family, table)])
            return rules, decoded
        raise AssertionError("unreachable: one dump asked for, one answered")

    def each_chain_rules(self, family: int, table: str, chain_names, decode,
                         ) -> Iterator[tuple[str, list | None, int]]:
        """(chain, its rules decoded as ``each_rule`` does, how many) of each of
        ``chain_names``, one dump per chain; rules None for a chain gone since it was named.
        ``NftDumpTorn`` when a dump is not its chain's list as it stands."""
        for chain, rules, decoded, doubtful in self._rule_dumps(family, table, chain_names, decode, None, None,
                                                                False):
            if doubtful:
                self.vouch(family, table, doubtful, [chain])
            yield chain, rules, decoded

    def vouch(self, family: int, table: str, doubtful: list, order: list[str]) -> None:
        """The boundaries between a dump's messages that no rule's position vouched for
        (the next message began a chain, or held no rule), checked: the chains a resumed
        dump could have skipped are dumped again, the one before the boundary must hold
        the same rules, those between it and the next one dumped none. Only after a message
        the kernel could have cut for room (``could_be_cut``) that ends at a chain's end:
        rare: a table's dump or a large chain's, cut where a chain ends. A dump torn there
        twice alike is beyond reach."""
        at = {name: i for i, name in enumerate(order)}
        for chain, handles, after in doubtful:
            first, stop = at.get(chain), at.get(after) if after is not None else len(order)
            if first is None or stop is None or stop <= first:
                raise NftDumpTorn(f"the rule dump met chain {chain}, then {after or 'its end'}, "
                                  "not in the order the kernel lists them (a transaction under it)")
            names = order[first:stop]
            for name, again, _, _ in self._rule_dumps(family, table, names, _handle_only, None, None, False):
                if (again or []) != (handles if name == chain else []):
                    raise NftDumpTorn(f"the dump of chain {chain} was torn by a transaction (resumed at "
                                      f"{'chain ' + after if after else 'its end'}, rules of chain {name} unseen)")

    def _rule_dumps(self, family: int, table: str, chain_names, decode, known: dict | None, seen: dict | None,
                    by_handle: bool) -> Iterator[tuple[str | None, list | None, int, list]]:
        """One rule dump per name of ``chain_names`` (None: the whole table), in turn on this
        socket: (chain, rules, decoded, the boundaries ``vouch`` checks); ``NftDumpTorn``
        when a rule's position (the handle of the rule before it) is not the rule dumped
        before it. A flat loop: at 10,000 Services a first read makes ~60,000 of them, and the
        generator, attribute and request building of ``_replies`` per dump was a third of
        the reader's own time."""
        prefix = struct.pack("=BBH", family, NFNETLINK_V0, 0) + _nla(NFTA_RULE_TABLE, table.encode() + b"\0")
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE
        request_flags = NLM_F_REQUEST | NLM_F_DUMP
        pack_header, unpack_header, unpack = _NLMSGHDR.pack, _NLMSGHDR.unpack_from, _NLA.unpack_from
        unpack_be64, unpack_error = _BE64.unpack_from, _ERRNO.unpack_from
        send, recv_into, buf = self.sock.send, self.sock.recv_into, self.buf
        capacity = len(buf)
        chains: dict[bytes, str] = {}  # one str per chain name, not one per rule
        what = "the rules"
        try:
            for chain_name in chain_names:
                body = prefix
                if chain_name is not None:
                    what = f"the rules of chain {chain_name}"
                    body += _nla(NFTA_RULE_CHAIN, chain_name.encode() + b"\0")
                self.seq += 1
                seq = self.seq
                send(pack_header(16 + len(body), msg_type, request_flags, seq, 0) + body)
                out = []
                decoded = 0
                # The rule before the next one (its handle is the next one's position), the
                # first tear met (the dump is read to its end: the socket serves the next),
                # and the boundaries between messages no position vouches for.
                last_chain, previous, tear, doubtful = chain_name or "", 0, None, []
                handles: list[int] = []  # of the rules of last_chain so far
                cut = False  # the message before could have left a rule out for want of room (none yet)
                while True:
                    size = recv_into(buf, 0, socket.MSG_TRUNC)
                    if size == 0:
                        raise NftConversationError(f"the kernel closed the netlink conversation ({what})")
                    if size > capacity:
                        raise NftReadError(f"a {size}-byte nf_tables message does not fit the receive buffer")
                    offset = 0
                    finished = False
                    first, cut = cut, could_be_cut(size)  # first: the next rule begins a resumed part
                    while offset + 16 <= size:
                        length, msg_kind, _flags, msg_seq, _ = unpack_header(buf, offset)
                        if length < 16 or offset + length > size:
                            raise NftReadError("malformed netlink message from the kernel (bad length)")
                        start, end = offset + 20, offset + length  # past the header and nfgenmsg
                        offset += (length + 3) & ~3
                        if msg_seq != seq:
                            continue
                        if msg_kind == NLMSG_ERROR or msg_kind == NLMSG_DONE:
                            code = -unpack_error(buf, start - 4)[0] if end - start >= 0 else 0
                            if code == errno.ENOENT and chain_name is not None:
                                out = None
                            elif code > 0:
                                raise NftReadError(_error_text(code, what), code)
                            elif first and last_chain:
                                doubtful.append((last_chain, handles, None))  # resumed past its end?
                            finished = True
                            break
                        chain, handle, position, exprs, udata = chain_name or "", 0, 0, None, None
                        attr = start
                        while attr + 4 <= end:  # flat: a large table has tens of thousands of rules
                            alen, t = unpack(buf, attr)
                            if alen < 4 or attr + alen > end:
                                raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
                            s, e, t = attr + 4, attr + alen, t & 0x3FFF
                            attr += (alen + 3) & ~3
                            if t == NFTA_RULE_CHAIN:
                                if chain_name is not None:
                                    continue  # asked for one chain: no name to decode per rule
                                raw_chain = bytes(buf[s:e])
                                chain = chains.get(raw_chain)
                                if chain is None:
                                    chain = chains[raw_chain] = _string(buf, s, e)
                            elif t == NFTA_RULE_HANDLE:
                                handle = unpack_be64(buf, s)[0]
                            elif t == NFTA_RULE_POSITION:
                                position = unpack_be64(buf, s)[0]
                            elif t == NFTA_RULE_EXPRESSIONS:
                                exprs = (s, e)
                            elif t == NFTA_RULE_USERDATA:
                                udata = (s, e)
                        if chain is not last_chain:  # a whole table's dump: the next chain
                            if first and not position and last_chain:
                                doubtful.append((last_chain, handles, chain))  # resumed at a chain's start
                            last_chain, previous, handles = chain, 0, []
                        first = False
                        if position != previous and tear is None:
                            tear = torn(chain, handle, position, previous)
                        previous = handle
                        handles.append(handle)
                        key = handle if by_handle else (chain, handle)
                        rule = known.get(key) if known else None
                        if rule is not None and by_handle and rule.chain != chain:
                            rule = None  # a handle of a deleted rule reused in another chain
                        if rule is None:
                            rule = decode(buf, chain, handle, exprs, udata)
                            decoded += 1
                        if seen is not None:
                            seen[key] = rule
                        out.append(rule)
                    if finished:
                        break
                if tear is not None:
                    raise tear
                yield chain_name, out, decoded, doubtful
        except (struct.error, OSError) as err:
            raise _socket_error(err, self.timeout, what) from None


def rule_decoder(family: int):
    """``decode(buf, chain, handle, exprs, udata) -> Rule`` for ``each_rule`` and friends."""
    def decode(buf, chain: str, handle: int, exprs, udata) -> Rule:
        raw = bytes(buf[exprs[0]:exprs[1]]) if exprs else b""
        if _ACTING_EXPRESSIONS.search(raw) is None and _CMP_EXPRESSION in raw:
            # Only matches then a verdict (``ip daddr X ip saddr != CIDR jump
            # mark-for-masquerade``, half of a large table's rules): a conditional
            # rule that sends no traffic anywhere a reader follows.
            return Rule(chain, handle, None, True, None, None, (), (), False, None)
        return _rule(buf, chain, handle, exprs, udata, family)

    return decode


def _set_info(buf, start: int, end: int) -> SetInfo | None:
    """A set's description from a GETSET answer; None for an anonymous one (``__set%d``)."""
    name, handle, flags, key_len, data_len, timeout = "", 0, 0, 0, 0, None
    for s, e, t in _attrs(buf, start, end):
        if t == NFTA_SET_NAME:
            if buf[s:s + 2] == b"__":
                return None
            name = _string(buf, s, e)
        elif t == NFTA_SET_HANDLE:
            handle = _BE64.unpack_from(buf, s)[0]
        elif t == NFTA_SET_FLAGS:
            flags = _BE32.unpack_from(buf, s)[0]
        elif t == NFTA_SET_KEY_LEN:
            key_len = _BE32.unpack_from(buf, s)[0]
        elif t == NFTA_SET_DATA_LEN:
            data_len = _BE32.unpack_from(buf, s)[0]
        elif t == NFTA_SET_TIMEOUT:
            timeout = _BE64.unpack_from(buf, s)[0]
    return SetInfo(name, handle, flags, key_len, data_len, timeout)


def element_of(raw: bytes) -> Element:
    """One element from its attributes (an NFTA_LIST_ELEM's payload, as a dump or the
    change feed's NEWSETELEM/DELSETELEM carries it): the dumps' own decoder."""
    return _element(raw, 0, len(raw))


def _element(buf, start: int, end: int) -> Element:
    key, data, flags, comment = b"", None, 0, None
    unpack = _NLA.unpack_from
    offset = start
    while offset + 4 <= end:
        alen, t = unpack(buf, offset)
        if alen < 4 or offset + alen > end:
            raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
        s, e, t = offset + 4, offset + alen, t & 0x3FFF
        offset += (alen + 3) & ~3
        if t == NFTA_SET_ELEM_KEY:
            value = _data(buf, s, e)
            key = value if isinstance(value, bytes) else b""
        elif t == NFTA_SET_ELEM_DATA:
            data = _data(buf, s, e)
        elif t == NFTA_SET_ELEM_FLAGS and e - s >= 4:
            flags = _BE32.unpack_from(buf, s)[0]
        elif t == NFTA_SET_ELEM_USERDATA:
            comment = _comment(buf, s, e)
    return Element(key, data, flags, comment)


class _ExprFields:
    """One expression's attributes: call it for a big-endian u32, .text() for a string."""

    __slots__ = ("buf", "fields")

    def __init__(self, buf, fields: dict[int, tuple[int, int]]) -> None:
        self.buf, self.fields = buf, fields

    def __call__(self, attr: int) -> int | None:
        where = self.fields.get(attr)
        return _BE32.unpack_from(self.buf, where[0])[0] if where and where[1] - where[0] >= 4 else None

    def text(self, attr: int) -> str:
        where = self.fields.get(attr)
        return _string(self.buf, *where) if where else ""


def _rule(buf, chain: str, handle: int, exprs: tuple[int, int] | None,
          udata: tuple[int, int] | None, family: int) -> Rule:
    """Decode one rule's expressions into the facts a ``Rule`` keeps.

    Registers are followed only as far as DNAT needs: which immediate value or
    which map lookup filled the register a ``nat`` expression reads its address
    and port from.
    """
    verdict = None
    conditional = rejects = False
    dnat = vmap = None
    lookups: list[str] = []
    updates: list[str] = []
    unknown: list[str] = []
    registers: dict[int, tuple] = {}
    modulus = None
    for s, e, t in _attrs(buf, *exprs) if exprs else ():
        if t != NFTA_LIST_ELEM:
            continue
        name, data = b"", (e, e)
        for ps, pe, pt in _attrs(buf, s, e):
            if pt == NFTA_EXPR_NAME:
                name = bytes(buf[ps:pe]).rstrip(b"\0")
            elif pt == NFTA_EXPR_DATA:
                data = (ps, pe)
        if name in MATCHING_EXPRESSIONS:
            conditional = True
            continue
        if name not in _DECODED_EXPRESSIONS:
            continue  # meta, payload, numgen, counter, ...: nothing a reader follows
        fields = {pt: (ps, pe) for ps, pe, pt in _attrs(buf, *data)}
        u32 = _ExprFields(buf, fields)
        if name == b"immediate":
            dreg = u32(NFTA_IMMEDIATE_DREG)
            where = fields.get(NFTA_IMMEDIATE_DATA)
            value = _data(buf, *where) if where else None
            if dreg == NFT_REG_VERDICT and isinstance(value, Verdict):
                verdict = value
            elif dreg is not None:
                registers[dreg] = ("value", value)
        elif name == b"lookup":
            set_name = u32.text(NFTA_LOOKUP_SET)
            dreg = u32(NFTA_LOOKUP_DREG)
            if dreg is None:
                conditional = True
                lookups.append(set_name)
            elif dreg == NFT_REG_VERDICT:
                vmap = set_name
            else:
                registers[dreg] = ("map", set_name)
        elif name == b"dynset":
            updates.append(u32.text(NFTA_DYNSET_SET_NAME))
        elif name == b"reject":
            rejects = True
        elif name == b"numgen":
            modulus = u32(NFTA_NG_MODULUS)
        elif name == b"nat":
            if u32(NFTA_NAT_TYPE) != NFT_NAT_DNAT:
                continue  # snat/masquerade: not where traffic goes
            addr = registers.get(u32(NFTA_NAT_REG_ADDR_MIN))
            port = registers.get(u32(NFTA_NAT_REG_PROTO_MIN)) if NFTA_NAT_REG_PROTO_MIN in fields else None
            if addr is None:
                unknown.append("dnat without an address register this reader follows")
            elif addr[0] == "map":
                dnat = ("map", addr[1], u32(NFTA_NAT_FAMILY) or family)
            else:
                dnat = ("value", addr[1], port[1] if port and port[0] == "value" else None)
    comment = _comment(buf, *udata) if udata else None
    return Rule(chain, handle, verdict, conditional, dnat, vmap, tuple(lookups), tuple(updates),
                rejects, comment, tuple(unknown), modulus)
