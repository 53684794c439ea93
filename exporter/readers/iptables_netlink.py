"""kube-proxy's iptables rules as iptables-nft keeps them: nf_tables tables `ip nat`,
`ip filter`, `ip6 nat`, `ip6 filter`, read over netlink into ``IptablesRuleset``s.

Why not `iptables-nft-save`: at 10,000 Services it takes tens of seconds, nearly
all of it its own quadratic chain look-ups (field.md), while the kernel hands the
same rules over in one dump per table. iptables-nft writes each rule as native
expressions where nf_tables has them and xtables "compat" expressions elsewhere:

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

Cost: ``generation()`` is one NFT_MSG_GETGEN. The first ``read()`` subscribes to
nf_tables' change feed (``exporter.readers.nftables_monitor``), then dumps the chains
and rules of the four tables. Later reads apply the feed's committed transactions to
each chain's rule handles and decode only the rules announced anew whose bytes no
rule deleted in the same transactions had (kube-proxy's partial sync flushes every
top-level chain and writes it again nearly unchanged); what they serve is checked to
be at the kernel's generation. A handle does not pin a rule's meaning: iptables -R
keeps the handle, and renaming a chain (iptables -E) renames every jump to it with
no rule event; so a full read after a resync reuses kept decodes only for rules no
event announced, and none after a rename or lost events.
Within a read most rules are decoded by shape: kube-proxy's rules repeat a few dozen
byte layouts that differ only in an address, a port, a jump, a comment, a DNAT or a
counter, so each shape is decoded generically once and later rules of it only read
those fields (``_Shapes``: ~3.5 us a rule where the generic decode took ~14). The generic
decode decodes each distinct expression once into the operation it is (a match, target
or verdict: the fields it sets), up to ``MEMO_SIZE`` of them: at 10,000 Services x 5
most of them are one rule's own, and keeping them all had the peak of a first read at
170 MB RSS (95 MB bounded, most of it the rules themselves).

The socket lives in the network namespace of the thread that opens it, as the
nftables reader's: tests read a namespace of their own from a thread that joined it.
"""

from __future__ import annotations

import gc
import ipaddress
import socket
import struct
import sys

from exporter.readers import xtables
from exporter.readers.iptables_rules import Chains, IptablesRule, IptablesRuleset
from exporter.readers.nftables_monitor import (DEFAULT_RECEIVE_BUFFER, Batch, ChainOrder, Event, FeedError,
                                               NftMonitor, Unordered, newer, rule_parts)
from exporter.readers.nftables_netlink import (_BE32, _NLA, NF_ACCEPT, NF_DROP, NFPROTO_IPV4, NFPROTO_IPV6,
                                               NFT_GOTO, NFT_JUMP, NFT_REG_VERDICT, NFT_RETURN, NFTA_EXPR_DATA,
                                               NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_EXPR_NAME, NFTA_LIST_ELEM,
                                               NFTA_VERDICT_CHAIN, NftNetlink, NftReadError, Verdict, _comment,
                                               _data, _string)

__all__ = ["IptablesNftSource", "NftReadError", "TABLES", "FAMILIES", "decode_rule"]

TABLES = ("nat", "filter")
# iptables-nft creates a built-in chain with its first rule, iptables-save prints them all:
# an absent one is an empty chain, not a missing one.
BUILTIN_CHAINS = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"), "filter": ("INPUT", "FORWARD", "OUTPUT")}
FAMILIES = ((4, NFPROTO_IPV4), (6, NFPROTO_IPV6))
SERVICES_CHAIN = "KUBE-SERVICES"
GENERATION_TRIES = 3  # dumps started again when the ruleset changed under one
# From this many chains in a table its rules are dumped chain by chain: a whole-table dump
# costs the kernel a quadratic walk (NftNetlink.each_rule), one request per chain costs us a
# round trip each. Measured here: 1,000 Services x 5 (6,000 nat chains) 0.08 s whole vs
# 0.23 s per chain; 10,000 (60,000 chains) about 12 s whole.
PER_CHAIN_DUMPS_FROM = 15000

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


class _TableCache:
    """Decoded rules of one table, valid while the table keeps its handle."""

    __slots__ = ("table_handle", "rules")

    def __init__(self, table_handle: int) -> None:
        self.table_handle = table_handle
        self.rules: dict[tuple[str, int], IptablesRule] = {}


class _TableState:
    """What a source keeps of one table between reads, beside the rules it served: the
    table's handle, each chain's handle and its rules' handles in order (parallel to the
    served rules tuple)."""

    __slots__ = ("table_handle", "chain_handles", "rule_handles")

    def __init__(self, table_handle: int, chain_handles: dict[str, int | None],
                 rule_handles: dict[str, tuple[int, ...]]) -> None:
        self.table_handle = table_handle
        self.chain_handles = chain_handles
        self.rule_handles = rule_handles


class _Resync(Exception):
    """The change feed cannot bring the kept rules to the kernel's: read them whole.
    ``announced``: the (family, table, chain, handle) of every rule the feed announced
    anew (their kept decodes are stale: a replaced rule keeps its handle), or None
    when the feed lost events (no kept decode can be trusted)."""

    def __init__(self, reason: str, lost: bool = False) -> None:
        super().__init__(reason)
        self.lost = lost  # events were lost, or a rename changed rules no event names
        self.announced: set | None = None


_FAMILY_OF = {nfproto: family for family, nfproto in FAMILIES}
FEED_TRIES = 3  # drains in a row waiting for a commit's messages behind its generation


class IptablesNftSource:
    """The iptables-nft backend's rules of this network namespace, over nf_tables netlink.

    ``generation()`` says whether anything changed; ``read()`` gives one
    ``IptablesRuleset`` per family (tables nat and filter; an absent table is left
    out of its family's ruleset). ``decoded`` says how many rules the last read
    decoded anew.

    The first read subscribes to nf_tables' change feed (``NftMonitor``) before it
    dumps; later reads apply the feed's committed transactions to the rules kept
    (decoding only the rules they add) and serve them only if the kernel's generation
    is the one the last applied transaction made. An overflowed feed, an event that
    does not fit what is kept, a table created or deleted, or a generation the feed
    did not reach: a full read (``full_reads`` counts them, ``last_resync`` says why).
    ``feed=False``: every change is a full read (the dumps as before the feed).
    """

    def __init__(self, timeout: float = 5.0, per_chain_dumps_from: int = PER_CHAIN_DUMPS_FROM,
                 feed: bool = True, feed_buffer: int = DEFAULT_RECEIVE_BUFFER) -> None:
        self.timeout = timeout
        self.per_chain_dumps_from = per_chain_dumps_from
        self.use_feed, self.feed_buffer = feed, feed_buffer
        self._caches: dict[tuple[int, str], _TableCache] = {}  # decoded rules, during a full read only
        self._last: list[IptablesRuleset] | None = None
        self._states: dict[tuple[int, str], _TableState] = {}
        self._feed: NftMonitor | None = None
        self._requests: NftNetlink | None = None  # kept open: a generation check is one round trip
        self._unapplied: list[Batch] = []  # transactions after the last full read's generation
        self._resync: str | None = None  # set when the feed lost events after a full read
        # Rules whose kept decode a full read may reuse: all but these (None: none of them).
        self._stale: set | None = set()
        self.last_generation: int | None = None
        self.decoded = 0  # rules the last read decoded
        self.announced = 0  # rules new since the read before (a full read: as decoded)
        self.full_reads = 0
        self.last_resync: str | None = None

    def close(self) -> None:
        for sock in (self._feed, self._requests):
            if sock is not None:
                sock.close()
        self._feed = self._requests = None

    def generation(self) -> int:
        if self._requests is not None:
            return self._requests.generation()
        with NftNetlink(self.timeout) as nl:
            return nl.generation()

    def present(self) -> bool:
        """A `nat` table with a KUBE-SERVICES chain exists in nf_tables (either family)."""
        with NftNetlink(self.timeout) as nl:
            return any(nl.chain_exists(nfproto, "nat", SERVICES_CHAIN) for _, nfproto in FAMILIES)

    def read(self, known: int | None = None) -> list[IptablesRuleset]:
        """The rulesets of both families, at one generation (``last_generation``).

        With the feed: the kept rules brought up to date by it (the same object back if
        nothing changed). Without it (or on a resync): a full read, where ``known`` (the
        generation of the caller's last rulesets) skips the dump if nf_tables is still at
        it; the generation is read before and after the dumps, and the dumps done again
        if it moved in between (a restore committed mid-read)."""
        if self._feed is not None and self._last is not None:
            gc_was_enabled = gc.isenabled()
            # Tens of thousands of messages and events, no cycles: a collection now would
            # only walk the hundreds of thousands of rules kept (measured: a third of a re-read).
            gc.disable()
            try:
                if self._resync is not None:
                    raise _Resync(self._resync, lost=True)
                return self._read_feed()
            except _Resync as why:
                self.last_resync, self._stale = str(why), why.announced
            except BaseException:
                self._resync = "a re-read failed after draining the feed"  # what it drained is gone
                raise
            finally:
                if gc_was_enabled:
                    gc.enable()
        return self._full_read(known)

    def _read_feed(self) -> list[IptablesRuleset]:
        batches = self._unapplied
        self._unapplied = []
        nl = self._requests
        for _ in range(FEED_TRIES):
            drained = self._feed.drain()
            if drained.resync:
                raise _Resync(drained.resync, lost=True)
            batches += drained.batches
            target = batches[-1].generation if batches else self.last_generation
            if nl.generation() == target:
                break
        else:
            raise _Resync("the kernel's generation is past the change feed's", lost=True)
        if not batches:
            self.decoded = self.announced = 0
            return self._last
        try:
            rulesets, states, decoded, announced = apply_batches(self._last, self._states, batches)
        except _Resync as why:
            if not why.lost:
                why.announced = {(family, table, event.chain, event.handle) for batch in batches
                             for (nfproto, table), events in batch.tables.items()
                                 for family in [_FAMILY_OF.get(nfproto)] for event in events
                                 if event.kind == "newrule"}
            raise
        self._last, self._states, self.decoded, self.announced = rulesets, states, decoded, announced
        self.last_generation = batches[-1].generation
        return rulesets

    def _full_read(self, known: int | None) -> list[IptablesRuleset]:
        if self.use_feed and self._feed is None:
            try:
                self._feed = NftMonitor(self.feed_buffer)  # before the dumps: nothing lost between
                self._requests = NftNetlink(self.timeout)
            except FeedError:
                self.close()
                self.use_feed = False  # the dumps still work; read whole on every change
        self._caches = self._kept_rules() if self.use_feed else {}
        try:
            rulesets = self._dump(known)
        finally:
            self._caches, self._stale = {}, set()
        if self._feed is not None:
            # What the feed holds up to the dumps' generation is in them already.
            drained = self._feed.drain()
            self._resync = drained.resync
            self._unapplied = [batch for batch in drained.batches if newer(batch.generation, self.last_generation)]
        return rulesets

    def _kept_rules(self) -> dict[tuple[int, str], _TableCache]:
        """The served rules by (chain, handle): a full read decodes only what they lack."""
        caches = {}
        stale = self._stale
        if self._last is None or stale is None:
            return caches
        for ruleset in self._last:
            for table, chains in ruleset.tables.items():
                state = self._states.get((ruleset.family, table))
                if state is None:
                    continue
                cache = caches[(ruleset.family, table)] = _TableCache(state.table_handle)
                for chain, handles in state.rule_handles.items():
                    cache.rules.update(((chain, handle), rule) for handle, rule in zip(handles, chains[chain])
                                       if (ruleset.family, table, chain, handle) not in stale)
        return caches

    def _dump(self, known: int | None) -> list[IptablesRuleset]:
        with NftNetlink(self.timeout) as nl:
            generation = nl.generation()
            if known is not None and known == generation == self.last_generation and self._last is not None:
                self.decoded = 0
                return self._last
            for _ in range(GENERATION_TRIES):
                decoded = 0
                memo: dict = {}
                rulesets = []
                states: dict[tuple[int, str], _TableState] = {}
                for family, nfproto in FAMILIES:
                    tables: dict[str, Chains] = {}
                    chain_lists = nl.chains_by_table(nfproto, TABLES)
                    for table in TABLES:
                        chains, count = self._table(nl, family, nfproto, table, chain_lists.get(table, []), memo,
                                                    states)
                        decoded += count
                        if chains is not None:
                            tables[table] = chains
                    rulesets.append(IptablesRuleset(family, tables))
                after = nl.generation()
                if after == generation:
                    break
                generation = after
            else:
                raise NftReadError(f"the ruleset changed during each of {GENERATION_TRIES} reads in a row")
        self._last, self.last_generation, self.decoded = rulesets, generation, decoded
        self._states, self.announced = states, decoded
        self.full_reads += 1
        return rulesets

    def _table(self, nl: NftNetlink, family: int, nfproto: int, table: str, chain_list: list,
               memo: dict, states: dict) -> tuple[Chains | None, int]:
        found = nl.table(nfproto, table)
        if found is None:
            return None, 0
        cache = self._caches.get((family, table))
        if cache is None or cache.table_handle != found.handle:
            cache = _TableCache(found.handle)
        chains: dict[str, tuple[IptablesRule, ...]] = {name: () for name in BUILTIN_CHAINS[table]}

        shapes = _shapes_of(memo, family)

        def decode(buf, chain: str, handle: int, exprs, udata) -> IptablesRule:
            rule = shapes.decode(buf, exprs, udata, memo) if exprs else None
            return rule if rule is not None else _decode_expressions(buf, exprs, udata, family, memo)

        if len(chain_list) < self.per_chain_dumps_from:
            seen: dict[tuple[str, int], IptablesRule] = {}
            rules, decoded = nl.each_rule(nfproto, table, decode, cache.rules, seen)
            grouped: dict[str, list[IptablesRule]] = {chain.name: [] for chain in chain_list}
            # ``seen`` holds one key per rule, in dump order: each rule's chain.
            for (name, _handle), rule in zip(seen, rules):
                grouped.setdefault(name, []).append(rule)  # a chain new since the chain dump: read again
            chains.update((name, tuple(listed)) for name, listed in grouped.items())
            states[(family, table)] = _state(found.handle, chain_list, seen)
            return chains, decoded
        decoded = 0
        rule_handles: dict[str, tuple[int, ...]] = {}
        for name, rules, handles, count in nl.each_chain_rules(nfproto, table, [chain.name for chain in chain_list],
                                                               decode, cache.rules):
            # None: deleted since the chain dump; the generation check reads again
            chains[name] = tuple(rules) if rules is not None else ()
            if handles:
                rule_handles[name] = tuple(handles)
            decoded += count
        states[(family, table)] = _TableState(found.handle, {chain.name: chain.handle for chain in chain_list},
                                              rule_handles)
        return chains, decoded


def _state(table_handle: int, chain_list: list, seen: dict) -> _TableState:
    """A dumped table's handles: ``seen`` has one (chain, handle) key per rule, in dump order."""
    grouped: dict[str, list[int]] = {}
    for chain, handle in seen:
        grouped.setdefault(chain, []).append(handle)
    return _TableState(table_handle, {chain.name: chain.handle for chain in chain_list},
                       {chain: tuple(handles) for chain, handles in grouped.items()})


def apply_batches(last: list[IptablesRuleset], states: dict[tuple[int, str], _TableState],
                  batches: list[Batch]) -> tuple[list[IptablesRuleset], dict, int, int]:
    """``last`` (and its ``states``) with the feed's committed ``batches`` applied: new
    rulesets and states (the old ones are left as they were: a caller may hold them),
    how many rules were decoded and how many were announced anew. Raises ``_Resync``
    where the events do not fit."""
    orders: dict[tuple[int, str], dict[str, ChainOrder]] = {}
    chain_handles: dict[tuple[int, str], dict[str, int | None]] = {}
    # Per (family, table), by rule handle (the kernel numbers a table's rules and chains from
    # one counter: a handle names one rule of the table): a key tuple per event was a fifth
    # of the work of applying 24,000 of them.
    added: dict[tuple[int, str], dict[int, Event]] = {}
    deleted: dict[tuple[int, str], dict[int, tuple[str, bytes]]] = {}  # the first deletion of each handle
    chains_moved: dict[tuple[int, str], set[str]] = {}  # chains created or deleted, per table
    for batch in batches:
        for (nfproto, table), events in batch.tables.items():
            family = _FAMILY_OF.get(nfproto)
            if family is None or table not in TABLES:
                continue  # not a table iptables-nft keeps kube-proxy's rules in
            key = (family, table)
            state = states.get(key)
            if state is None:
                raise _Resync(f"table {table} of IPv{family} created or deleted")
            handles = chain_handles.get(key)
            if handles is None:
                handles = chain_handles[key] = state.chain_handles  # copied when a chain event changes it
            table_orders = orders.setdefault(key, {})
            for order in table_orders.values():
                order.new_transaction()
            table_added = added.setdefault(key, {})
            table_deleted = deleted.setdefault(key, {})
            kept_handles = state.rule_handles
            last_chain = order = None
            try:
                for event in events:
                    kind, chain = event.kind, event.chain
                    if kind != "newrule" and kind != "delrule":
                        if kind == "newtable" or kind == "deltable":
                            raise _Resync(f"table {table} of IPv{family} created or deleted")
                        if handles is state.chain_handles:
                            handles = chain_handles[key] = dict(handles)  # the served state's is left as it was
                        _apply_event(event, key, state, handles, table_orders)
                        chains_moved.setdefault(key, set()).add(chain)
                        last_chain = None
                        continue
                    # Rule events, nearly all of them: inline (24,000 in one partial sync at 10,000),
                    # a chain's in a row (a flushed chain's deletions, then its rules written again).
                    if chain is not last_chain:
                        if chain not in handles:
                            raise Unordered("a rule of a chain not kept")
                        order = table_orders.get(chain)
                        if order is None:
                            order = table_orders[chain] = ChainOrder(kept_handles.get(chain, ()))
                        last_chain = chain
                    if kind == "newrule":
                        order.add(event.handle, event.position, event.append)
                        table_added[event.handle] = event
                    else:
                        order.delete(event.handle)
                        if event.handle not in table_deleted:
                            table_deleted[event.handle] = (chain, event.body)
            except Unordered as why:
                raise _Resync(f"{table} {event.chain}: {why}") from None
    if not orders:
        return last, states, 0, 0  # only tables this source does not keep changed
    served = {ruleset.family: ruleset.tables for ruleset in last}
    kept_maps: dict[tuple[int, str, str], dict[int, IptablesRule]] = {}

    def kept_of(family: int, table: str, chain: str) -> dict[int, IptablesRule]:
        """The served rules of a chain by handle (built once per chain touched)."""
        found = kept_maps.get((family, table, chain))
        if found is None:
            found = kept_maps[(family, table, chain)] = dict(zip(
                states[(family, table)].rule_handles.get(chain, ()), served[family][table].get(chain, ())))
        return found

    # A rule announced with the bytes of one these transactions deleted decodes as that one
    # did (a decode depends on those bytes alone): kube-proxy's partial sync flushes every
    # top-level chain and writes most of it again unchanged.
    by_bytes: dict[tuple[int, bytes], IptablesRule] = {}
    for (family, table), table_deleted in deleted.items():
        for handle, (chain, rule_bytes) in table_deleted.items():
            rule = kept_of(family, table, chain).get(handle)
            if rule is not None:
                by_bytes[(family, rule_bytes)] = rule
    memo: dict = {}
    decoded = announced = 0
    new_states = dict(states)
    rulesets = []
    for ruleset in last:
        family = ruleset.family
        tables = dict(ruleset.tables)
        for table in TABLES:
            key = (family, table)
            if key not in orders:
                continue
            state, chains = states[key], dict(tables[table])
            handles_of = dict(state.rule_handles)
            # The chains created or deleted alone (not a walk of 61,000 at 10,000 Services).
            for chain in chains_moved.get(key, ()):
                if chain in chain_handles[key]:
                    chains.setdefault(chain, ())
                elif chain not in BUILTIN_CHAINS[table]:
                    chains.pop(chain, None)
                    handles_of.pop(chain, None)
            for chain, order in orders[key].items():
                if chain not in chains:
                    continue  # deleted in a later transaction
                try:
                    handles = order.handles()
                except Unordered as why:
                    raise _Resync(f"{table} {chain}: {why}") from None
                kept = kept_of(family, table, chain)
                table_added = added[key]
                rules = []
                for handle in handles:
                    # A replaced rule (iptables -R) keeps its handle: an announced rule wins.
                    event = table_added.get(handle)
                    if event is None:
                        rules.append(kept[handle])
                        continue
                    announced += 1
                    rule = by_bytes.get((family, event.body))
                    if rule is None:
                        try:
                            exprs, udata = rule_parts(event)
                        except ValueError as err:
                            raise _Resync(f"{table} {chain}: a rule message not understood ({err})", lost=True) from None
                        rule = by_bytes[(family, event.body)] = decode_rule(event.body, exprs, udata, family, memo)
                        decoded += 1
                    rules.append(rule)
                chains[chain] = tuple(rules)
                handles_of[chain] = tuple(handles)
            tables[table] = chains
            new_states[key] = _TableState(state.table_handle, chain_handles[key], handles_of)
        rulesets.append(IptablesRuleset(family, tables))
    return rulesets, new_states, decoded, announced


def _apply_event(event: Event, key: tuple[int, str], state: _TableState, handles: dict,
                 orders: dict[str, ChainOrder]) -> None:
    """A chain event of a kept table into its chain handles and orders."""
    _, table = key
    chain = event.chain
    if event.kind == "newchain":
        if handles.get(chain, event.handle) != event.handle or (
                chain not in handles and event.handle in handles.values()):
            # iptables -E: every jump to the chain now names it anew, and no rule event says so.
            raise _Resync(f"{table}: chain handle {event.handle} renamed", lost=True)
        if chain not in handles:
            handles[chain] = event.handle
            orders[chain] = ChainOrder()
        return
    if event.kind == "delchain":
        order = orders.get(chain)
        left = order.handles() if order is not None else state.rule_handles.get(chain, ())
        if chain not in handles or left:
            raise Unordered("a chain deleted that is not kept empty")
        del handles[chain]
        if chain in BUILTIN_CHAINS[table]:
            orders[chain] = ChainOrder()  # a read shows it, empty
        else:
            orders.pop(chain, None)
