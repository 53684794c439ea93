"""Decoders of the xtables match and target info blobs kube-proxy's rules carry.

iptables-nft keeps what has no native nf_tables form as "compat" expressions
(``match name statistic rev 0``, ``target name DNAT rev 2``) whose NFTA_MATCH_INFO /
NFTA_TARGET_INFO payload is the very C struct iptables-legacy hands the kernel in
its ``ipt_entry`` blobs. The layouts are the kernel's uapi headers
(include/uapi/linux/netfilter/xt_*.h, nf_nat.h, netfilter_ipv4/ipt_REJECT.h,
netfilter_ipv6/ip6t_REJECT.h) on a 64-bit host: host byte order for counts,
flags and xt port ranges; network order for addresses and NAT ports. Each layout
was checked against what iptables 1.8.9 writes (tests/test_iptables_netlink.py).

Every decoder is a pure function of the bytes (and the address family where the
struct depends on it) and raises ``XtablesError`` on a blob too short for its
struct, so a caller can name the rule as not understood instead of guessing.
``decode_match`` / ``decode_target`` dispatch by name and revision; a name or
revision not known here comes back as ``Unknown``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

# -- shapes -------------------------------------------------------------------


class XtablesError(ValueError):
    """A blob shorter than its struct, or with values no iptables writes."""


class Unknown(NamedTuple):
    name: str
    revision: int


class Comment(NamedTuple):
    text: str


class Statistic(NamedTuple):
    mode: str  # "random" or "nth"
    probability: float | None  # random: as iptables prints it (%.11f)
    every: int | None  # nth
    packet: int | None
    inverted: bool


class Recent(NamedTuple):
    name: str
    modes: tuple[str, ...]  # of "rcheck", "set", "update", "remove" (as iptables' options)
    seconds: int  # 0: not given
    hit_count: int
    reap: bool
    rttl: bool
    side: str  # "rsource" or "rdest"
    inverted: bool
    mask: str | None  # rev 1: the address mask as text; None in rev 0


class Addrtype(NamedTuple):
    source: str | None  # "LOCAL", "LOCAL,UNICAST", ... (iptables' order); None when not matched
    source_inverted: bool
    dest: str | None
    dest_inverted: bool
    limit_iface: str | None  # "in"/"out" (--limit-iface-in/out), None if not limited


class Ports(NamedTuple):
    """tcp / udp / sctp: port ranges (lo, hi) as given; (0, 65535) is "any"."""

    protocol: str
    sport: tuple[int, int]
    dport: tuple[int, int]
    sport_inverted: bool
    dport_inverted: bool
    other: tuple[str, ...]  # options beyond ports that match (tcp flags/option, sctp chunks)


class Mark(NamedTuple):
    mark: int
    mask: int
    inverted: bool


class Nfacct(NamedTuple):
    name: str


class Conntrack(NamedTuple):
    """Its --ctstate only (what kube-proxy writes); any other test it makes is ``other``."""

    states: str | None  # "INVALID", "RELATED,ESTABLISHED,DNAT", ... in iptables' order
    inverted: bool
    other: bool  # tests besides the state (--ctstatus, --ctorigsrc, ...): not decoded


class NatRange(NamedTuple):
    """DNAT / MASQUERADE: address and port range, and flags beyond them."""

    min_addr: str | None  # None: not mapped (--to-destination :port, or MASQUERADE)
    max_addr: str | None
    min_port: int | None  # None: not given
    max_port: int | None
    flags: tuple[str, ...]  # "random", "persistent", "random-fully", ...

    def to_destination(self, family: int) -> str:
        """``--to-destination`` as iptables-save prints it: ``addr[-addr][:port[-port]]``,
        IPv6 addresses in brackets when a port follows."""
        addr = ""
        if self.min_addr is not None:
            addr = self.min_addr if self.max_addr == self.min_addr else f"{self.min_addr}-{self.max_addr}"
        if self.min_port is None:
            return addr
        if family == 6 and addr:
            addr = f"[{addr}]"
        port = str(self.min_port) if self.max_port == self.min_port else f"{self.min_port}-{self.max_port}"
        return f"{addr}:{port}"


class MarkTarget(NamedTuple):
    """MARK rev 2 (--set-xmark value/mask): ``mark = (mark & ~mask) ^ value``."""

    value: int
    mask: int

    @property
    def operation(self) -> str:
        """The iptables option this is: or-mark, xor-mark, and-mark, set-mark or set-xmark."""
        if self.value == self.mask and self.value:
            return f"--or-mark {self.value:#x}"
        if self.mask == 0:
            return f"--xor-mark {self.value:#x}"
        if self.value == 0:
            return f"--and-mark {~self.mask & 0xFFFFFFFF:#x}"
        if self.mask == 0xFFFFFFFF:
            return f"--set-mark {self.value:#x}"
        return f"--set-xmark {self.value:#x}/{self.mask:#x}"


class Reject(NamedTuple):
    with_: str  # icmp-port-unreachable, tcp-reset, ...


# -- helpers ------------------------------------------------------------------


def _need(blob: bytes, size: int, what: str) -> None:
    if len(blob) < size:
        raise XtablesError(f"{what} info is {len(blob)} bytes, its struct needs {size}")


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _addr(raw: bytes, family: int) -> str:
    """The address as ``ipaddress`` prints it. inet_ntop prints the same (RFC 5952) but for
    IPv4-mapped IPv6, which ipaddress judges; one DNAT per endpoint makes this hot."""
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    text = socket.inet_ntop(socket.AF_INET6, raw[:16])
    return text if "." not in text else str(ipaddress.IPv6Address(raw[:16]))


# -- matches ------------------------------------------------------------------

XT_MAX_COMMENT_LEN = 256


def comment(blob: bytes) -> Comment:
    """xt_comment_info: char comment[256]."""
    _need(blob, 1, "comment")
    return Comment(_cstring(blob[:XT_MAX_COMMENT_LEN]))


XT_STATISTIC_MODE_RANDOM, XT_STATISTIC_MODE_NTH = 0, 1
XT_STATISTIC_INVERT = 0x1
_STATISTIC = struct.Struct("=HHIII")  # mode, flags, union {probability | every, packet, count}


def statistic(blob: bytes) -> Statistic:
    """xt_statistic_info (rev 0). iptables stores ``lround(p * 2^31)`` and prints
    ``p / 2^31`` with 11 decimals; the float here is that printed value."""
    _need(blob, _STATISTIC.size, "statistic")
    mode, flags, first, packet, _count = _STATISTIC.unpack_from(blob)
    inverted = bool(flags & XT_STATISTIC_INVERT)
    if mode == XT_STATISTIC_MODE_RANDOM:
        return Statistic("random", float(f"{first / 0x80000000:.11f}"), None, None, inverted)
    if mode == XT_STATISTIC_MODE_NTH:
        return Statistic("nth", None, first + 1, packet, inverted)
    raise XtablesError(f"statistic mode {mode} is not one iptables writes")


XT_RECENT_CHECK, XT_RECENT_SET, XT_RECENT_UPDATE, XT_RECENT_REMOVE = 1, 2, 4, 8
XT_RECENT_TTL, XT_RECENT_REAP = 16, 32
XT_RECENT_NAME_LEN = 200
_RECENT = struct.Struct("=IIBB200sB")  # seconds, hit_count, check_set, invert, name, side
_RECENT_V0_SIZE = (_RECENT.size + 3) & ~3  # 212: padded to the u32 alignment
_RECENT_V1_SIZE = _RECENT_V0_SIZE + 16  # + union nf_inet_addr mask


def recent(blob: bytes, revision: int, family: int) -> Recent:
    """xt_recent_mtinfo (rev 0) and xt_recent_mtinfo_v1 (rev 1, + mask)."""
    _need(blob, _RECENT_V1_SIZE if revision >= 1 else _RECENT.size, f"recent rev {revision}")
    seconds, hit_count, check_set, invert, name, side = _RECENT.unpack_from(blob)
    modes = tuple(mode for bit, mode in ((XT_RECENT_CHECK, "rcheck"), (XT_RECENT_SET, "set"),
                                         (XT_RECENT_UPDATE, "update"), (XT_RECENT_REMOVE, "remove"))
                  if check_set & bit)
    mask = _addr(blob[_RECENT_V0_SIZE:_RECENT_V1_SIZE], family) if revision >= 1 else None
    return Recent(_cstring(name), modes, seconds, hit_count, bool(check_set & XT_RECENT_REAP),
                  bool(check_set & XT_RECENT_TTL), "rdest" if side == 1 else "rsource", bool(invert), mask)


# enum in xt_addrtype.h: one bit per route type, in iptables' printing order.
ADDRTYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE",
             "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")
XT_ADDRTYPE_INVERT_SOURCE, XT_ADDRTYPE_INVERT_DEST = 0x1, 0x2
XT_ADDRTYPE_LIMIT_IFACE_IN, XT_ADDRTYPE_LIMIT_IFACE_OUT = 0x4, 0x8
_ADDRTYPE_V1 = struct.Struct("=HHI")  # source, dest, flags


def _types(bits: int) -> str | None:
    names = [name for i, name in enumerate(ADDRTYPES) if bits & (1 << i)]
    return ",".join(names) if names else None


def addrtype(blob: bytes, revision: int) -> Addrtype:
    """xt_addrtype_info_v1 (rev 1; iptables 1.8 writes no other)."""
    if revision != 1:
        raise XtablesError(f"addrtype rev {revision} is not decoded (iptables writes rev 1)")
    _need(blob, _ADDRTYPE_V1.size, "addrtype")
    source, dest, flags = _ADDRTYPE_V1.unpack_from(blob)
    limit = ("in" if flags & XT_ADDRTYPE_LIMIT_IFACE_IN else "out" if flags & XT_ADDRTYPE_LIMIT_IFACE_OUT
             else None)
    return Addrtype(_types(source), bool(flags & XT_ADDRTYPE_INVERT_SOURCE),
                    _types(dest), bool(flags & XT_ADDRTYPE_INVERT_DEST), limit)


XT_TCP_INV_SRCPT, XT_TCP_INV_DSTPT, XT_TCP_INV_FLAGS, XT_TCP_INV_OPTION = 0x1, 0x2, 0x4, 0x8
_TCP = struct.Struct("=4HBBBB")  # spts[2], dpts[2], option, flg_mask, flg_cmp, invflags
XT_UDP_INV_SRCPT, XT_UDP_INV_DSTPT = 0x1, 0x2
_UDP = struct.Struct("=4HB")  # spts[2], dpts[2], invflags
XT_SCTP_SRC_PORTS, XT_SCTP_DEST_PORTS, XT_SCTP_CHUNK_TYPES = 0x1, 0x2, 0x4
# dpts[2], spts[2], chunkmap[64] (a bit per chunk type), chunk_match_type, flag_info[4] (3 bytes
# each), flag_count, flags, invflags
_SCTP = struct.Struct("=4H64II12siII")


def tcp(blob: bytes) -> Ports:
    """xt_tcp."""
    _need(blob, _TCP.size, "tcp")
    slo, shi, dlo, dhi, option, flg_mask, _flg_cmp, inv = _TCP.unpack_from(blob)
    other = (("--tcp-flags",) if flg_mask else ()) + (("--tcp-option",) if option else ())
    return Ports("tcp", (slo, shi), (dlo, dhi), bool(inv & XT_TCP_INV_SRCPT), bool(inv & XT_TCP_INV_DSTPT), other)


def udp(blob: bytes) -> Ports:
    """xt_udp."""
    _need(blob, _UDP.size, "udp")
    slo, shi, dlo, dhi, inv = _UDP.unpack_from(blob)
    return Ports("udp", (slo, shi), (dlo, dhi), bool(inv & XT_UDP_INV_SRCPT), bool(inv & XT_UDP_INV_DSTPT), ())


def sctp(blob: bytes) -> Ports:
    """xt_sctp_info: destination ports first; ports count only where flagged."""
    _need(blob, _SCTP.size, "sctp")
    values = _SCTP.unpack_from(blob)
    dlo, dhi, slo, shi = values[:4]
    flags, inv = values[-2], values[-1]
    sport = (slo, shi) if flags & XT_SCTP_SRC_PORTS else (0, 65535)
    dport = (dlo, dhi) if flags & XT_SCTP_DEST_PORTS else (0, 65535)
    other = ("--chunk-types",) if flags & XT_SCTP_CHUNK_TYPES else ()
    return Ports("sctp", sport, dport, bool(inv & XT_SCTP_SRC_PORTS), bool(inv & XT_SCTP_DEST_PORTS), other)


_MARK_V1 = struct.Struct("=IIB")  # mark, mask, invert


def mark(blob: bytes) -> Mark:
    """xt_mark_mtinfo1 (rev 1)."""
    _need(blob, _MARK_V1.size, "mark")
    value, mask, invert = _MARK_V1.unpack_from(blob)
    return Mark(value, mask, bool(invert))


NFACCT_NAME_MAX = 32


def nfacct(blob: bytes) -> Nfacct:
    """xt_nfacct_match_info (rev 0 and 1 start alike): char name[32], then a kernel pointer."""
    _need(blob, 1, "nfacct")
    return Nfacct(_cstring(blob[:NFACCT_NAME_MAX]))


XT_CONNTRACK_STATE = 0x1
# iptables' printing order of --ctstate (libxt_conntrack), with each state's bit:
# INVALID 1<<0; NEW, RELATED, ESTABLISHED 1 << (ctinfo + 1); UNTRACKED, SNAT, DNAT after IP_CT_NUMBER.
CT_STATES = (("INVALID", 0x1), ("NEW", 0x8), ("RELATED", 0x4), ("ESTABLISHED", 0x2),
             ("UNTRACKED", 0x100), ("SNAT", 0x40), ("DNAT", 0x80))
# After 8 addresses/masks (128 bytes), expires_min/max (8), l4proto and 4 ports (10):
# match_flags, invert_flags, state_mask (u16 each).
_CONNTRACK_FLAGS_AT = 128 + 8 + 10


def conntrack(blob: bytes, revision: int) -> Conntrack:
    """xt_conntrack_mtinfo1..3 share the start of their layout up to state_mask; only
    the state test is decoded (rev 3 is what iptables 1.8 writes)."""
    if revision not in (1, 2, 3):
        raise XtablesError(f"conntrack rev {revision} is not decoded")
    _need(blob, _CONNTRACK_FLAGS_AT + 6, f"conntrack rev {revision}")
    match_flags, invert_flags, state_mask = struct.unpack_from("=HHH", blob, _CONNTRACK_FLAGS_AT)
    states = ",".join(name for name, bit in CT_STATES if state_mask & bit) \
        if match_flags & XT_CONNTRACK_STATE else None
    return Conntrack(states or None, bool(invert_flags & XT_CONNTRACK_STATE),
                     bool(match_flags & ~XT_CONNTRACK_STATE))


# -- targets ------------------------------------------------------------------

NF_NAT_FLAGS = ((0x1, "map-ips"), (0x2, "proto-specified"), (0x4, "random"), (0x8, "persistent"),
                (0x10, "random-fully"), (0x20, "proto-offset"), (0x40, "netmap"))
NF_NAT_RANGE_MAP_IPS, NF_NAT_RANGE_PROTO_SPECIFIED = 0x1, 0x2
_NAT_V4 = struct.Struct("=II4s4s2s2s")  # rangesize; range[0]: flags, min_ip, max_ip, min, max
_NAT_RANGE = struct.Struct("=I16s16s2s2s")  # flags, min_addr, max_addr, min_proto, max_proto
_NAT_RANGE2_SIZE = (_NAT_RANGE.size + 2 + 3) & ~3  # + base_proto, padded: 44


def _nat(flags: int, min_addr: bytes, max_addr: bytes, min_port: bytes, max_port: bytes, family: int) -> NatRange:
    mapped = bool(flags & NF_NAT_RANGE_MAP_IPS)
    ported = bool(flags & NF_NAT_RANGE_PROTO_SPECIFIED)
    extra = () if not flags & ~(NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED) else tuple(
        name for bit, name in NF_NAT_FLAGS
        if flags & bit and bit not in (NF_NAT_RANGE_MAP_IPS, NF_NAT_RANGE_PROTO_SPECIFIED))
    low = _addr(min_addr, family) if mapped else None
    high = (low if max_addr == min_addr else _addr(max_addr, family)) if mapped else None
    return NatRange(low, high, int.from_bytes(min_port, "big") if ported else None,
                    int.from_bytes(max_port, "big") if ported else None, extra)


def nat_range(blob: bytes, revision: int, family: int, what: str = "DNAT") -> NatRange:
    """DNAT / MASQUERADE info: rev 0 is nf_nat_ipv4_multi_range_compat (IPv4 only,
    one range), rev 1 nf_nat_range, rev 2 nf_nat_range2 (same start, + base port)."""
    if revision == 0 and family == 4:
        _need(blob, _NAT_V4.size, f"{what} rev 0")
        rangesize, flags, min_ip, max_ip, min_port, max_port = _NAT_V4.unpack_from(blob)
        if rangesize != 1:
            raise XtablesError(f"{what} rev 0 with {rangesize} ranges (iptables writes one)")
        return _nat(flags, min_ip, max_ip, min_port, max_port, family)
    if revision in (0, 1, 2):  # IPv6 MASQUERADE rev 0 is nf_nat_range too
        _need(blob, _NAT_RANGE2_SIZE if revision == 2 else _NAT_RANGE.size, f"{what} rev {revision}")
        return _nat(*_NAT_RANGE.unpack_from(blob), family)
    raise XtablesError(f"{what} rev {revision} is not decoded")


_MARK_TG_V2 = struct.Struct("=II")  # mark, mask


def mark_target(blob: bytes) -> MarkTarget:
    """xt_mark_tginfo2 (MARK rev 2)."""
    _need(blob, _MARK_TG_V2.size, "MARK")
    return MarkTarget(*_MARK_TG_V2.unpack_from(blob))


REJECT_WITH_V4 = ("icmp-net-unreachable", "icmp-host-unreachable", "icmp-proto-unreachable",
                  "icmp-port-unreachable", "echo-reply", "icmp-net-prohibited", "icmp-host-prohibited",
                  "tcp-reset", "icmp-admin-prohibited")
REJECT_WITH_V6 = ("icmp6-no-route", "icmp6-adm-prohibited", "icmp6-not-neighbour", "icmp6-addr-unreachable",
                  "icmp6-port-unreachable", "echo-reply", "tcp-reset", "icmp6-policy-fail", "icmp6-reject-route")


def reject(blob: bytes, family: int) -> Reject:
    """ipt_reject_info / ip6t_reject_info: one u32 ``with``."""
    _need(blob, 4, "REJECT")
    code = struct.unpack_from("=I", blob)[0]
    names = REJECT_WITH_V4 if family == 4 else REJECT_WITH_V6
    if code >= len(names):
        raise XtablesError(f"REJECT with code {code} is not one iptables writes")
    return Reject(names[code])


# -- dispatch -----------------------------------------------------------------

Match = Comment | Statistic | Recent | Addrtype | Ports | Mark | Nfacct | Conntrack | Unknown
Target = NatRange | MarkTarget | Reject | Unknown


def decode_match(name: str, revision: int, blob: bytes, family: int) -> Match:
    """One compat match; ``Unknown`` for a name (or revision) not decoded here."""
    if name == "comment":
        return comment(blob)
    if name == "statistic" and revision == 0:
        return statistic(blob)
    if name == "recent" and revision in (0, 1):
        return recent(blob, revision, family)
    if name == "addrtype" and revision == 1:
        return addrtype(blob, revision)
    if name == "tcp" and revision == 0:
        return tcp(blob)
    if name == "udp" and revision == 0:
        return udp(blob)
    if name == "sctp" and revision == 0:
        return sctp(blob)
    if name == "mark" and revision == 1:
        return mark(blob)
    if name == "nfacct" and revision in (0, 1):
        return nfacct(blob)
    if name == "conntrack":
        return conntrack(blob, revision)
    return Unknown(name, revision)


def decode_target(name: str, revision: int, blob: bytes, family: int) -> Target:
    """One compat target; ``Unknown`` for a name (or revision) not decoded here."""
    if name in ("DNAT", "MASQUERADE") and revision in (0, 1, 2):
        return nat_range(blob, revision, family, name)
    if name == "MARK" and revision == 2:
        return mark_target(blob)
    if name == "REJECT" and revision == 0:
        return reject(blob, family)
    return Unknown(name, revision)
