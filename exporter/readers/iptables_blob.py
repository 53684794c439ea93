"""An x_tables table blob (``IPT_SO_GET_ENTRIES`` / ``IP6T_SO_GET_ENTRIES``) as ``Chains``.

The kernel hands an iptables-legacy table over as one blob of ``struct ipt_entry``
(``ip6t_entry``) records (include/uapi/linux/netfilter_ipv4/ip_tables.h,
netfilter_ipv6/ip6_tables.h, 64-bit layout): the entry's address part (``ipt_ip``:
src, dst, masks, interfaces, protocol, flags, inverse flags), ``target_offset``,
``next_offset``, counters, then its matches (``xt_entry_match``: u16 size, name[29],
revision, the extension's struct) and its target (``xt_entry_target``, same header).
The table's shape is what libiptc reads out of it:

- a built-in chain starts at its hook's entry (``hook_entry`` of ``IPT_SO_GET_INFO``)
  and its last entry is the policy (the hook's ``underflow``);
- a user chain starts with an ``ERROR`` target whose data is the chain's name, and
  its last entry is an unconditional RETURN; the table ends with an ``ERROR`` entry;
- the standard target (name ``""``) holds a verdict: < 0 is ACCEPT (-2), DROP (-1),
  RETURN (-5); >= 0 is the offset of the entry to go on at: the next entry (a rule
  without ``-j``), or the first entry of a user chain (a jump; a goto when the
  ``ipt_ip`` flags say IPT_F_GOTO / IP6T_F_GOTO).

Matches and named targets are decoded by ``exporter.readers.xtables`` and applied
exactly as the iptables-nft source applies its compat expressions
(``iptables_netlink._apply_match`` / ``_apply_target``), so every source of the same
rules gives the same ``IptablesRule``s (what ``parse_save`` makes of
``iptables-legacy-save``'s text too).

Anything the blob holds that is not an x_tables table (a size past its end, an entry
between chains, a jump to no chain, no end marker) is ``BlobError`` with one line:
never a traceback, never the part that was read reported as the whole table.

Cost: the blob is walked with ``struct.unpack_from`` in place; counters are never
read. An entry's address part and its matches-and-target part are decoded once per
distinct bytes (``BlobMemo``: kube-proxy's rules repeat few shapes), verdicts apart
(a jump's offset moves whenever anything before its chain does). A memo kept from
one read to the next makes a re-read decode only the parts it has not met.
"""

from __future__ import annotations

import socket
import struct
import sys

from exporter.readers import xtables
from exporter.readers.iptables_netlink import (FIELD_PROTOCOLS, PROTOCOLS, _apply_match, _apply_target, _Decoding,
                                               _network)
from exporter.readers.iptables_rules import Chains, IptablesRule

HOOK_NAMES = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")  # NF_INET_* order
ENTRY_SIZE = {4: 112, 6: 168}  # sizeof(struct ipt_entry), sizeof(struct ip6t_entry)
IP_PART = {4: 84, 6: 136}  # the ipt_ip / ip6t_ip6 part the rule's meaning is in (no counters, no offsets)
_OFFSETS = struct.Struct("=HH")
OFFSETS_AT = {4: 88, 6: 140}  # target_offset, next_offset
XT_HEADER = 32  # xt_entry_match / xt_entry_target: u16 size, char name[29], u8 revision
_XT_HEADER = struct.Struct("=H29sB")
_VERDICT = struct.Struct("=i")
STANDARD_TARGET_SIZE = 40  # XT_ALIGN(sizeof(struct xt_standard_target))
ERROR_TARGET_SIZE = 64  # XT_ALIGN(sizeof(struct xt_error_target))
_ERROR_HEAD = _XT_HEADER.pack(ERROR_TARGET_SIZE, b"ERROR", 0)
VERDICTS = {-1: "DROP", -2: "ACCEPT", -5: "RETURN"}  # -NF_DROP-1, -NF_ACCEPT-1, XT_RETURN
# ipt_ip: src, dst, smsk, dmsk, iniface[16], outiface[16], iniface_mask[16], outiface_mask[16],
# proto, flags, invflags; ip6t_ip6 has 16-byte addresses and a tos byte before flags.
_IP4 = struct.Struct("=4s4s4s4s16s16s16s16sHBB")
_IP6 = struct.Struct("=16s16s16s16s16s16s16s16sHBBB")
IPT_F_FRAG, IPT_F_GOTO = 0x01, 0x02
IP6T_F_GOTO = 0x04
INV_VIA_IN, INV_VIA_OUT, INV_SRCIP, INV_DSTIP, INV_FRAG, INV_PROTO = 0x01, 0x02, 0x08, 0x10, 0x20, 0x40
_FULL = {4: b"\xff" * 4, 6: b"\xff" * 16}
_ZERO = {4: b"\0" * 4, 6: b"\0" * 16}
# IptablesRule's fields after the ones the address part sets (target, goto, source, source_negated,
# destination, destination_negated, protocol) and around unknown.
_UNKNOWN = IptablesRule._fields.index("unknown")
_new_rule = tuple.__new__


class BlobError(ValueError):
    """Bytes that are not an x_tables table; the message is one line."""


class BlobMemo:
    """What one source has decoded of one table, by bytes: address parts, and
    matches-and-targets.

    ``start_read()`` begins a read: what it meets is taken over from the last read's
    dicts (not decoded again), ``end_read()`` drops what the table no longer holds, so
    the memo keeps only the current table's shapes. ``decoded`` counts the parts the
    last read decoded anew."""

    __slots__ = ("ip", "body", "last_ip", "last_body", "decoded")

    def __init__(self) -> None:
        self.ip: dict = {}
        self.body: dict = {}
        self.last_ip: dict = {}
        self.last_body: dict = {}
        self.decoded = 0

    def start_read(self) -> None:
        self.last_ip, self.last_body = self.ip, self.body
        self.ip, self.body = {}, {}
        self.decoded = 0

    def end_read(self) -> None:
        self.last_ip, self.last_body = {}, {}


def _interface(name: bytes, mask: bytes) -> str:
    """iptables' ``-i`` argument: the name, ``+`` when the mask stops before its end (a prefix)."""
    text = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    covered = len(mask) - len(mask.lstrip(b"\xff")) if mask[:1] == b"\xff" else 0
    return text if covered > len(text) else text + "+"


def _address(family: int, address: bytes, mask: bytes, negated: bool, option: str) -> tuple[str | None, list]:
    """(network text, []) or (None, [unknown text]) for a mask that is not a prefix."""
    if mask == _FULL[family]:
        text = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, address)
        if family == 4 or "." not in text:
            return f"{text}/{32 if family == 4 else 128}", []
        return _network(family, address, None), []
    network = _network(family, address, mask)
    if network is not None:
        return network, []
    kind = socket.AF_INET if family == 4 else socket.AF_INET6
    return None, [f"{'! ' if negated else ''}{option} {socket.inet_ntop(kind, address)}/"
                  f"{socket.inet_ntop(kind, mask)}"]


def decode_ip(raw: bytes, family: int) -> tuple:
    """The address part of one entry (a pure function of its bytes): (goto, source,
    source_negated, destination, destination_negated, protocol, unknown)."""
    if family == 4:
        src, dst, smsk, dmsk, iniface, outiface, inmask, outmask, proto, flags, inv = _IP4.unpack_from(raw)
        goto = bool(flags & IPT_F_GOTO)
    else:
        src, dst, smsk, dmsk, iniface, outiface, inmask, outmask, proto, _tos, flags, inv = _IP6.unpack_from(raw)
        goto = bool(flags & IP6T_F_GOTO)
    unknown: list[str] = []
    source = destination = protocol = None
    source_negated, destination_negated = bool(inv & INV_SRCIP), bool(inv & INV_DSTIP)
    zero = _ZERO[family]
    if smsk != zero:
        source, more = _address(family, src, smsk, source_negated, "-s")
        unknown += more
    else:
        source_negated = False
    if dmsk != zero:
        destination, more = _address(family, dst, dmsk, destination_negated, "-d")
        unknown += more
    else:
        destination_negated = False
    for name, mask, bit, option in ((iniface, inmask, INV_VIA_IN, "-i"), (outiface, outmask, INV_VIA_OUT, "-o")):
        if mask[:1] != b"\0" or name[:1] != b"\0":
            unknown.append(f"{'! ' if inv & bit else ''}{option} {_interface(name, mask)}")
    if proto:
        name = PROTOCOLS.get(proto, str(proto))
        if inv & INV_PROTO or name not in FIELD_PROTOCOLS:
            unknown.append(f"{'! ' if inv & INV_PROTO else ''}-p {name}")
        else:
            protocol = name
    if family == 4 and flags & IPT_F_FRAG:
        unknown.append(f"{'! ' if inv & INV_FRAG else ''}-f")
    return goto, source, source_negated, destination, destination_negated, protocol, tuple(unknown)


def _xt_piece(raw: bytes, at: int, end: int, what: str) -> tuple[str, int, bytes, int]:
    """(name, revision, data, size) of the xt_entry_match / xt_entry_target at ``raw[at:]``."""
    if at + XT_HEADER > end:
        raise BlobError(f"a {what} header past the entry's end")
    size, name, revision = _XT_HEADER.unpack_from(raw, at)
    if size < XT_HEADER or at + size > end:
        raise BlobError(f"a {what} of {size} bytes where {end - at} are left")
    return name.split(b"\0", 1)[0].decode("ascii", "replace"), revision, raw[at + XT_HEADER:at + size], size


def decode_body(raw: bytes, matches_end: int, family: int) -> tuple:
    """An entry's matches (``raw[:matches_end]``) and named target (the rest, if any) as
    (target, the rule's fields between protocol and unknown, unknown, the fields after)."""
    d = _Decoding(family)
    at = 0
    while at < matches_end:
        name, revision, data, size = _xt_piece(raw, at, matches_end, "match")
        try:
            match = xtables.decode_match(name, revision, data, family)
        except xtables.XtablesError as err:
            match = xtables.Unknown(f"{name} ({err})", revision)
        _apply_match(d, match)
        at += size
    if matches_end < len(raw):
        name, revision, data, _size = _xt_piece(raw, matches_end, len(raw), "target")
        try:
            target = xtables.decode_target(name, revision, data, family)
        except xtables.XtablesError as err:
            target = xtables.Unknown(f"{name} ({err})", revision)
        _apply_target(d, sys.intern(name), target)
    rule = d.rule()
    return rule.target, rule[7:_UNKNOWN], rule.unknown, rule[_UNKNOWN + 1:]


def decode_table(blob: bytearray, base: int, size: int, family: int, hooks: dict[int, int],
                 underflows: dict[int, int], memo: BlobMemo | None = None) -> Chains:
    """The chains of one table: its entries are ``blob[base:base + size]`` (the getsockopt's
    buffer, read in place). ``hooks`` / ``underflows``: hook number -> entry offset, from
    the table's info. Raises ``BlobError``."""
    if len(blob) < base + size:
        raise BlobError(f"{len(blob) - base} bytes of entries where the table's info says {size}")
    view = memoryview(blob)[base:base + size]
    try:
        return _decode(blob, base, view, size, family, hooks, underflows, memo or BlobMemo())
    except BlobError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeError) as err:  # bytes past any reason
        raise BlobError(f"entries not understood: {err}") from None
    finally:
        view.release()  # the caller may free (or resize) its buffer at once


def _user_chain_heads(blob: bytearray, base: int, view: memoryview, size: int,
                      family: int) -> dict[int, tuple[int, str]]:
    """Head offset -> (first entry offset, chain name) of every user chain, found by the
    ERROR target that heads it (one byte search; the walk checks each lies on an entry).
    The table's own end marker is an ERROR entry too, and heads nothing."""
    entry = ENTRY_SIZE[family]
    heads: dict[int, tuple[int, str]] = {}
    end = base + size
    at = blob.find(_ERROR_HEAD, base, end)
    while at >= 0:
        head = at - base - entry
        first = head + entry + ERROR_TARGET_SIZE
        if head >= 0 and first < size:
            name = bytes(view[head + entry + XT_HEADER:first]).split(b"\0", 1)[0]
            heads[head] = (first, sys.intern(name.decode("utf-8", "replace")))
        at = blob.find(_ERROR_HEAD, at + 1, end)
    return heads


def _decode(blob: bytearray, base: int, view: memoryview, size: int, family: int, hooks: dict[int, int],
            underflows: dict[int, int], memo: BlobMemo) -> Chains:
    entry_size, ip_size, offsets_at = ENTRY_SIZE[family], IP_PART[family], OFFSETS_AT[family]
    end_marker = size - entry_size - ERROR_TARGET_SIZE
    if end_marker < 0:
        raise BlobError(f"{size} bytes: too short for a table")
    unpack_offsets = _OFFSETS.unpack_from
    unpack_verdict = _VERDICT.unpack_from
    starts = {offset: HOOK_NAMES[hook] for hook, offset in hooks.items()}
    policies = {offset: HOOK_NAMES[hook] for hook, offset in underflows.items()}
    heads = _user_chain_heads(blob, base, view, size, family)
    chain_at = {first: name for first, name in heads.values()}  # where a jump lands -> its chain
    ip_memo, body_memo, last_ip, last_body = memo.ip, memo.body, memo.last_ip, memo.last_body
    chains: dict[str, list] = {}
    rules: list | None = None  # the open chain's rules; None between chains
    name = ""
    user = False
    met_heads = met_starts = met_policies = 0
    off = 0
    while off < size:
        if off + entry_size > size:
            raise BlobError(f"an entry at offset {off} runs past the table's end ({size} bytes)")
        target_offset, next_offset = unpack_offsets(view, off + offsets_at)
        if (target_offset < entry_size or next_offset < target_offset + XT_HEADER
                or off + next_offset > size or next_offset % 8):
            raise BlobError(f"the entry at offset {off} has offsets no kernel writes "
                            f"(target at +{target_offset}, next at +{next_offset})")
        nxt = off + next_offset
        target_at = off + target_offset
        head = heads.get(off)
        if head is not None:  # a user chain's ERROR head
            if rules is not None:
                raise BlobError(f"chain {name} has no end before chain {head[1]}")
            name, user = head[1], True
            if name in chains:
                raise BlobError(f"chain {name} twice")
            rules = chains[name] = []
            met_heads += 1
            off = nxt
            continue
        if off == end_marker:
            if view[target_at + 2:target_at + 8] != b"ERROR\0":
                raise BlobError("no end marker (the table is cut short)")
            if rules is not None:
                raise BlobError(f"chain {name} has no end before the table's")
            off = nxt
            break
        if off in starts:
            if rules is not None:
                raise BlobError(f"chain {name} has no end before {starts[off]}")
            name, user = starts[off], False
            rules = chains[name] = []
            met_starts += 1
        if rules is None:
            raise BlobError(f"an entry at offset {off} outside any chain")
        if view[target_at + 2] == 0:  # the standard target: a verdict
            if next_offset - target_offset != STANDARD_TARGET_SIZE:
                raise BlobError(f"the standard target at offset {target_at} is not {STANDARD_TARGET_SIZE} bytes")
            verdict = unpack_verdict(view, target_at + XT_HEADER)[0]
            if off in policies or (user and (nxt in heads or nxt == end_marker)):
                # A built-in chain's policy, or a user chain's closing RETURN: the chain's end.
                if off in policies:
                    if policies[off] != name or verdict not in (-1, -2):
                        raise BlobError(f"the policy of {policies[off]} at offset {off} is not one")
                    met_policies += 1
                elif verdict != -5 or target_offset != entry_size:
                    raise BlobError(f"chain {name} does not end with its RETURN")
                rules = None
                off = nxt
                continue
            if verdict >= 0:
                if verdict == nxt:
                    target = ""  # no -j: the rule only counts
                else:
                    target = chain_at.get(verdict)
                    if target is None:
                        raise BlobError(f"the rule at offset {off} jumps to offset {verdict}, where no chain starts")
            else:
                target = VERDICTS.get(verdict)
                if target is None:
                    raise BlobError(f"the rule at offset {off} has verdict {verdict}, not one iptables writes")
            body_raw = bytes(view[off + entry_size:target_at])
            body_key = body_raw
        else:
            target = None
            body_raw = bytes(view[off + entry_size:nxt])
            body_key = (body_raw,)  # apart from a standard rule's matches that happen to read alike
        ip_raw = bytes(view[off:off + ip_size])
        ip = ip_memo.get(ip_raw)
        if ip is None:
            ip = last_ip.get(ip_raw)
            if ip is None:
                ip = decode_ip(ip_raw, family)
                memo.decoded += 1
            ip_memo[ip_raw] = ip
        body = body_memo.get(body_key)
        if body is None:
            body = last_body.get(body_key)
            if body is None:
                body = decode_body(body_raw, target_offset - entry_size, family)
                memo.decoded += 1
            body_memo[body_key] = body
        goto, source, source_negated, destination, destination_negated, protocol, ip_unknown = ip
        unknown = ip_unknown + body[2] if ip_unknown else body[2]
        rules.append(_new_rule(IptablesRule, (target if target is not None else body[0], goto, source,
                                              source_negated, destination, destination_negated, protocol)
                               + body[1] + (unknown,) + body[3]))
        off = nxt
    else:
        raise BlobError("no end marker (the table is cut short)")
    if off != size:
        raise BlobError(f"entries past the end marker ({size - off} bytes)")
    if met_heads != len(heads):
        raise BlobError(f"{len(heads) - met_heads} chain head(s) between entries")
    if met_starts != len(starts) or met_policies != len(policies):
        raise BlobError("a built-in chain's start or policy is not where the table's info says")
    return {chain: tuple(chain_rules) for chain, chain_rules in chains.items()}
