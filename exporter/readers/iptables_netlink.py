"""iptables-nft's rules decoded: one nf_tables rule's expressions as the ``IptablesRule``
`iptables-nft-save` would print (``decode_rule``). The source that dumps them chain by
chain is ``exporter.readers.iptables_nft``; the legacy blob decoder
(``exporter.readers.iptables_blob``) shares the match and target effects.

iptables-nft writes each rule as native expressions where nf_tables has them and
xtables "compat" expressions elsewhere:

- ``meta l4proto`` + ``cmp`` -> ``-p``; ``payload`` of the network header (IPv4
  +12/+16, IPv6 +8/+24, a ``bitwise`` mask for prefixes that are not whole bytes)
  + ``cmp eq/neq`` -> ``[!] -s`` / ``[!] -d``; ``payload`` of the transport header +2
  + ``cmp eq`` -> ``--dport``; ``immediate`` verdicts -> ``-j CHAIN`` / ``-g CHAIN`` /
  RETURN / ACCEPT / DROP; ``counter`` is ignored;
- ``match`` / ``target`` with the kernel's info struct (comment, statistic, recent,
  addrtype, tcp/udp/sctp, nfacct, DNAT, MARK, REJECT, MASQUERADE: decoded by
  ``exporter.readers.xtables``);
- a comment may also sit in the rule's user data (libnftnl's comment TLV).

Anything else is named in ``IptablesRule.unknown`` (``-i eth0``, ``-m mark``,
``-m conntrack``, ``expr lookup``), never dropped: the resolver decides whether a
KUBE- chain with such a rule can be understood. nfacct only counts, and recent's
``--reap`` and default mask change nothing a Service's traffic depends on: they
are read and left out.

Within a read most rules are decoded by shape: kube-proxy's rules repeat a few dozen
byte layouts that differ only in an address, a port, a jump, a comment, a DNAT or a
counter, so each shape is decoded generically once and later rules of it only read
those fields (``_Shapes``: ~3.5 us a rule where the generic decode took ~14). The generic
decode decodes each distinct expression once into the operation it is (a match, target
or verdict: the fields it sets), up to ``MEMO_SIZE`` of them: at 10,000 Services x 5
most of them are one rule's own, and keeping them all had the peak of a first read at
170 MB RSS (95 MB bounded).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

from exporter.readers import xtables
from exporter.readers.iptables_rules import IptablesRule
from exporter.readers.nftables_netlink import (_BE32, _NLA, NF_ACCEPT, NF_DROP, NFT_GOTO, NFT_JUMP,
                                               NFT_REG_VERDICT, NFT_RETURN, NFTA_EXPR_DATA, NFTA_DATA_VALUE,
                                               NFTA_DATA_VERDICT, NFTA_EXPR_NAME, NFTA_LIST_ELEM, NFTA_VERDICT_CHAIN,
                                               NftReadError, Verdict, _comment, _data, _string)

__all__ = ["decode_rule", "NftReadError"]

# Distinct expressions kept decoded per family during one read, at most: the ones rules
# share (``-p tcp``, ``-j KUBE-MARK-MASQ``, a probability) are a few hundred; most others
# are one rule's own (its endpoint's address and DNAT, its jump to a KUBE-SEP chain) and
# would be 20 MB of keys and operations at 3,000 Services x 5 were they all kept.
MEMO_SIZE = 4096

# Expression attributes (linux/netfilter/nf_tables.h, nf_tables_compat.h).
NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_OFFSET, NFTA_PAYLOAD_LEN = 1, 2, 3, 4
NFTA_META_DREG, NFTA_META_KEY = 1, 2
NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA = 1, 2, 3
NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN, NFTA_BITWISE_MASK, NFTA_BITWISE_XOR = 1, 2, 3, 4, 5
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_RANGE_SREG, NFTA_RANGE_OP, NFTA_RANGE_FROM_DATA, NFTA_RANGE_TO_DATA = 1, 2, 3, 4
NFTA_COMPAT_NAME, NFTA_COMPAT_REV, NFTA_COMPAT_INFO = 1, 2, 3  # NFTA_MATCH_* and NFTA_TARGET_* alike
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_META_MARK, NFT_META_IIFNAME, NFT_META_OIFNAME, NFT_META_L4PROTO = 3, 6, 7, 16
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
CMP_OPS = {0: "eq", 1: "neq", 2: "lt", 3: "lte", 4: "gt", 5: "gte"}
# Where -s / -d sit in the network header, per family: (source offset, destination offset, length).
ADDRESS_OFFSETS = {4: (12, 16, 4), 6: (8, 24, 16)}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}
FIELD_PROTOCOLS = ("tcp", "udp", "sctp")  # the ones kube-proxy writes; others are kept as "-p NAME"
ANY_PORT = (0, 65535)
FULL_MASKS = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}
_BE16 = struct.Struct(">H")
_HOST_U32 = struct.Struct("=I")  # meta mark is in host byte order


# An IptablesRule's fields by place: a rule is decoded into a list of them (cheaper per
# rule than one attribute each) and made a rule in one call.
_PLACE = {name: place for place, name in enumerate(IptablesRule._fields)}
_TARGET, _GOTO, _SOURCE, _SOURCE_NEGATED, _DESTINATION, _DESTINATION_NEGATED, _PROTOCOL, _DPORT, _COMMENT, \
    _TO_DESTINATION, _UNKNOWN = (_PLACE[name] for name in (
        "target", "goto", "source", "source_negated", "destination", "destination_negated", "protocol", "dport",
        "comment", "to_destination", "unknown"))
_BLANK = list(IptablesRule(""))
_new_rule = tuple.__new__


class _Decoding:
    """One rule's facts as its expressions state them, in order; ``rule()`` shapes them."""

    __slots__ = ("family", "values", "unknown", "registers")

    def __init__(self, family: int) -> None:
        self.family = family
        self.values = _BLANK.copy()  # IptablesRule's fields, by place
        self.unknown: list[str] = []
        self.registers: dict[int, tuple] = {}  # register -> what was loaded into it

    def rule(self) -> IptablesRule:
        values = self.values
        if self.unknown:
            values[_UNKNOWN] = tuple(self.unknown)
        return _new_rule(IptablesRule, values)


def _fields(buf, start: int, end: int) -> dict[int, tuple[int, int]]:
    """attribute type -> (payload start, end): a flat loop, once per distinct expression."""
    out = {}
    unpack = _NLA.unpack_from
    while start + 4 <= end:
        alen, t = unpack(buf, start)
        if alen < 4 or start + alen > end:
            raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
        out[t & 0x3FFF] = (start + 4, start + alen)
        start += (alen + 3) & ~3
    return out


def _u32(buf, fields: dict, attr: int) -> int | None:
    where = fields.get(attr)
    return _BE32.unpack_from(buf, where[0])[0] if where and where[1] - where[0] >= 4 else None


def _value(buf, fields: dict, attr: int) -> bytes:
    where = fields.get(attr)
    value = _data(buf, *where) if where else None
    return value if isinstance(value, bytes) else b""


def _network(family: int, value: bytes, mask: bytes | None) -> str | None:
    """The network a payload compare states, or None if its mask is not a prefix."""
    size = 4 if family == 4 else 16
    if mask is None and len(value) == size:
        # A whole address (most of them): inet_ntop prints as ipaddress does but for
        # IPv4-mapped IPv6, which ipaddress judges below.
        text = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, value)
        if family == 4 or "." not in text:
            return f"{text}/{size * 8}"
    if mask is None:
        prefix = len(value) * 8
    else:
        bits = int.from_bytes(mask, "big")
        width = len(mask) * 8
        prefix = bin(bits).count("1")
        if bits != ((1 << prefix) - 1) << (width - prefix):
            return None
    raw = value.ljust(size, b"\0")[:size]
    try:
        return str(ipaddress.ip_network((raw, prefix), strict=False))
    except ValueError:
        return None


def _interface(value: bytes) -> str:
    """An iifname/oifname compare: NUL-padded name, or a prefix (iptables' ``eth+``)."""
    name = value.split(b"\0", 1)[0].decode("utf-8", "replace")
    return name if b"\0" in value else name + "+"


def _compare(d: _Decoding, cmp: tuple, memo: dict) -> None:
    """A ``cmp``: what it tests is what its source register holds."""
    _, sreg, op, value, whole_network = cmp
    loaded = d.registers.get(sreg)
    if loaded is None and d.unknown:
        return  # compares what an expression already named unknown loaded (``ct state``)
    if loaded is None or op not in (NFT_CMP_EQ, NFT_CMP_NEQ):
        d.unknown.append(f"expr cmp {CMP_OPS.get(op, op)}")  # a port range written by nft: gte, lte
        return
    negated = op == NFT_CMP_NEQ
    bang = "! " if negated else ""
    kind = loaded[0]
    if kind == "meta":
        key = loaded[1]
        if key == NFT_META_L4PROTO and len(value) == 1:
            name = PROTOCOLS.get(value[0], str(value[0]))
            if negated or name not in FIELD_PROTOCOLS:
                d.unknown.append(f"{bang}-p {name}")
            else:
                d.values[_PROTOCOL] = name
        elif key in (NFT_META_IIFNAME, NFT_META_OIFNAME):
            d.unknown.append(f"{bang}{'-i' if key == NFT_META_IIFNAME else '-o'} {_interface(value)}")
        elif key == NFT_META_MARK and len(value) == 4:
            mask = loaded[2] if loaded[2] is not None else b"\xff" * 4
            d.unknown.append(_mark_text(_HOST_U32.unpack(value)[0], _HOST_U32.unpack(mask)[0], negated))
        else:
            d.unknown.append(f"meta {key}")
        return
    _, base, offset, length, mask = loaded
    if base == NFT_PAYLOAD_NETWORK_HEADER:
        source_at, destination_at, size = ADDRESS_OFFSETS[d.family]
        if offset in (source_at, destination_at) and length <= size:
            network = whole_network if mask is None and length == size else None
            if network is None:
                key = (d.family, value, mask)
                network = memo.get(key)
                if network is None:
                    network = memo[key] = _network(d.family, value, mask) or ""
            if network and offset == source_at:
                d.values[_SOURCE], d.values[_SOURCE_NEGATED] = network, negated
                return
            if network:
                d.values[_DESTINATION], d.values[_DESTINATION_NEGATED] = network, negated
                return
    elif base == NFT_PAYLOAD_TRANSPORT_HEADER and length == 2 and mask is None and len(value) == 2:
        port = _BE16.unpack(value)[0]
        if offset == 2 and not negated:
            d.values[_DPORT] = port
            return
        if offset in (0, 2):
            d.unknown.append(f"{bang}--{'sport' if offset == 0 else 'dport'} {port}")
            return
    d.unknown.append(f"payload {base}+{offset}")


def _range(d: _Decoding, expression: tuple[bytes, dict]) -> None:
    """A ``range`` (iptables-nft's ``--dport LO:HI``): kept as iptables-save prints it."""
    buf, fields = expression
    loaded = d.registers.get(_u32(buf, fields, NFTA_RANGE_SREG))
    low, high = _value(buf, fields, NFTA_RANGE_FROM_DATA), _value(buf, fields, NFTA_RANGE_TO_DATA)
    if (loaded is not None and loaded[0] == "payload" and loaded[1] == NFT_PAYLOAD_TRANSPORT_HEADER
            and loaded[2] in (0, 2) and loaded[4] is None and len(low) == len(high) == 2):
        bang = "! " if _u32(buf, fields, NFTA_RANGE_OP) == NFT_CMP_NEQ else ""
        side = "sport" if loaded[2] == 0 else "dport"
        d.unknown.append(f"{bang}--{side} {_BE16.unpack(low)[0]}:{_BE16.unpack(high)[0]}")
    elif loaded is not None or not d.unknown:
        d.unknown.append("expr range")


def _ports(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}:{hi}"


def _apply_match(d: _Effects, match) -> None:
    """A decoded compat match into the rule's facts; what has no field is kept in
    ``unknown`` as iptables-save prints it (so both sources of a rule read alike)."""
    unknown = d.unknown
    if isinstance(match, xtables.Comment):
        d.comment = match.text
    elif isinstance(match, xtables.Ports):
        if match.sport != ANY_PORT:
            unknown.append(f"{'! ' if match.sport_inverted else ''}--sport {_ports(*match.sport)}")
        if match.dport != ANY_PORT:
            if match.dport[0] == match.dport[1] and not match.dport_inverted:
                d.dport = match.dport[0]
            else:
                unknown.append(f"{'! ' if match.dport_inverted else ''}--dport {_ports(*match.dport)}")
        unknown.extend(f"-m {match.protocol} {option}" for option in match.other)
    elif isinstance(match, xtables.Statistic):
        if match.mode == "random" and not match.inverted:
            d.probability = match.probability
        else:
            unknown.append(f"-m statistic --mode {match.mode}")
    elif isinstance(match, xtables.Recent):
        d.recent_name = match.name
        d.recent_mode = match.modes[0] if len(match.modes) == 1 else ",".join(match.modes) or None
        d.recent_seconds = match.seconds or None
        if match.inverted:
            unknown.append("-m recent ! --" + (match.modes[0] if match.modes else "rcheck"))
        if match.hit_count:
            unknown.append(f"-m recent --hitcount {match.hit_count}")
        if match.rttl:
            unknown.append("-m recent --rttl")
        if match.mask is not None and match.mask != FULL_MASKS[d.family]:
            unknown.append(f"-m recent --mask {match.mask}")
        if match.side != "rsource":
            unknown.append("-m recent --rdest")
    elif isinstance(match, xtables.Addrtype):
        if match.source is not None:
            d.src_type, d.src_type_negated = match.source, match.source_inverted
        if match.dest is not None:
            d.dst_type, d.dst_type_negated = match.dest, match.dest_inverted
        if match.limit_iface:
            unknown.append(f"-m addrtype --limit-iface-{match.limit_iface}")
    elif isinstance(match, xtables.Nfacct):
        unknown.append(f"-m nfacct --nfacct-name {match.name}")
    elif isinstance(match, xtables.Mark):
        unknown.append(_mark_text(match.mark, match.mask, match.inverted))
    elif isinstance(match, xtables.Conntrack):
        text = "-m conntrack"
        if match.states is not None:
            text += f" {'! ' if match.inverted else ''}--ctstate {match.states}"
        unknown.append(text + (" (more)" if match.other else ""))
    else:
        unknown.append(f"-m {match.name}")


def _mark_text(mark: int, mask: int, inverted: bool) -> str:
    shown = f"{mark:#x}" if mask == 0xFFFFFFFF else f"{mark:#x}/{mask:#x}"
    return f"-m mark {'! ' if inverted else ''}--mark {shown}"


def _apply_target(d: _Effects, name: str, target) -> None:
    """A decoded compat target: DNAT's destination, MARK's mark, REJECT's kind; other
    target options kept in ``unknown`` as iptables-save prints them."""
    d.target = name
    rest: list[str] = []
    if isinstance(target, xtables.NatRange):
        if name == "DNAT":
            text = target.to_destination(d.family)
            simple = (target.min_addr is not None and target.min_addr == target.max_addr
                      and target.min_port is not None and target.min_port == target.max_port)
            if simple:
                d.to_destination = text
            else:
                rest += ["--to-destination", text]
        elif target.min_port is not None:
            rest += ["--to-ports", _ports(target.min_port, target.max_port).replace(":", "-")]
        rest += [f"--{flag}" for flag in target.flags]
    elif isinstance(target, xtables.MarkTarget):
        d.set_xmark = f"{target.value:#x}/{target.mask:#x}"
    elif isinstance(target, xtables.Reject):
        d.reject_with = target.with_
    elif isinstance(target, xtables.Unknown) and target.name != name:
        rest.append(target.name[len(name):].strip())  # the decoder's complaint
    if rest:
        d.unknown.append(f"-j {name} {' '.join(rest)}")


_VERDICT_TARGETS = {NFT_RETURN: "RETURN", NF_ACCEPT: "ACCEPT", NF_DROP: "DROP"}


def _verdict(verdict: Verdict) -> tuple:
    """An immediate verdict as the operation setting the rule's target (and -g)."""
    if verdict.code in (NFT_JUMP, NFT_GOTO):
        target = ((_TARGET, verdict.chain or ""),)
        return ("set", target + ((_GOTO, True),) if verdict.code == NFT_GOTO else target, ())
    if verdict.code in _VERDICT_TARGETS:
        return ("set", ((_TARGET, _VERDICT_TARGETS[verdict.code]),), ())
    return ("unknown", f"verdict {verdict.name}")


def _expression(raw: bytes, family: int) -> tuple:
    """One expression (its NFTA_EXPR_NAME and NFTA_EXPR_DATA) as a small operation
    tuple: a pure function of its bytes, so a read decodes each distinct one once."""
    outer = _fields(raw, 0, len(raw))
    name = raw[slice(*outer[NFTA_EXPR_NAME])].rstrip(b"\0") if NFTA_EXPR_NAME in outer else b""
    fields = _fields(raw, *outer.get(NFTA_EXPR_DATA, (len(raw), len(raw))))
    if name == b"cmp":
        value = _value(raw, fields, NFTA_CMP_DATA)
        # What the value reads as when a whole source or destination address is compared
        # (most compares): decided here once, not per rule.
        network = _network(family, value, None) if len(value) == (4 if family == 4 else 16) else None
        return ("cmp", _u32(raw, fields, NFTA_CMP_SREG), _u32(raw, fields, NFTA_CMP_OP), value, network)
    if name == b"payload":
        return ("load", _u32(raw, fields, NFTA_PAYLOAD_DREG),
                ("payload", _u32(raw, fields, NFTA_PAYLOAD_BASE), _u32(raw, fields, NFTA_PAYLOAD_OFFSET),
                 _u32(raw, fields, NFTA_PAYLOAD_LEN), None))
    if name == b"meta" and NFTA_META_DREG in fields:
        return ("load", _u32(raw, fields, NFTA_META_DREG), ("meta", _u32(raw, fields, NFTA_META_KEY), None))
    if name == b"bitwise":
        return ("bitwise", _u32(raw, fields, NFTA_BITWISE_SREG), _u32(raw, fields, NFTA_BITWISE_DREG),
                _value(raw, fields, NFTA_BITWISE_MASK), not any(_value(raw, fields, NFTA_BITWISE_XOR)))
    if name == b"range":
        return ("range", (raw, fields))  # rare (a port range): decoded where it is applied
    if name == b"immediate":
        value = _data(raw, *fields[NFTA_IMMEDIATE_DATA]) if NFTA_IMMEDIATE_DATA in fields else None
        if _u32(raw, fields, NFTA_IMMEDIATE_DREG) == NFT_REG_VERDICT and isinstance(value, Verdict):
            return _verdict(value)
        return ("unknown", "expr immediate")
    if name in (b"match", b"target"):
        # Interned: it is the target of every rule it ends ("DNAT" of each endpoint).
        xt_name = sys.intern(raw[slice(*fields[NFTA_COMPAT_NAME])].rstrip(b"\0").decode()) \
            if NFTA_COMPAT_NAME in fields else ""
        revision = _u32(raw, fields, NFTA_COMPAT_REV) or 0
        blob = raw[slice(*fields[NFTA_COMPAT_INFO])] if NFTA_COMPAT_INFO in fields else b""
        decoder = xtables.decode_match if name == b"match" else xtables.decode_target
        try:
            decoded = decoder(xt_name, revision, blob, family)
        except xtables.XtablesError as err:
            decoded = xtables.Unknown(f"{xt_name} ({err})", revision)
        if name == b"match":
            return _effects(family, _apply_match, decoded)
        return _effects(family, _apply_target, xt_name, decoded)
    return ("unknown", f"expr {name.decode('ascii', 'replace')}")


class _Effects:
    """What a match, target or verdict does to a rule, recorded once per distinct expression:
    the ``_apply_*`` functions write their fields here (each rule then only copies them)."""

    def __init__(self, family: int) -> None:
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "unknown", [])
        object.__setattr__(self, "fields", {})

    def __setattr__(self, name: str, value) -> None:
        self.fields[name] = value


def _effects(family: int, apply, *args) -> tuple:
    recorded = _Effects(family)
    apply(recorded, *args)
    # A rule starts from the defaults: writing one again (``-j`` is not ``-g``) changes nothing.
    return ("set", tuple((_PLACE[name], value) for name, value in recorded.fields.items()
                         if value != _BLANK[_PLACE[name]]), tuple(recorded.unknown))


# An expression's name attribute as the kernel writes it first: counters are skipped
# before anything else (their values differ from rule to rule).
_COUNTER = _NLA.pack(12, NFTA_EXPR_NAME) + b"counter\0"


# -- rule shapes -----------------------------------------------------------------
# kube-proxy's rules repeat a few dozen shapes: a KUBE-SEP chain's ``-s EP -j KUBE-MARK-MASQ``
# and ``-p tcp -j DNAT --to-destination EP:PORT``, a KUBE-SVC chain's jumps to its endpoints,
# KUBE-SERVICES' ``-d CLUSTER-IP -p tcp --dport PORT -j KUBE-SVC-X``. Rules of one shape have
# the same bytes but in their "holes": a whole address or a port compared, a jump's chain, a
# comment, a DNAT's address and port, a counter's values. A shape keeps the generic decode of
# the first rule it saw, and each later rule of it only sets the fields of its holes.

_SHAPES_KEY = "shapes"
SHAPES_PER_LENGTH = 8  # shapes kept per rule length; past it, rules of that length decode generically
# A DNAT with one address and one port (what kube-proxy writes) as nf_nat_range(2) holds it:
# flags, min_addr, max_addr (16 bytes each), min_proto, max_proto (2 each).
_NAT_RANGE = struct.Struct("=I16s16s2s2s")
_NAT_SIMPLE = 0x1 | 0x2  # NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED, and no other flag


def _fill_address(buf, start: int, end: int, family: int, _arg) -> str | None:
    return _network(family, bytes(buf[start:end]), None)


def _fill_port(buf, start: int, end: int, family: int, _arg) -> int:
    return _BE16.unpack_from(buf, start)[0]


def _fill_chain(buf, start: int, end: int, family: int, _arg) -> str:
    return sys.intern(_string(buf, start, end))


def _fill_comment(buf, start: int, end: int, family: int, _arg) -> str:
    return xtables.comment(bytes(buf[start:end])).text


def _fill_dnat(buf, start: int, end: int, family: int, revision: int) -> str | None:
    """``--to-destination`` of a DNAT to one address and port; None for any other (decoded generically)."""
    flags, low, high, low_port, high_port = _NAT_RANGE.unpack_from(buf, start)
    if flags != _NAT_SIMPLE or low != high or low_port != high_port:
        return None
    # NatRange.to_destination of one address and port, without the NatRange
    address = xtables._addr(low, family)
    port = int.from_bytes(low_port, "big")
    return f"{address}:{port}" if family == 4 else f"[{address}]:{port}"


def _perturb_byte(raw: bytearray, at: int) -> None:
    raw[at] ^= 1


def _perturb_text(raw: bytearray, at: int) -> None:
    raw[at] = ord("Q") if raw[at] != ord("Q") else ord("R")


# What each kind of hole may set, how it reads, and how the test of a new shape changes it
# (relative offsets of the bytes changed, and how).
_HOLE_KINDS = {
    "address": ((_SOURCE, _DESTINATION), _fill_address, lambda length: ((length - 1, _perturb_byte),)),
    "port": ((_DPORT,), _fill_port, lambda length: ((1, _perturb_byte),)),
    "chain": ((_TARGET,), _fill_chain, lambda length: ((0, _perturb_text),)),
    "comment": ((_COMMENT,), _fill_comment, lambda length: ((0, _perturb_text),)),
    # both addresses' last byte (an IPv4 address is the union's first 4), both ports' low byte
    "dnat": ((_TO_DESTINATION,), _fill_dnat, None),
    "counter": ((), None, lambda length: ((length - 1, _perturb_byte),)),
}


def _dnat_perturbation(family: int):
    last = 3 if family == 4 else 15
    return tuple((at, _perturb_byte) for at in (4 + last, 20 + last, 37, 39))


def _candidate_holes(raw: bytes) -> list[tuple[int, int, str, object]]:
    """(start, end, kind, argument) of what may vary between rules of one shape, by the
    expressions' structure; which of them really are holes is tested by ``_Shapes._learn``."""
    holes = []
    offset, end = 0, len(raw)
    while offset + 4 <= end:
        alen, t = _NLA.unpack_from(raw, offset)
        if alen < 4 or offset + alen > end:
            return []
        s, e = offset + 4, offset + alen
        offset += (alen + 3) & ~3
        if t & 0x3FFF != NFTA_LIST_ELEM:
            continue
        outer = _fields(raw, s, e)
        if NFTA_EXPR_NAME not in outer or NFTA_EXPR_DATA not in outer:
            continue
        name = raw[slice(*outer[NFTA_EXPR_NAME])].rstrip(b"\0")
        ds, de = outer[NFTA_EXPR_DATA]
        fields = _fields(raw, ds, de)
        if name == b"counter":
            if de > ds:
                holes.append((ds, de, "counter", None))
        elif name == b"cmp" and NFTA_CMP_DATA in fields:
            value = _fields(raw, *fields[NFTA_CMP_DATA]).get(NFTA_DATA_VALUE)
            if value and value[1] - value[0] in (2, 4, 16):
                holes.append((*value, "port" if value[1] - value[0] == 2 else "address", None))
        elif name == b"immediate" and NFTA_IMMEDIATE_DATA in fields:
            verdict = _fields(raw, *fields[NFTA_IMMEDIATE_DATA]).get(NFTA_DATA_VERDICT)
            chain = _fields(raw, *verdict).get(NFTA_VERDICT_CHAIN) if verdict else None
            if chain and chain[1] > chain[0] and raw[chain[0]]:
                holes.append((*chain, "chain", None))
        elif name in (b"match", b"target") and NFTA_COMPAT_NAME in fields and NFTA_COMPAT_INFO in fields:
            xt_name = raw[slice(*fields[NFTA_COMPAT_NAME])].rstrip(b"\0")
            revision = _u32(raw, fields, NFTA_COMPAT_REV) or 0
            info = fields[NFTA_COMPAT_INFO]
            if name == b"match" and xt_name == b"comment" and info[1] > info[0]:
                holes.append((*info, "comment", None))
            elif name == b"target" and xt_name == b"DNAT" and revision in (1, 2) \
                    and info[1] - info[0] >= _NAT_RANGE.size:
                holes.append((*info, "dnat", revision))
    return holes


class _Shape:
    """One rule shape: the bytes it holds outside its holes (``constants``: (offset, bytes)),
    the holes a rule's fields are read from (``fills``: start, end, place in the rule, fill,
    argument; a counter's hole is only left out of the constants), the first rule's fields."""

    __slots__ = ("constants", "fills", "values")

    def __init__(self, constants: tuple, fills: tuple, values: tuple) -> None:
        self.constants, self.fills, self.values = constants, fills, values


class _Shapes:
    """The rule shapes of one family met during one read, by the length of a rule's expressions."""

    __slots__ = ("family", "by_length")

    def __init__(self, family: int) -> None:
        self.family = family
        self.by_length: dict[int, list[_Shape]] = {}

    def decode(self, buf, exprs: tuple[int, int], udata, memo: dict) -> IptablesRule | None:
        """The rule, if it has a shape known or learned here; None: decode it generically."""
        base, end = exprs
        length = end - base
        shapes = self.by_length.get(length)
        if shapes is None:
            shapes = self.by_length[length] = []
        family = self.family
        for shape in shapes:
            for at, constant in shape.constants:
                if not buf.startswith(constant, base + at):
                    break
            else:
                values = list(shape.values)
                for start, stop, place, fill, argument in shape.fills:
                    value = fill(buf, base + start, base + stop, family, argument)
                    if value is None:
                        return None  # not what this shape's hole holds (a DNAT range): generic
                    values[place] = value
                if udata and values[_COMMENT] is None:
                    values[_COMMENT] = _comment(buf, *udata)
                return _new_rule(IptablesRule, values)
        if len(shapes) >= SHAPES_PER_LENGTH:
            return None
        shape = self._learn(bytes(buf[base:end]), memo)
        if shape is None:
            return None
        shapes.append(shape)
        values = list(shape.values)
        if udata and values[_COMMENT] is None:
            values[_COMMENT] = _comment(buf, *udata)
        return _new_rule(IptablesRule, values)

    def _learn(self, raw: bytes, memo: dict) -> _Shape | None:
        """The shape of ``raw``: each candidate hole is kept only if changing its bytes changes
        the generic decode in its own field alone, exactly as its fill reads it (so a port
        compared as --sport, an address under a mask, a chain no rule field holds stay
        constants of the shape)."""
        family = self.family
        length = len(raw)
        first = list(_decode_expressions(raw, (0, length), None, family, memo))
        try:
            candidates = _candidate_holes(raw)
        except NftReadError:
            return None  # malformed where the generic decode does not look (a counter): no shape
        holes = []
        for start, stop, kind, argument in candidates:
            places, fill, perturbation = _HOLE_KINDS[kind]
            changed = bytearray(raw)
            for at, change in (perturbation(stop - start) if perturbation else _dnat_perturbation(family)):
                if start + at >= stop:
                    break
                change(changed, start + at)
            else:
                other = list(_decode_expressions(bytes(changed), (0, length), None, family, memo))
                differ = [place for place in range(len(first)) if first[place] != other[place]]
                if fill is None:
                    if not differ:
                        holes.append((start, stop, None, None, None))  # a counter: nothing it reads
                    continue
                if len(differ) != 1 or differ[0] not in places or any(differ[0] == hole[2] for hole in holes):
                    continue
                place = differ[0]
                if (fill(raw, start, stop, family, argument) == first[place]
                        and fill(changed, start, stop, family, argument) == other[place]):
                    holes.append((start, stop, place, fill, argument))
        constants, at = [], 0
        for start, stop, *_ in holes:
            if start > at:
                constants.append((at, raw[at:start]))
            at = stop
        if at < length:
            constants.append((at, raw[at:]))
        return _Shape(tuple(constants), tuple(hole for hole in holes if hole[2] is not None), tuple(first))


def decode_rule(buf, exprs: tuple[int, int] | None, udata: tuple[int, int] | None, family: int,
                memo: dict | None = None) -> IptablesRule:
    """One rule's expressions (``exprs``: (start, end) in ``buf``) as an ``IptablesRule``.

    ``memo`` (per family: expression bytes -> operation, and the networks of masked
    address compares; at most ``MEMO_SIZE`` each; and the rule shapes of ``_Shapes``)
    spares decoding what a read already decoded: a large table repeats a few dozen rule
    shapes that differ only in an address, a port, a jump or a DNAT, and the same few
    hundred expressions (``meta l4proto tcp``, ``jump KUBE-MARK-MASQ``).
    """
    if memo is None:
        memo = {}
    if exprs:
        rule = _shapes_of(memo, family).decode(buf, exprs, udata, memo)
        if rule is not None:
            return rule
    return _decode_expressions(buf, exprs, udata, family, memo)


def _shapes_of(memo: dict, family: int) -> _Shapes:
    """The rule shapes a read's ``memo`` holds for ``family``."""
    shapes = memo.get((_SHAPES_KEY, family))
    if shapes is None:
        shapes = memo[_SHAPES_KEY, family] = _Shapes(family)
    return shapes


def _decode_expressions(buf, exprs: tuple[int, int] | None, udata: tuple[int, int] | None, family: int,
                        memo: dict) -> IptablesRule:
    """``decode_rule`` expression by expression: the generic decode every shape is checked against."""
    # Per family: the effects of a match (a recent mask, a DNAT's brackets) depend on it.
    memo = memo.get(family) or memo.setdefault(family, {})
    d = _Decoding(family)
    registers, values = d.registers, d.values
    unpack = _NLA.unpack_from
    offset, end = exprs if exprs else (0, 0)
    message = buf
    if not isinstance(buf, bytes):
        # One copy of the rule's expressions: each expression is then a bytes slice (one
        # object) where a slice of the receive buffer would be a bytearray to copy again.
        buf, offset, end = bytes(buf[offset:end]), 0, end - offset
    while offset + 4 <= end:
        alen, t = unpack(buf, offset)
        if alen < 4 or offset + alen > end:
            raise NftReadError("malformed nf_tables netlink message (bad attribute length)")
        s, e = offset + 4, offset + alen
        offset += (alen + 3) & ~3
        if t & 0x3FFF != NFTA_LIST_ELEM or buf.startswith(_COUNTER, s):
            continue
        raw = buf[s:e]
        op = memo.get(raw)
        if op is None:
            op = _expression(raw, family)
            if len(memo) >= MEMO_SIZE:
                memo.clear()  # most distinct expressions are one rule's (its DNAT, its endpoint)
            memo[raw] = op
        kind = op[0]
        if kind == "set":
            for place, value in op[1]:
                values[place] = value
            if op[2]:
                d.unknown.extend(op[2])
        elif kind == "load":
            registers[op[1]] = op[2]
        elif kind == "cmp":
            _compare(d, op, memo)
        elif kind == "bitwise":
            loaded = registers.get(op[1])
            if loaded is not None and op[4] and loaded[0] in ("payload", "meta"):
                registers[op[2]] = loaded[:-1] + (op[3],)
            elif loaded is not None or not d.unknown:
                d.unknown.append("expr bitwise")
        elif kind == "range":
            _range(d, op[1])
        else:
            d.unknown.append(op[1])
    if values[_COMMENT] is None and udata:
        values[_COMMENT] = _comment(message, *udata)
    return d.rule()
