"""Headers of every ipset, read over netlink (never the members, never `ipset`).

One NETLINK_NETFILTER socket per read: ask the kernel's ipset protocol version
(IPSET_CMD_PROTOCOL), then dump IPSET_CMD_LIST with the list-header flag, which
makes the kernel send one small message per set carrying its header (type,
family, hashsize/maxelem or range or size, entry count, memory, references)
and no members. At 2,000 sets that is ~300 KB over a handful of recv calls.

The parser walks attributes with precompiled ``struct`` unpacks on one receive
buffer and keeps only the attributes it needs: pyroute2's generic message
objects cost ~30x more than the dump itself at this scale (lab.md).

The socket lives in the network namespace of the thread that opens it, so
reading another namespace's sets is a matter of calling ``read_headers`` from a
thread that has joined it (tests do so).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import NamedTuple

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

_RECV_BUFFER = 1 << 16  # the kernel fills at most ~32 KB per dump datagram


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
        sock.settimeout(timeout)
        sock.bind((0, 0))
        conversation = _Conversation(sock, timeout)
        protocol = conversation.negotiate()
        return conversation.dump_headers(protocol)
    except socket.timeout:
        raise IpsetReadError(f"no answer from the kernel's ipset netlink within {timeout:g} s") from None
    except OSError as err:
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
    return f"the kernel refused the ipset request: {os.strerror(code)}"


class _Conversation:
    def __init__(self, sock: socket.socket, timeout: float) -> None:
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
            size = self.sock.recv_into(buf)
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
                    code = -_I32.unpack_from(buf, start)[0]
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
        for _, _, start, end in self._messages(seq):
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
        list_type = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST
        out: list[IpsetHeader] = []
        for msg_type, _, start, end in self._messages(seq):
            if msg_type == list_type:
                header = _parse_set(self.buf, start + _NFGENMSG_LEN, end)
                if header is not None:
                    out.append(header)
        return out


def _parse_set(buf: bytearray, offset: int, end: int) -> IpsetHeader | None:
    """One IPSET_CMD_LIST message: top-level attributes, then the DATA nest."""
    unpack_nla = _NLA.unpack_from
    name = type_name = ""
    revision = family = 0
    data_start = data_end = 0
    while offset + 4 <= end:
        alen, atype = unpack_nla(buf, offset)
        if alen < 4 or offset + alen > end:
            raise IpsetReadError("malformed ipset netlink message (bad attribute length)")
        atype &= NLA_TYPE_MASK
        if atype == IPSET_ATTR_SETNAME:
            name = buf[offset + 4:offset + alen].split(b"\0", 1)[0].decode("ascii", "replace")
        elif atype == IPSET_ATTR_TYPENAME:
            type_name = buf[offset + 4:offset + alen].split(b"\0", 1)[0].decode("ascii", "replace")
        elif atype == IPSET_ATTR_DATA:
            data_start, data_end = offset + 4, offset + alen
        elif atype == IPSET_ATTR_REVISION:
            revision = buf[offset + 4]
        elif atype == IPSET_ATTR_FAMILY:
            family = buf[offset + 4]
        offset += (alen + 3) & ~3
    if not name:
        return None  # not a set header (nothing else is sent with the header flag)

    unpack_be32 = _BE32.unpack_from
    entries = memsize = references = 0
    hashsize = maxelem = size = None
    first = last = None  # bitmap range bounds (addresses or ports)
    netmask = 32
    offset = data_start
    while offset + 4 <= data_end:
        alen, atype = unpack_nla(buf, offset)
        if alen < 4 or offset + alen > data_end:
            raise IpsetReadError("malformed ipset netlink message (bad data attribute length)")
        atype &= NLA_TYPE_MASK
        value_at = offset + 4
        if alen >= 8:
            if atype == IPSET_ATTR_ELEMENTS:
                entries = unpack_be32(buf, value_at)[0]
            elif atype == IPSET_ATTR_MEMSIZE:
                memsize = unpack_be32(buf, value_at)[0]
            elif atype == IPSET_ATTR_REFERENCES:
                references = unpack_be32(buf, value_at)[0]
            elif atype == IPSET_ATTR_MAXELEM:
                maxelem = unpack_be32(buf, value_at)[0]
            elif atype == IPSET_ATTR_HASHSIZE:
                hashsize = unpack_be32(buf, value_at)[0]
            elif atype == IPSET_ATTR_SIZE:
                size = unpack_be32(buf, value_at)[0]
            elif atype == IPSET_ATTR_IP:
                first = _ipv4_in(buf, value_at, offset + alen)
            elif atype == IPSET_ATTR_IP_TO:
                last = _ipv4_in(buf, value_at, offset + alen)
        elif atype == IPSET_ATTR_PORT and alen >= 6:
            first = _BE16.unpack_from(buf, value_at)[0]
        elif atype == IPSET_ATTR_PORT_TO and alen >= 6:
            last = _BE16.unpack_from(buf, value_at)[0]
        elif atype == IPSET_ATTR_NETMASK and alen >= 5:
            netmask = buf[value_at]
        offset += (alen + 3) & ~3

    if maxelem is not None:
        max_entries = maxelem
    elif size is not None:
        max_entries = size
    elif first is not None and last is not None and last >= first:
        # bitmap:ip stores one bit per netmask-sized block of its range.
        max_entries = ((last - first) >> (32 - netmask if type_name == "bitmap:ip" else 0)) + 1
    else:
        max_entries = None
    return IpsetHeader(name, type_name, revision, FAMILIES.get(family, ""), entries, memsize,
                       references, max_entries, hashsize)


def _ipv4_in(buf: bytearray, offset: int, end: int) -> int | None:
    """The IPv4 address inside a nested IPSET_ATTR_IP/IP_TO (bitmap ranges are IPv4 only)."""
    if offset + 8 <= end:
        alen, atype = _NLA.unpack_from(buf, offset)
        if atype & NLA_TYPE_MASK == IPSET_ATTR_IPADDR_IPV4 and alen >= 8:
            return _BE32.unpack_from(buf, offset + 4)[0]
    return None
