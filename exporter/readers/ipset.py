"""Headers of every ipset, read over netlink (never the members, never `ipset`).

One NETLINK_NETFILTER socket per read: ask the kernel's ipset protocol version
(IPSET_CMD_PROTOCOL), then dump IPSET_CMD_LIST with the list-header flag, which
makes the kernel send one small message per set carrying its header (type,
family, hashsize/maxelem or range or size, entry count, memory, references)
and no members. The kernel puts one set in each datagram, so 2,000 sets are
2,000 receive calls of ~150 bytes: the receive loop is kept flat.

Parsing is struct unpacks on one reusable receive buffer, no per-attribute
objects: pyroute2's generic messages cost ~15x `ipset list -t` at this scale
(lab.md, bench/bench_ipset.py). Messages of a shape already seen (same type,
options and name length: most of a node's thousands of sets) are read with a
learned layout of three precompiled unpacks, checked against the message's
attribute headers; anything else is walked attribute by attribute.

The socket lives in the network namespace of the thread that opens it, so
reading another namespace's sets is a matter of calling ``read_headers`` from a
thread that has joined it (tests do so).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterator, NamedTuple

# <linux/netlink.h>
NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# <linux/netfilter/nfnetlink.h>
NFNL_SUBSYS_IPSET = 6
NFNETLINK_V0 = 0

# <linux/netfilter/ipset/ip_set.h>
IPSET_PROTOCOL = 7  # the newest this parser knows
IPSET_PROTOCOL_MIN = 6  # the oldest it accepts (the only one of kernels before 5.x)
IPSET_CMD_PROTOCOL = 1
IPSET_CMD_LIST = 7
IPSET_FLAG_LIST_HEADER = 1 << 2
IPSET_ERR_PROTOCOL = 4097  # ipset's own error codes start at 4096
# Top-level attributes.
IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_TYPENAME = 3
IPSET_ATTR_REVISION = 4
IPSET_ATTR_FAMILY = 5
IPSET_ATTR_FLAGS = 6
IPSET_ATTR_DATA = 7
IPSET_ATTR_PROTOCOL_MIN = 10
# Attributes nested in IPSET_ATTR_DATA (create/list data).
IPSET_ATTR_IP = 1  # nested: IPSET_ATTR_IPADDR_IPV4 / _IPV6
IPSET_ATTR_IP_TO = 2
IPSET_ATTR_PORT = 4
IPSET_ATTR_PORT_TO = 5
IPSET_ATTR_HASHSIZE = 18
IPSET_ATTR_MAXELEM = 19
IPSET_ATTR_NETMASK = 20
IPSET_ATTR_SIZE = 23
IPSET_ATTR_ELEMENTS = 24
IPSET_ATTR_REFERENCES = 25
IPSET_ATTR_MEMSIZE = 26
IPSET_ATTR_IPADDR_IPV4 = 1

FAMILIES = {2: "inet", 10: "inet6"}  # NFPROTO_IPV4, NFPROTO_IPV6; bitmap and list types have none

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLA = struct.Struct("=HH")  # len, type
_NFGENMSG_LEN = 4
_I32 = struct.Struct("=i")
_BE32 = struct.Struct(">I")
_BE16 = struct.Struct(">H")

# The kernel sizes each dump datagram to the largest receive buffer seen (up to
# 32 KB) but puts one set header (~150 bytes) in it: a page-sized buffer (as
# libmnl's) keeps its allocations small. A cut datagram is detected (MSG_TRUNC).
_RECV_BUFFER = 4096


class IpsetHeader(NamedTuple):
    """One set's header, as `ipset list -t` prints it."""

    name: str
    type: str
    revision: int
    family: str  # "inet", "inet6", or "" for types without one (bitmap:port, list:set)
    entries: int
    memory_bytes: int
    references: int
    # hash types: maxelem; list:set: size; bitmap types: the slots of their range.
    max_entries: int | None
    hashsize: int | None  # hash types only


class IpsetReadError(Exception):
    """Reading the headers failed; the message is one line saying why."""

    def __init__(self, message: str, errno_: int = 0) -> None:
        super().__init__(message)
        self.errno = errno_


def read_headers(timeout: float = 5.0) -> list[IpsetHeader]:
    """Every set's header in the calling thread's network namespace, in the kernel's order."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_NETFILTER)
    except OSError as err:
        raise IpsetReadError(
            f"cannot open a netfilter netlink socket: {err.strerror} (no nfnetlink in this kernel?)",
            err.errno) from None
    try:
        # A kernel-side receive timeout, not settimeout(): Python's timeout
        # polls before every recv, a second syscall per set of the dump.
        seconds = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("@ll", seconds, int((timeout - seconds) * 1e6)))
        sock.bind((0, 0))
        conversation = _Conversation(sock)
        protocol = conversation.negotiate()
        return conversation.dump_headers(protocol)
    except struct.error:
        raise IpsetReadError("malformed ipset netlink message (shorter than its header says)") from None
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise IpsetReadError(f"no answer from the kernel's ipset netlink within {timeout:g} s") from None
        raise IpsetReadError(f"ipset netlink socket error: {err.strerror}", err.errno) from None
    finally:
        sock.close()


def _nla(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, attr_type) + payload + b"\0" * (-length % 4)


def _request(command: int, flags: int, seq: int, attrs: bytes) -> bytes:
    msg_type = (NFNL_SUBSYS_IPSET << 8) | command
    # nfgenmsg: family (AF_INET as `ipset` sends; the kernel ignores it), version, res_id.
    body = struct.pack("=BBH", socket.AF_INET, NFNETLINK_V0, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _error_text(code: int) -> str:
    if code == errno.EPERM:
        return "permission denied: listing ipsets over netlink needs CAP_NET_ADMIN in this network namespace"
    if code in (errno.EINVAL, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.ENOENT):
        return f"no ipset support in this kernel (ip_set module not loaded?): {os.strerror(code)}"
    if code == IPSET_ERR_PROTOCOL:
        return "the kernel's ipset speaks a protocol version this reader does not"
    return f"the kernel refused the ipset request: {os.strerror(code)}"


def _receive(recv_into, buf: bytearray) -> int:
    size = recv_into(buf, 0, socket.MSG_TRUNC)  # MSG_TRUNC: the real length, even if cut
    if not 0 < size <= len(buf):
        _receive_failed(size, len(buf))
    return size


def _receive_failed(size: int, capacity: int) -> None:
    if size == 0:
        raise IpsetReadError("the kernel closed the ipset netlink conversation without finishing it")
    raise IpsetReadError(f"an ipset netlink message of {size} bytes does not fit the {capacity}-byte buffer")


class _Conversation:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0
        self.buf = bytearray(_RECV_BUFFER)

    def _send(self, command: int, flags: int, attrs: bytes) -> int:
        self.seq += 1
        self.sock.send(_request(command, NLM_F_REQUEST | flags, self.seq, attrs))
        return self.seq

    def _messages(self, seq: int):
        """Yield (type, flags, payload start, end) of our replies until the last one.

        Stops after NLMSG_DONE, or after the first non-multipart reply; raises
        on NLMSG_ERROR with a non-zero code.
        """
        buf = self.buf
        unpack_hdr = _NLMSGHDR.unpack_from
        while True:
            size = _receive(self.sock.recv_into, buf)
            offset = 0
            while offset + 16 <= size:
                length, msg_type, flags, msg_seq, _ = unpack_hdr(buf, offset)
                if length < 16 or offset + length > size:
                    raise IpsetReadError("malformed netlink message from the kernel (bad length)")
                start, end = offset + 16, offset + length
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue  # a late answer to an earlier request on this socket
                if msg_type == NLMSG_ERROR:
                    code = -_I32.unpack_from(buf, start)[0] if end - start >= 4 else 0
                    if code:
                        raise IpsetReadError(_error_text(code), code)
                    return
                if msg_type == NLMSG_DONE:
                    code = -_I32.unpack_from(buf, start)[0] if end - start >= 4 else 0
                    if code > 0:
                        raise IpsetReadError(_error_text(code), code)
                    return
                yield msg_type, flags, start, end
                if not flags & NLM_F_MULTI:
                    return

    def negotiate(self) -> int:
        seq = self._send(IPSET_CMD_PROTOCOL, 0, _nla(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL])))
        kernel, kernel_min = None, None
        buf = self.buf
        try:
            replies = list(self._messages(seq))
        except IpsetReadError as err:
            if err.errno == IPSET_ERR_PROTOCOL:
                # Kernels before protocol 7 refuse any version but their own (6).
                return IPSET_PROTOCOL_MIN
            raise
        for _, _, start, end in replies:
            offset = start + _NFGENMSG_LEN
            while offset + 4 <= end:
                alen, atype = _NLA.unpack_from(buf, offset)
                if alen < 4:
                    break
                atype &= NLA_TYPE_MASK
                if atype == IPSET_ATTR_PROTOCOL and alen >= 5:
                    kernel = buf[offset + 4]
                elif atype == IPSET_ATTR_PROTOCOL_MIN and alen >= 5:
                    kernel_min = buf[offset + 4]
                offset += (alen + 3) & ~3
        if kernel is None:
            raise IpsetReadError("the kernel's ipset protocol answer has no version")
        if kernel_min is None:
            kernel_min = kernel  # kernels that speak one version only
        chosen = min(kernel, IPSET_PROTOCOL)
        if chosen < max(kernel_min, IPSET_PROTOCOL_MIN):
            raise IpsetReadError(
                f"kernel ipset protocol {kernel_min}..{kernel} not supported (this reader speaks "
                f"{IPSET_PROTOCOL_MIN}..{IPSET_PROTOCOL})")
        return chosen

    def dump_headers(self, protocol: int) -> list[IpsetHeader]:
        attrs = (_nla(IPSET_ATTR_PROTOCOL, bytes([protocol]))
                 + _nla(IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER, _BE32.pack(IPSET_FLAG_LIST_HEADER)))
        seq = self._send(IPSET_CMD_LIST, NLM_F_DUMP, attrs)
        # The kernel answers one set per datagram (ip_set_dump_do stops after
        # each set), so this loop runs ~once per set: kept flat, no generator.
        list_type = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST
        buf = self.buf
        recv_into = self.sock.recv_into
        capacity = len(buf)
        unpack_hdr = _NLMSGHDR.unpack_from
        parse = _parse_set
        types: dict[bytes, str] = {}
        out: list[IpsetHeader] = []
        while True:
            size = recv_into(buf, 0, socket.MSG_TRUNC)
            if not 0 < size <= capacity:
                _receive_failed(size, capacity)
            offset = 0
            while offset + 16 <= size:
                length, msg_type, _, msg_seq, _ = unpack_hdr(buf, offset)
                if length < 16 or offset + length > size:
                    raise IpsetReadError("malformed netlink message from the kernel (bad length)")
                start, end = offset + 16, offset + length
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if msg_type == list_type:
                    header = parse(buf, start + _NFGENMSG_LEN, end, types)
                    if header is not None:
                        out.append(header)
                elif msg_type == NLMSG_DONE or msg_type == NLMSG_ERROR:
                    code = -_I32.unpack_from(buf, start)[0] if end - start >= 4 else 0
                    if code > 0:
                        raise IpsetReadError(_error_text(code), code)
                    return out


def _parse_set(buf: bytearray, offset: int, end: int, types: dict[bytes, str]) -> IpsetHeader | None:
    """One IPSET_CMD_LIST message (its attributes span ``offset``..``end``).

    The kernel writes every set header of one type and options with the same
    attributes in the same order, so once a message of a given length and
    set-name length has been walked, the next such message is read with
    three precompiled unpacks instead of a Python loop over ~15 attributes.
    The first unpack returns every attribute header: the cached layout is used
    only if they are exactly the ones learned, so a different message never
    gets misread; it is walked instead. ``types`` caches decoded type names.
    """
    if end - offset >= 12:
        key = (end - offset, _LAYOUT_KEY.unpack_from(buf, offset))
        layout = _LAYOUTS.get(key)
        if layout is not None and layout.headers.unpack_from(buf, offset) == layout.expected:
            text = layout.text.unpack_from(buf, offset)
            name_at, type_at, revision_at, family_at = layout.text_where
            words = layout.words.unpack_from(buf, offset) + (0, None)
            type_raw = text[type_at]
            type_name = types.get(type_raw)
            if type_name is None:
                type_name = types[type_raw] = type_raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            name = text[name_at].split(b"\0", 1)[0].decode("utf-8", "replace")
            if not name:
                return None  # as the walk: no name, not a set header
            where = layout.where
            return IpsetHeader(name, type_name,
                               text[revision_at], FAMILIES.get(text[family_at], ""), words[where[0]],
                               words[where[1]], words[where[2]], words[where[3]], words[where[4]])
        if layout is None and key not in _LAYOUTS and len(_LAYOUTS) < _MAX_LAYOUTS:
            _LAYOUTS[key] = _learn_layout(buf, offset, end)
    return _walk_set(buf, offset, end, types)


def _attributes(buf: bytearray, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(offset, length, type without flags) of each attribute in ``offset``..``end``."""
    while offset + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, offset)
        if alen < 4 or offset + alen > end:
            raise IpsetReadError("malformed ipset netlink message (bad attribute length)")
        yield offset, alen, atype & 0x3FFF
        offset += (alen + 3) & ~3


def _walk_set(buf: bytearray, offset: int, end: int, types: dict[bytes, str]) -> IpsetHeader | None:
    """The general reading of one set header message, attribute by attribute."""
    name = ""
    type_raw = b""
    revision = family = 0
    data_start = data_end = 0
    for at, alen, atype in _attributes(buf, offset, end):
        if atype == IPSET_ATTR_DATA:
            data_start, data_end = at + 4, at + alen
        elif atype == IPSET_ATTR_SETNAME:
            name = buf[at + 4:at + alen].split(b"\0", 1)[0].decode("utf-8", "replace")
        elif atype == IPSET_ATTR_TYPENAME:
            type_raw = bytes(buf[at + 4:at + alen])
        elif atype == IPSET_ATTR_REVISION and alen >= 5:
            revision = buf[at + 4]
        elif atype == IPSET_ATTR_FAMILY and alen >= 5:
            family = buf[at + 4]
    if not name:
        return None  # not a set header (nothing else is sent with the header flag)
    type_name = types.get(type_raw)
    if type_name is None:
        type_name = types[type_raw] = type_raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    # Every 32-bit attribute of the nest goes into one dict (keyed by type);
    # bitmap ranges and netmask need their own handling.
    words: dict[int, int] = {}
    first = last = None
    netmask = 32
    for at, alen, atype in _attributes(buf, data_start, data_end):
        if alen == 8:
            words[atype] = _BE32.unpack_from(buf, at + 4)[0]
        elif atype == IPSET_ATTR_IP:
            first = _ipv4_in(buf, at + 4, at + alen)
        elif atype == IPSET_ATTR_IP_TO:
            last = _ipv4_in(buf, at + 4, at + alen)
        elif atype == IPSET_ATTR_PORT and alen == 6:
            first = _BE16.unpack_from(buf, at + 4)[0]
        elif atype == IPSET_ATTR_PORT_TO and alen == 6:
            last = _BE16.unpack_from(buf, at + 4)[0]
        elif atype == IPSET_ATTR_NETMASK and alen == 5:
            netmask = buf[at + 4]

    get = words.get
    max_entries = get(IPSET_ATTR_MAXELEM)
    if max_entries is None:
        max_entries = get(IPSET_ATTR_SIZE)
        if max_entries is None and first is not None and last is not None and last >= first:
            # bitmap:ip keeps one bit per netmask-sized block of its range.
            shift = 32 - netmask if type_name == "bitmap:ip" and 0 < netmask <= 32 else 0
            max_entries = ((last - first) >> shift) + 1
    return IpsetHeader(name, type_name, revision, FAMILIES.get(family, ""), get(IPSET_ATTR_ELEMENTS, 0),
                       get(IPSET_ATTR_MEMSIZE, 0), get(IPSET_ATTR_REFERENCES, 0), max_entries,
                       get(IPSET_ATTR_HASHSIZE))


class _Layout(NamedTuple):
    headers: struct.Struct  # every attribute header (native order), gaps skipped
    expected: tuple  # what ``headers`` must return for the layout to apply
    text: struct.Struct  # set name, type name (raw), revision, family, in message order
    text_where: tuple[int, int, int, int]  # name, type, revision, family in ``text``
    words: struct.Struct  # the kept 32-bit values (big-endian)
    where: tuple[int, int, int, int, int]  # entries, memory, references, max, hashsize in words+(0, None)


# (message length, its first two attribute headers) -> layout, or None where
# the walk is needed (bitmap ranges, a missing name). Keys vary with name
# length and type/options: dozens on a node; bounded anyway.
_LAYOUT_KEY = struct.Struct("=HH4xHH")
_LAYOUTS: dict[tuple, _Layout | None] = {}
_MAX_LAYOUTS = 1024
_KEPT_WORDS = (IPSET_ATTR_ELEMENTS, IPSET_ATTR_MEMSIZE, IPSET_ATTR_REFERENCES,
               IPSET_ATTR_MAXELEM, IPSET_ATTR_SIZE, IPSET_ATTR_HASHSIZE)
_RANGE_ATTRS = {IPSET_ATTR_IP, IPSET_ATTR_IP_TO, IPSET_ATTR_PORT, IPSET_ATTR_PORT_TO}


def _learn_layout(buf: bytearray, offset: int, end: int) -> _Layout | None:
    top = list(_attributes(buf, offset, end))
    nest = [attr for at, alen, atype in top if atype == IPSET_ATTR_DATA
            for attr in _attributes(buf, at + 4, at + alen)]
    top_types = [atype for _, _, atype in top]
    if (IPSET_ATTR_SETNAME not in top_types or IPSET_ATTR_TYPENAME not in top_types
            or top_types.count(IPSET_ATTR_DATA) != 1 or len(set(top_types)) != len(top_types)
            or _RANGE_ATTRS.intersection(atype for _, _, atype in nest)):
        return None

    def fmt(fields: list[tuple[int, str]]) -> str:
        """Struct format reading ``(offset, code)`` fields in order, skipping the gaps."""
        out, position = [], offset
        for at, code in fields:
            out.append(f"{at - position}x{code}" if at > position else code)
            position = at + struct.calcsize("=" + code)
        return "".join(out)

    attrs = sorted(top + nest)
    headers = struct.Struct("=" + fmt([(at, "HH") for at, _, _ in attrs]))
    text_fields = {atype: (at + 4, f"{alen - 4}s" if atype in (IPSET_ATTR_SETNAME, IPSET_ATTR_TYPENAME) else "B")
                   for at, alen, atype in top
                   if atype in (IPSET_ATTR_SETNAME, IPSET_ATTR_TYPENAME, IPSET_ATTR_REVISION, IPSET_ATTR_FAMILY)
                   and alen >= 5}
    text_order = sorted(text_fields.items(), key=lambda item: item[1][0])
    if len(text_order) != 4:
        return None  # no revision or family: rare enough to walk
    text = struct.Struct("=" + fmt([field for _, field in text_order]))
    position_of = {atype: i for i, (atype, _) in enumerate(text_order)}
    text_where = tuple(position_of[t] for t in (
        IPSET_ATTR_SETNAME, IPSET_ATTR_TYPENAME, IPSET_ATTR_REVISION, IPSET_ATTR_FAMILY))
    kept = [(at, atype) for at, alen, atype in nest if atype in _KEPT_WORDS and alen == 8]
    if len({atype for _, atype in kept}) != len(kept):
        return None
    words = struct.Struct(">" + fmt([(at + 4, "I") for at, _ in kept]))
    index = {atype: i for i, (_, atype) in enumerate(kept)}
    zero, none = len(kept), len(kept) + 1
    where = (index.get(IPSET_ATTR_ELEMENTS, zero), index.get(IPSET_ATTR_MEMSIZE, zero),
             index.get(IPSET_ATTR_REFERENCES, zero),
             index.get(IPSET_ATTR_MAXELEM, index.get(IPSET_ATTR_SIZE, none)),
             index.get(IPSET_ATTR_HASHSIZE, none))
    return _Layout(headers, headers.unpack_from(buf, offset), text, text_where, words, where)


def _ipv4_in(buf: bytearray, offset: int, end: int) -> int | None:
    """The IPv4 address inside a nested IPSET_ATTR_IP/IP_TO (bitmap ranges are IPv4 only)."""
    if offset + 8 <= end:
        alen, atype = _NLA.unpack_from(buf, offset)
        if atype & NLA_TYPE_MASK == IPSET_ATTR_IPADDR_IPV4 and alen >= 8:
            return _BE32.unpack_from(buf, offset + 4)[0]
    return None
