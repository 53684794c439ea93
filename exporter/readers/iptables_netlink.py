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

Cost: ``generation()`` is one NFT_MSG_GETGEN. ``read()`` dumps the chains and rules
of the four tables; a rule's expressions never change under its handle (iptables-
restore flushes a rewritten chain and adds its rules anew), so decoded rules are
kept by (family, table, chain, handle), per table handle (a table created again
numbers its handles from 1 again), and a re-read decodes only the new handles.
Within a read each distinct expression is decoded once into the operation it is
(a match, target or verdict: the fields it sets), up to ``MEMO_SIZE`` of them: at
10,000 Services x 5 most of them are one rule's own, and keeping them all had the
peak of a first read at 170 MB RSS (95 MB bounded, most of it the rules themselves).

The socket lives in the network namespace of the thread that opens it, as the
nftables reader's: tests read a namespace of their own from a thread that joined it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys

from exporter.readers import xtables
from exporter.readers.iptables_rules import Chains, IptablesRule, IptablesRuleset
from exporter.readers.nftables_netlink import (_BE32, _NLA, NF_ACCEPT, NF_DROP, NFPROTO_IPV4, NFPROTO_IPV6,
                                               NFT_GOTO, NFT_JUMP, NFT_REG_VERDICT, NFT_RETURN, NFTA_EXPR_DATA,
                                               NFTA_EXPR_NAME, NFTA_LIST_ELEM, NftNetlink, NftReadError, Verdict,
                                               _attrs, _comment, _data)

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
    _UNKNOWN = (_PLACE[name] for name in ("target", "goto", "source", "source_negated", "destination",
                                          "destination_negated", "protocol", "dport", "comment", "unknown"))
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


def decode_rule(buf, exprs: tuple[int, int] | None, udata: tuple[int, int] | None, family: int,
                memo: dict | None = None) -> IptablesRule:
    """One rule's expressions (``exprs``: (start, end) in ``buf``) as an ``IptablesRule``.

    ``memo`` (per family: expression bytes -> operation, and the networks of masked
    address compares; at most ``MEMO_SIZE`` each) spares decoding what a read already
    decoded: a large table repeats the same few hundred expressions (``meta l4proto
    tcp``, ``tcp dport 80``, ``jump KUBE-MARK-MASQ``).
    """
    if memo is None:
        memo = {}
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


class IptablesNftSource:
    """The iptables-nft backend's rules of this network namespace, over nf_tables netlink.

    ``generation()`` says whether anything changed; ``read()`` gives one
    ``IptablesRuleset`` per family (tables nat and filter; an absent table is left
    out of its family's ruleset). The object owns its decode cache; ``decoded``
    says how many rules the last read decoded anew (the rest came from the cache).
    """

    def __init__(self, timeout: float = 5.0, per_chain_dumps_from: int = PER_CHAIN_DUMPS_FROM) -> None:
        self.timeout = timeout
        self.per_chain_dumps_from = per_chain_dumps_from
        self._caches: dict[tuple[int, str], _TableCache] = {}
        self._last: list[IptablesRuleset] | None = None
        self.last_generation: int | None = None
        self.decoded = 0

    def generation(self) -> int:
        with NftNetlink(self.timeout) as nl:
            return nl.generation()

    def present(self) -> bool:
        """A `nat` table with a KUBE-SERVICES chain exists in nf_tables (either family)."""
        with NftNetlink(self.timeout) as nl:
            return any(nl.chain_exists(nfproto, "nat", SERVICES_CHAIN) for _, nfproto in FAMILIES)

    def read(self, known: int | None = None) -> list[IptablesRuleset]:
        """The rulesets of both families. ``known``: the generation of the caller's last
        rulesets; if nf_tables is still at it, those are returned without a dump.

        The generation is read before and after the dumps, and the dumps done again
        if it moved in between (a restore committed mid-read), so the rulesets are
        one generation's; ``last_generation`` is it."""
        with NftNetlink(self.timeout) as nl:
            generation = nl.generation()
            if known is not None and known == generation == self.last_generation and self._last is not None:
                self.decoded = 0
                return self._last
            for _ in range(GENERATION_TRIES):
                decoded = 0
                memo: dict = {}
                rulesets = []
                for family, nfproto in FAMILIES:
                    tables: dict[str, Chains] = {}
                    chain_lists = nl.chains_by_table(nfproto, TABLES)
                    for table in TABLES:
                        chains, count = self._table(nl, family, nfproto, table, chain_lists.get(table, []), memo)
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
        return rulesets

    def _table(self, nl: NftNetlink, family: int, nfproto: int, table: str, chain_list: list,
               memo: dict) -> tuple[Chains | None, int]:
        found = nl.table(nfproto, table)
        if found is None:
            self._caches.pop((family, table), None)
            return None, 0
        cache = self._caches.get((family, table))
        if cache is None or cache.table_handle != found.handle:
            cache = _TableCache(found.handle)
        chains: dict[str, tuple[IptablesRule, ...]] = {name: () for name in BUILTIN_CHAINS[table]}

        def decode(buf, chain: str, handle: int, exprs, udata) -> IptablesRule:
            return decode_rule(buf, exprs, udata, family, memo)

        seen: dict[tuple[str, int], IptablesRule] = {}
        if len(chain_list) < self.per_chain_dumps_from:
            rules, decoded = nl.each_rule(nfproto, table, decode, cache.rules, seen)
            grouped: dict[str, list[IptablesRule]] = {chain.name: [] for chain in chain_list}
            # ``seen`` holds one key per rule, in dump order: each rule's chain.
            for (name, _handle), rule in zip(seen, rules):
                grouped.setdefault(name, []).append(rule)  # a chain new since the chain dump: read again
            chains.update((name, tuple(listed)) for name, listed in grouped.items())
            self._keep(family, table, cache, seen)
            return chains, decoded
        decoded = 0
        for chain in chain_list:
            try:
                rules, count = nl.each_rule(nfproto, table, decode, cache.rules, seen, chain.name)
            except NftReadError as err:
                if err.errno != errno.ENOENT:
                    raise
                rules, count = [], 0  # deleted since the chain dump: the generation check reads again
            chains[chain.name] = tuple(rules)
            decoded += count
        self._keep(family, table, cache, seen)
        return chains, decoded

    def _keep(self, family: int, table: str, cache: _TableCache, seen: dict) -> None:
        cache.rules = seen  # handles gone with their rules leave the cache here
        self._caches[(family, table)] = cache
