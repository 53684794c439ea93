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

Cost: one regular-expression scan finds the chain heads, then each chain's entries are
walked with ``struct.unpack_from`` in place to check the table's shape (``LazyChains``);
each chain's entries are decoded when it is asked for, and their verdicts checked then;
counters are never read. Each distinct match or target is decoded once per read (by its
bytes); verdicts are looked up apart (a jump's offset moves whenever anything before its
chain does). Shapes that repeat (an address part's bytes but its two addresses,
matches-and-targets without a comment, or without a DNAT's one address and port) are
kept in a ``BlobMemo`` from one read to the next and never decoded again; a rule's own
parts (its Service's or endpoint's address, comment, DNAT) are set on them every read
and not kept: at 10,000 Services keeping them cost more memory (~60 MB) than the rules
themselves, for a re-read that walks every entry anyway (see
bench/bench_iptables_legacy.py). Whole chains that repeat but for their own parts
(kube-proxy's endpoint and Service chains) are read from a ``ChainTemplate``: one
regular-expression match of the chain's bytes (its own parts any), then those parts set
on the template's rules, decoded as entry by entry; a template is learned from a chain
decoded entry by entry and kept only if it gives that chain's rules back.
"""

from __future__ import annotations

import gc
import hashlib
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import NamedTuple

from exporter.readers import xtables
from exporter.readers.iptables_netlink import (FIELD_PROTOCOLS, PROTOCOLS, _apply_match, _apply_target, _effects,
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
_U16 = struct.Struct("=H")
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
_NO_INTERFACES = bytes(64)
_FULL = {4: b"\xff" * 4, 6: b"\xff" * 16}
_ZERO = {4: b"\0" * 4, 6: b"\0" * 16}
# IptablesRule's fields after the ones the address part sets (target, goto, source, source_negated,
# destination, destination_negated, protocol) and around unknown.
_UNKNOWN = IptablesRule._fields.index("unknown")
_new_rule = tuple.__new__


class BlobError(ValueError):
    """Bytes that are not an x_tables table; the message is one line."""


class BlobMemo:
    """What one source has decoded of one table, by bytes: the shapes of address parts
    (``ip_shape``: by their bytes but the two addresses) and the matches-and-targets that
    repeat (see the module's cost note).

    ``start_read()`` begins a read: what it meets is taken over from the last read's
    dicts (not decoded again), ``end_read()`` drops what the table no longer holds, so
    the memo keeps only the current table's shapes. ``decoded`` counts the parts the
    last read decoded anew."""

    __slots__ = ("ip", "body", "chains", "last_ip", "last_body", "last_chains", "decoded")

    def __init__(self) -> None:
        self.ip: dict = {}
        self.body: dict = {}
        self.chains: dict = {}  # (rules, bytes) -> [ChainTemplate]: whole chains that repeat
        self.last_ip: dict = {}
        self.last_body: dict = {}
        self.last_chains: dict = {}
        self.decoded = 0

    def start_read(self) -> None:
        self.last_ip, self.last_body, self.last_chains = self.ip, self.body, self.chains
        self.ip, self.body, self.chains = {}, {}, {}
        self.decoded = 0

    def end_read(self) -> None:
        self.last_ip, self.last_body, self.last_chains = {}, {}, {}


def _interface(name: bytes, mask: bytes) -> str:
    """iptables' ``-i`` argument: the name, ``+`` when the mask stops before its end (a prefix)."""
    text = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    covered = len(mask) - len(mask.lstrip(b"\xff")) if mask[:1] == b"\xff" else 0
    if covered > len(text) or text.endswith("+"):
        return text  # the whole name (its NUL matched too), or iptables kept the "+" it was given
    return text + "+"


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


def _masked(networks: dict, family: int, address: bytes, mask: bytes, negated: bool,
            option: str) -> tuple[str | None, list]:
    if mask == _FULL[family]:
        return _address(family, address, mask, negated, option)
    key = (address, mask, negated, option)
    found = networks.get(key)
    if found is None:
        found = networks[key] = _address(family, address, mask, negated, option)
    return found


def decode_ip(raw: bytes, family: int, networks: dict | None = None) -> tuple:
    """The address part of one entry (a pure function of its bytes): (goto, source,
    source_negated, destination, destination_negated, protocol, unknown). ``networks``:
    the read's memo of prefixes by (address, mask) (a pod CIDR, 127.0.0.0/8 repeat)."""
    if networks is None:
        networks = {}
    if family == 4 and raw[16:80] == _NO_INTERFACES and not raw[83]:
        # No interface and nothing inverted (most of kube-proxy's rules): addresses with
        # whole masks, a protocol, maybe a goto.
        smsk, dmsk = raw[8:12], raw[12:16]
        if (smsk == b"\xff\xff\xff\xff" or smsk == b"\0\0\0\0") and (dmsk == b"\xff\xff\xff\xff" or dmsk == b"\0\0\0\0") \
                and not raw[82] & ~IPT_F_GOTO:
            proto = raw[80] | raw[81] << 8
            name = PROTOCOLS.get(proto, str(proto)) if proto else None
            if name is None or name in FIELD_PROTOCOLS:
                return (bool(raw[82]), f"{socket.inet_ntop(socket.AF_INET, raw[0:4])}/32" if smsk[0] else None, False,
                        f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}/32" if dmsk[0] else None, False, name, ())
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
        source, more = _masked(networks, family, src, smsk, source_negated, "-s")
        unknown += more
    else:
        source_negated = False
    if dmsk != zero:
        destination, more = _masked(networks, family, dst, dmsk, destination_negated, "-d")
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


_DEFAULT = IptablesRule("")
_TARGET, _TO_DESTINATION = 0, IptablesRule._fields.index("to_destination")
_SOURCE, _DESTINATION = IptablesRule._fields.index("source"), IptablesRule._fields.index("destination")
_COMMENT = IptablesRule._fields.index("comment")
_NAT_RANGE = struct.Struct("=I16s16s2s2s")  # nf_nat_range(2): flags, min_addr, max_addr, min_proto, max_proto
_MAPPED_AND_PORTED = xtables.NF_NAT_RANGE_MAP_IPS | xtables.NF_NAT_RANGE_PROTO_SPECIFIED


def decode_piece(raw: bytes, is_target: bool, family: int) -> tuple[tuple, tuple]:
    """One xt_entry_match / xt_entry_target (header and data) as what it sets:
    ((field index, value), ...) and its unknown texts; a pure function of the bytes.
    Applied in order, pieces make the rule the nft source makes of the same compat
    expressions (its appliers only ever set fields and add unknowns)."""
    if len(raw) < XT_HEADER:
        raise BlobError(f"a {'target' if is_target else 'match'} of {len(raw)} bytes")
    if not is_target and raw[2:10] == b"comment\0" and len(raw) > XT_HEADER:
        # A comment (one per Service, so decoded for each): what decode_match and the
        # nft source's applier make of it, in one step.
        return ((_COMMENT, xtables._cstring(raw[XT_HEADER:XT_HEADER + xtables.XT_MAX_COMMENT_LEN])),), ()
    _size, name_raw, revision = _XT_HEADER.unpack_from(raw)
    name = sys.intern(name_raw.split(b"\0", 1)[0].decode("ascii", "replace"))
    data = raw[XT_HEADER:]
    if is_target and name == "DNAT" and revision in (1, 2) and len(data) >= _NAT_RANGE.size:
        flags, low, high, port_low, port_high = _NAT_RANGE.unpack_from(data)
        if flags == _MAPPED_AND_PORTED and low == high and port_low == port_high:
            # kube-proxy's one DNAT per endpoint (one address, one port, no flag): what the
            # nft source's applier makes of it, in one step, since every endpoint has its own.
            port = int.from_bytes(port_low, "big")
            if family == 4:
                text = f"{socket.inet_ntop(socket.AF_INET, low[:4])}:{port}"
            else:
                address = socket.inet_ntop(socket.AF_INET6, low)
                if "." in address:
                    address = xtables._addr(low, 6)
                text = f"[{address}]:{port}"
            return ((_TARGET, name), (_TO_DESTINATION, text)), ()
    try:
        if is_target:
            decoded = xtables.decode_target(name, revision, data, family)
        else:
            decoded = xtables.decode_match(name, revision, data, family)
    except xtables.XtablesError as err:
        decoded = xtables.Unknown(f"{name} ({err})", revision)
    if is_target:
        _, sets, unknown = _effects(family, _apply_target, name, decoded)
    else:
        _, sets, unknown = _effects(family, _apply_match, decoded)
    return tuple(sorted(sets)), unknown


def decode_body(raw: bytes, matches_end: int, family: int, pieces: dict, own: dict | None = None) -> tuple:
    """An entry's matches (``raw[:matches_end]``) and named target (the rest, if any) as
    (target, the rule's fields between protocol and unknown, unknown, the fields after).
    ``pieces``: the read's memo of ``decode_piece`` by bytes; ``own``: the memo of the
    comments, one Service's each, so kept per chain at most (None: not kept). Kept for
    the whole read, 10,000 Services' comments pinned ~7 MB of the allocator's arenas
    among what the resolution keeps (bench/bench_iptables_legacy.py)."""
    fields = list(_DEFAULT)
    unknown: tuple = ()
    at, end = 0, len(raw)
    while at < end:
        if at + XT_HEADER > end:
            raise BlobError("a match or target header past the entry's end")
        size = _U16.unpack_from(raw, at)[0]
        stop = at + size
        if size < XT_HEADER or stop > end or (at < matches_end < stop):
            raise BlobError(f"a match or target of {size} bytes where {end - at} are left")
        is_target = at >= matches_end
        key = raw[at:stop]
        memo = own if key[2:10] == b"comment\0" else pieces
        piece = memo.get((key, is_target)) if memo is not None else None
        if piece is None:
            piece = decode_piece(key, is_target, family)
            if memo is not None and not (is_target and key[2:7] == b"DNAT\0"):  # one per endpoint: nothing to share
                memo[(key, is_target)] = piece
        for index, value in piece[0]:
            fields[index] = value
        if piece[1]:
            unknown += piece[1]
        at = stop
    return fields[_TARGET], tuple(fields[7:_UNKNOWN]), unknown, tuple(fields[_UNKNOWN + 1:])


def rules_digest(buffer: bytearray, base: int, size: int, family: int) -> bytes:
    """A digest of the entries ``buffer[base:base + size]`` without their counters (which
    move with every packet): equal for two fetches of the same rules. The counters are
    zeroed in place (nothing here reads them). Raises ``BlobError`` on an entry whose
    size does not fit."""
    entry_size = ENTRY_SIZE[family]
    counters_at, next_at = entry_size - 16, OFFSETS_AT[family] + 2  # xt_counters ends the entry
    if len(buffer) < base + size:
        raise BlobError(f"{len(buffer) - base} bytes of entries where the table's info says {size}")
    unpack_u16 = _U16.unpack_from
    zero = bytes(16)
    off = base
    end = base + size
    while off < end:
        if off + entry_size > end:
            raise BlobError(f"an entry at offset {off - base} runs past the table's end ({size} bytes)")
        buffer[off + counters_at:off + entry_size] = zero
        step = unpack_u16(buffer, off + next_at)[0]
        if step < entry_size:
            raise BlobError(f"the entry at offset {off - base} is {step} bytes")
        off += step
    with memoryview(buffer) as view:
        return hashlib.sha256(view[base:end]).digest()


def decode_table(blob: bytearray, base: int, size: int, family: int, hooks: dict[int, int],
                 underflows: dict[int, int], memo: BlobMemo | None = None) -> Chains:
    """The chains of one table, every rule decoded: its entries are ``blob[base:base + size]``
    (the getsockopt's buffer, read in place). ``hooks`` / ``underflows``: hook number ->
    entry offset, from the table's info. Raises ``BlobError``."""
    chains = LazyChains(blob, base, size, family, hooks, underflows, memo)
    try:
        gc_was_enabled = gc.isenabled()
        gc.disable()  # hundreds of thousands of small objects, no cycles (as in parse_save)
        try:
            return {name: chains[name] for name in chains}
        finally:
            if gc_was_enabled:
                gc.enable()
    finally:
        chains.release()  # the caller may free (or resize) its buffer at once


# A chain's span, one int: its first rule's offset, its rules' bytes and its number of rules
# (a tuple of ints per chain was 3 MB more at 60,000 chains, held for the whole read).
_SPAN_SHIFT = 32
_COUNT_MASK = (1 << _SPAN_SHIFT) - 1


class LazyChains(Mapping):
    """One table's chains, each decoded from the blob when asked for and not kept.

    Building it walks every entry once (offsets, chain bounds: the checks that make the
    bytes an x_tables table), and decodes no rule; a verdict that is none of iptables',
    a jump to no chain, a match or target whose size does not fit its entry are found
    when its chain is decoded (``BlobError`` then). ``chains[name]`` decodes that
    chain's rules (from the memo's shapes and the read's pieces) and keeps nothing of them,
    so a caller that walks chains one by one never holds a whole table of rules: at 10,000
    Services the decoded rules of nat were 56 MB at once beside the 61 MB blob, and what
    the resolver keeps of them, allocated among them, pinned most of that memory after
    they were freed. Chains nobody asks for (KUBE-MARK-*, POSTROUTING) are never decoded.
    ``lengths()`` counts rules without decoding them. The object holds the blob until
    ``release()`` or until it is dropped; raises ``BlobError``.
    """

    __slots__ = ("_blob", "_view", "_family", "_spans", "_chain_at", "_memo", "_pieces", "decoded_chains")

    def __init__(self, blob: bytearray, base: int, size: int, family: int, hooks: dict[int, int],
                 underflows: dict[int, int], memo: BlobMemo | None = None) -> None:
        if len(blob) < base + size:
            raise BlobError(f"{len(blob) - base} bytes of entries where the table's info says {size}")
        view = memoryview(blob)[base:base + size]
        try:
            self._spans, self._chain_at = _index(blob, base, view, size, family, hooks, underflows)
        except BlobError:
            view.release()
            raise
        except (struct.error, IndexError, ValueError, UnicodeError) as err:  # bytes past any reason
            view.release()
            raise BlobError(f"entries not understood: {err}") from None
        self._blob, self._view, self._family = blob, view, family
        self._memo = memo if memo is not None else BlobMemo()
        self._pieces: dict = {}  # this read's decoded matches, targets and prefixes, by their bytes
        self.decoded_chains = 0

    def __getitem__(self, name: str) -> tuple[IptablesRule, ...]:
        span = self._spans[name]
        first, size, count = span >> 2 * _SPAN_SHIFT, span >> _SPAN_SHIFT & _COUNT_MASK, span & _COUNT_MASK
        if self._view is None:
            raise BlobError("the table's blob was released")
        try:
            rules = _decode_chain(self._view, first, size, count, self._family, self._chain_at, self._memo,
                                  self._pieces)
        except BlobError:
            raise
        except (struct.error, IndexError, ValueError, UnicodeError) as err:
            raise BlobError(f"chain {name}: entries not understood: {err}") from None
        self.decoded_chains += 1
        return rules

    def __contains__(self, name: object) -> bool:
        return name in self._spans

    def __iter__(self):
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def lengths(self):
        """(chain, number of rules) of every chain, nothing decoded."""
        return ((name, span & _COUNT_MASK) for name, span in self._spans.items())

    def digest(self) -> bytes:
        """``rules_digest`` of the table: its walk zeroed every entry's counters already."""
        if self._view is None:
            raise BlobError("the table's blob was released")
        return hashlib.sha256(self._view).digest()

    def release(self) -> None:
        """Let go of the blob (a chain asked for afterwards is a ``BlobError``)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        self._blob = None
        self._pieces = {}


# A user chain's head: the ERROR target's header, then the chain's name (NUL-terminated
# unless it fills all 32 bytes).
_HEAD_NAME = re.compile(re.escape(_ERROR_HEAD) + rb"([^\x00]{0,32})", re.S)


def _user_chain_heads(blob: bytearray, base: int, size: int, family: int) -> dict[int, str]:
    """Head offset -> chain name of every user chain, found by the ERROR target that heads
    it (one regular-expression scan of the blob, in C; ``_index`` checks each lies on an
    entry). The table's own end marker is an ERROR entry too, and heads nothing."""
    entry = ENTRY_SIZE[family]
    heads: dict[int, str] = {}
    last = size - entry - ERROR_TARGET_SIZE
    at = base + entry
    for found in _HEAD_NAME.finditer(blob, base, base + size):
        head = found.start() - at
        if 0 <= head < last:
            # Not interned: every jump's target is this same object (chain_at), and the
            # interpreter's table of interned strings never shrinks (1.9 MB at 60,000 chains).
            heads[head] = found.group(1).decode("utf-8", "replace")
    return heads


def _index(blob: bytearray, base: int, view: memoryview, size: int, family: int, hooks: dict[int, int],
           underflows: dict[int, int]) -> tuple[dict[str, int], dict[int, str]]:
    """Every chain's span in table order (its first rule's offset << 2 * ``_SPAN_SHIFT`` | its
    rules' bytes << ``_SPAN_SHIFT`` | its number of rules), and offset -> chain where a jump lands.

    Checked here, chain by chain: the chains tile the table from its first byte to its end
    marker (a user chain's head found by the byte search, a built-in chain at its hook's
    entry), every entry's offsets fit it and end exactly at the next chain, a user chain
    closes with its RETURN and a built-in one with its policy where the info says. What a
    rule's target says (a verdict, a jump's chain) is checked when its chain is decoded,
    as its matches are: a second look at every verdict here cost as much as the walk.

    Every entry's counters are zeroed on the way (nothing reads them), so the bytes are
    then what ``rules_digest`` hashes: the digest of a read that decodes costs no walk of
    its own (``LazyChains.digest``)."""
    entry_size, offsets_at = ENTRY_SIZE[family], OFFSETS_AT[family]
    counters_at, zero = entry_size - 16, bytes(16)  # xt_counters ends the entry
    end_marker = size - entry_size - ERROR_TARGET_SIZE
    if end_marker < 0:
        raise BlobError(f"{size} bytes: too short for a table")
    unpack_offsets = _OFFSETS.unpack_from
    unpack_verdict = _VERDICT.unpack_from
    heads = _user_chain_heads(blob, base, size, family)
    head_size = entry_size + ERROR_TARGET_SIZE
    chain_at = {head + head_size: name for head, name in heads.items()}  # where a jump lands -> its chain
    starts: dict[int, int] = {}  # a built-in chain's first entry -> its hook
    for hook, offset in hooks.items():
        if offset in starts or offset in heads or hook not in underflows:
            raise BlobError("a built-in chain's start or policy is not where the table's info says")
        starts[offset] = hook
    if len(underflows) != len(hooks):
        raise BlobError("a built-in chain's start or policy is not where the table's info says")
    bounds = sorted((*heads, *starts))
    if not bounds or bounds[0] != 0:
        raise BlobError("an entry at offset 0 outside any chain")
    bounds.append(end_marker)
    if bounds[-2] >= end_marker:
        raise BlobError("a chain at or past the table's end marker")
    spans: dict[str, int] = {}
    for at, stop in zip(bounds, bounds[1:]):
        name = heads.get(at)
        if name is not None:  # a user chain: its head (ERROR, the name), rules, its closing RETURN
            if unpack_offsets(view, at + offsets_at) != (entry_size, head_size):
                raise BlobError(f"the head of chain {name} at offset {at} is not a chain's head")
            view[at + counters_at:at + entry_size] = zero
            first = off = at + head_size
        else:
            name = HOOK_NAMES[starts[at]]
            first = off = at
        if name in spans:
            raise BlobError(f"chain {name} twice")
        last = -1
        count = 0
        while off < stop:
            target_offset, next_offset = unpack_offsets(view, off + offsets_at)
            if target_offset < entry_size or next_offset < target_offset + XT_HEADER or next_offset & 7:
                raise BlobError(f"the entry at offset {off} has offsets no kernel writes "
                                f"(target at +{target_offset}, next at +{next_offset})")
            view[off + counters_at:off + entry_size] = zero
            last = off
            off += next_offset
            count += 1
        if off != stop:
            raise BlobError(f"chain {name}: an entry at offset {last} runs past the chain's end at {stop}")
        if last < 0:
            raise BlobError(f"chain {name} has no end")
        target_offset, next_offset = unpack_offsets(view, last + offsets_at)
        verdict = unpack_verdict(view, last + target_offset + XT_HEADER)[0] \
            if next_offset - target_offset == STANDARD_TARGET_SIZE and view[last + target_offset + 2] == 0 else None
        if at in heads:
            if verdict != -5 or target_offset != entry_size:
                raise BlobError(f"chain {name} has no end before the next chain at offset {stop}")
        elif last != underflows[starts[at]] or verdict not in (-1, -2):
            raise BlobError(f"the policy of {name} is not where the table's info says, or is not one")
        spans[name] = first << 2 * _SPAN_SHIFT | (last - first) << _SPAN_SHIFT | (count - 1)
    target_offset, next_offset = unpack_offsets(view, end_marker + offsets_at)
    if target_offset != entry_size or view[end_marker + entry_size + 2:end_marker + entry_size + 8] != b"ERROR\0":
        raise BlobError("no end marker (the table is cut short)")
    if end_marker + next_offset != size:
        raise BlobError(f"entries past the end marker ({size - end_marker - next_offset} bytes)")
    view[end_marker + counters_at:end_marker + entry_size] = zero
    return spans, chain_at


# Per family: entry size, address part size, where the offsets are, where an address part's
# shape starts (its masks: what follows the two addresses), the address length and socket
# family: looked up once, not per chain (60,000 calls).
_LAYOUT = {family: (ENTRY_SIZE[family], IP_PART[family], OFFSETS_AT[family], 2 * length, length,
                    socket.AF_INET if family == 4 else socket.AF_INET6, "/32" if family == 4 else "/128")
           for family, length in ((4, 4), (6, 16))}
# How an address part's shape gives an address: none (a zero mask), the host (a whole mask:
# the address and /32, or /128), a prefix (any other mask that is one: the read's networks).
_NO_ADDRESS, _HOST, _PREFIX = 0, 1, 2
# A shape whose address cannot be told from its shape (a mask that is not a prefix puts the
# address into ``unknown``; an IPv6 host that prints with a dot, as ipaddress judges it):
# decoded whole, entry by entry.
_PER_ENTRY = None
# (the rule's fields from its 8th on) of an entry with no matches and a verdict: most of a
# table's user chains end in one and every KUBE-MARK-MASQ jump is one.
_TAIL_AT = 7
_TO_DESTINATION_IN_TAIL = _TO_DESTINATION - _TAIL_AT
_UNKNOWN_IN_TAIL = _UNKNOWN - _TAIL_AT


def _mask_kind(mask: bytes, family: int) -> int | None:
    if mask == _ZERO[family]:
        return _NO_ADDRESS
    if mask == _FULL[family]:
        return _HOST
    return _PREFIX if _network(family, _ZERO[family], mask) is not None else _PER_ENTRY


def ip_shape(ip_raw: bytes, family: int, pieces: dict):
    """What an address part means apart from its two addresses (a pure function of its bytes
    past them): (goto, source kind, source negated, destination kind, destination negated,
    protocol, unknown), the kinds ``_NO_ADDRESS`` / ``_HOST`` / ``_PREFIX``; or ``_PER_ENTRY``
    when the addresses change more than the address fields (see ``_PER_ENTRY``)."""
    length = 4 if family == 4 else 16
    smsk, dmsk = ip_raw[2 * length:3 * length], ip_raw[3 * length:4 * length]
    source_kind, destination_kind = _mask_kind(smsk, family), _mask_kind(dmsk, family)
    if source_kind is _PER_ENTRY or destination_kind is _PER_ENTRY:
        return _PER_ENTRY
    if family == 6:
        # An IPv6 host prints as ipaddress says (IPv4-mapped ones with a dot): as a prefix is.
        source_kind = _PREFIX if source_kind == _HOST else source_kind
        destination_kind = _PREFIX if destination_kind == _HOST else destination_kind
    # Decoded with zero addresses: the masks alone say every field but the addresses' text.
    goto, _, source_negated, _, destination_negated, protocol, unknown = decode_ip(
        bytes(2 * length) + ip_raw[2 * length:], family, pieces)
    return goto, source_kind, source_negated, destination_kind, destination_negated, protocol, unknown


def _decode_entries(view: memoryview, off: int, count: int, family: int, chain_at: dict[int, str], memo: BlobMemo,
                    pieces: dict) -> tuple[IptablesRule, ...]:
    """The ``count`` rules from offset ``off`` (one chain's, its entries' offsets checked by
    ``_index``; its verdicts checked here), entry by entry."""
    entry_size, ip_size, offsets_at, shape_at, length, kind, host_prefix = _LAYOUT[family]
    unpack_offsets = _OFFSETS.unpack_from
    unpack_verdict = _VERDICT.unpack_from
    inet_ntop = socket.inet_ntop
    shapes, body_memo, last_shapes, last_body = memo.ip, memo.body, memo.last_ip, memo.last_body
    rules = []
    append = rules.append
    comments: dict = {}  # this chain's: its rules share their Service's comment
    for _ in range(count):
        target_offset, next_offset = unpack_offsets(view, off + offsets_at)
        nxt = off + next_offset
        target_at = off + target_offset
        shape_key = bytes(view[off + shape_at:off + ip_size])  # all but the two addresses
        shape = shapes.get(shape_key, False)
        if shape is False:
            shape = last_shapes.get(shape_key, False)
            if shape is False:
                shape = ip_shape(bytes(view[off:off + ip_size]), family, pieces)
                memo.decoded += 1
            shapes[shape_key] = shape
        if shape is _PER_ENTRY:
            goto, source, source_negated, destination, destination_negated, protocol, ip_unknown = \
                decode_ip(bytes(view[off:off + ip_size]), family, pieces)
        else:
            goto, source_kind, source_negated, destination_kind, destination_negated, protocol, ip_unknown = shape
            if source_kind is _NO_ADDRESS:
                source = None
            elif source_kind is _HOST:
                source = inet_ntop(kind, view[off:off + length]) + host_prefix
            else:
                source = _masked(pieces, family, bytes(view[off:off + length]), shape_key[:length],
                                 source_negated, "-s")[0]
            if destination_kind is _NO_ADDRESS:
                destination = None
            elif destination_kind is _HOST:
                destination = inet_ntop(kind, view[off + length:off + shape_at]) + host_prefix
            else:
                destination = _masked(pieces, family, bytes(view[off + length:off + shape_at]),
                                      shape_key[length:2 * length], destination_negated, "-d")[0]
        if view[target_at + 2] == 0:  # the standard target: a verdict
            if next_offset - target_offset != STANDARD_TARGET_SIZE:
                raise BlobError(f"the standard target at offset {target_at} is not {STANDARD_TARGET_SIZE} bytes")
            verdict = unpack_verdict(view, target_at + XT_HEADER)[0]
            if verdict >= 0:
                target = "" if verdict == nxt else chain_at.get(verdict)  # "": no -j, the rule only counts
                if target is None:
                    raise BlobError(f"the rule at offset {off} jumps to offset {verdict}, where no chain starts")
            else:
                target = VERDICTS.get(verdict)
                if target is None:
                    raise BlobError(f"the rule at offset {off} has verdict {verdict}, not one iptables writes")
            if target_offset == entry_size:  # no match: a jump or verdict alone (-s X -j KUBE-MARK-MASQ)
                tail = _PLAIN_TAIL
            else:
                body_raw = bytes(view[off + entry_size:target_at])
                if b"comment\0" in body_raw:
                    # A comment: this rule's own (one per Service), composed from the read's
                    # pieces and not kept; only shapes that repeat stay in the memo.
                    tail = _tail_of(decode_body(body_raw, len(body_raw), family, pieces, comments))[1]
                else:
                    body = body_memo.get(body_raw)
                    if body is None:
                        body = last_body.get(body_raw)
                        if body is None:
                            body = _tail_of(decode_body(body_raw, len(body_raw), family, pieces))
                            memo.decoded += 1
                        body_memo[body_raw] = body
                    tail = body[1]
        else:
            body_raw = bytes(view[off + entry_size:nxt])
            matches_end = target_offset - entry_size
            to_destination = None
            if body_raw[matches_end + 2:matches_end + 7] == b"DNAT\0":
                to_destination = _kube_proxy_dnat(body_raw, matches_end, family)
            if to_destination is not None and b"comment\0" not in body_raw:
                # kube-proxy's DNAT, one per endpoint: its matches are a shape that repeats (kept
                # as a standard rule's would be), its one address and port are set on them.
                matches = body_raw[:matches_end]
                body = body_memo.get(matches)
                if body is None:
                    body = last_body.get(matches)
                    if body is None:
                        body = _tail_of(decode_body(matches, matches_end, family, pieces))
                        memo.decoded += 1
                    body_memo[matches] = body
                target = "DNAT"
                tail = body[1]
                tail = tail[:_TO_DESTINATION_IN_TAIL] + (to_destination,) + tail[_TO_DESTINATION_IN_TAIL + 1:]
            elif to_destination is not None or b"comment\0" in body_raw:
                target, tail = _tail_of(decode_body(body_raw, matches_end, family, pieces, comments))
            else:
                body_key = (body_raw,)  # apart from a standard rule's matches that happen to read alike
                body = body_memo.get(body_key)
                if body is None:
                    body = last_body.get(body_key)
                    if body is None:
                        body = _tail_of(decode_body(body_raw, matches_end, family, pieces))
                        memo.decoded += 1
                    body_memo[body_key] = body
                target, tail = body
        if ip_unknown:
            tail = tail[:_UNKNOWN_IN_TAIL] + (ip_unknown + tail[_UNKNOWN_IN_TAIL],) + tail[_UNKNOWN_IN_TAIL + 1:]
        append(_new_rule(IptablesRule, (target, goto, source, source_negated, destination, destination_negated,
                                        protocol) + tail))
        off = nxt
    return tuple(rules)


_PLAIN_TAIL = _DEFAULT[_TAIL_AT:]


def _tail_of(body: tuple) -> tuple:
    """``decode_body``'s (target, middle, unknown, after) as (target, the rule's fields from
    its 8th on): one concatenation per rule rather than three."""
    return body[0], body[1] + (body[2],) + body[3]


# kube-proxy's DNAT target as its header and flags say it: revision 1 or 2 (nf_nat_range,
# nf_nat_range2), one address and one port given.
# The bytes after the size: the name, the revision, the flags.
_DNAT_HEADS = frozenset(_XT_HEADER.pack(0, b"DNAT", revision)[2:] + struct.pack("=I", _MAPPED_AND_PORTED)
                        for revision in (1, 2))
# The target's size, its name, revision and flags, then nf_nat_range's addresses and ports.
_DNAT = struct.Struct("=H34s16s16s2s2s")


def _kube_proxy_dnat(body_raw: bytes, matches_end: int, family: int) -> str | None:
    """``addr:port`` (``[addr]:port``) of a DNAT to one address and one port, else None
    (decoded as any target then). The same text ``decode_piece`` makes of it."""
    if len(body_raw) - matches_end < _DNAT.size:
        return None
    size, head, low, high, port_low, port_high = _DNAT.unpack_from(body_raw, matches_end)
    if head not in _DNAT_HEADS or size != len(body_raw) - matches_end or low != high or port_low != port_high:
        return None
    return _dnat_text(low, port_low, family)


def _dnat_text(address: bytes, port: bytes, family: int) -> str:
    """``addr:port`` (``[addr]:port``) of one nf_nat_range address and port, as iptables-save prints it."""
    number = port[0] << 8 | port[1]
    if family == 4:
        return f"{socket.inet_ntop(socket.AF_INET, address[:4])}:{number}"
    text = socket.inet_ntop(socket.AF_INET6, address)
    if "." in text:
        text = xtables._addr(address, 6)
    return f"[{text}]:{number}"


# -- whole chains that repeat ---------------------------------------------------------------
# kube-proxy writes one chain per endpoint and per Service port, each alike its kind's others
# but for a few bytes (an address, a jump's offset, a DNAT's address and port, counters).
# Such a chain is checked against a template at C speed (one regular expression over its
# bytes, those parts any) and its rules are the template's with those parts set; the parts
# are decoded as ``_decode_entries`` decodes them, so the rules are the same.

TEMPLATES_PER_SHAPE = 4  # templates kept for one (rules, bytes) of a chain
TEMPLATES = 64  # templates kept for one table (each costs a compile, ~0.5 ms for a Service chain)
TEMPLATE_RULES = 64  # chains longer than this (KUBE-SERVICES, KUBE-NODEPORTS) are one of a kind
COMMENT_MATCH_SIZE = XT_HEADER + 256  # xt_comment_info: char comment[256]


class ChainTemplate(NamedTuple):
    pattern: re.Pattern  # the chain's bytes, its own parts any
    values: struct.Struct  # its own parts, read in one call from the chain's first byte
    # Per rule, how it is composed (``_how``) and from which of the values: see ``_from_template``.
    fills: tuple
    # The memo's address-part shapes and bodies its rules were decoded from, (key, value) each:
    # a read that takes the template takes them too, so they stay for the chains it does not fit.
    shapes: tuple
    bodies: tuple


def _decode_chain(view: memoryview, first: int, size: int, count: int, family: int, chain_at: dict[int, str],
                  memo: BlobMemo, pieces: dict) -> tuple[IptablesRule, ...]:
    """The ``count`` rules (``size`` bytes) from offset ``first``: from a template of the
    memo's when one fits, else entry by entry (and a template learned of them)."""
    key = (count, size)
    templates = memo.chains.get(key)
    if templates is None:
        templates = memo.last_chains.get(key)
        if templates is not None:
            memo.chains[key] = templates
            for template in templates:
                memo.ip.update(template.shapes)
                memo.body.update(template.bodies)
    if templates:
        for template in templates:
            if template.pattern.fullmatch(view, first, first + size) is not None:
                rules = _from_template(view, first, template, family, chain_at, pieces)
                if rules is not None:
                    return rules
    rules = _decode_entries(view, first, count, family, chain_at, memo, pieces)
    if (templates is None or len(templates) < TEMPLATES_PER_SHAPE) and 0 < count <= TEMPLATE_RULES \
            and sum(map(len, memo.chains.values())) < TEMPLATES:
        template = _learn_template(view, first, size, count, family, rules, memo)
        if template is not None and _from_template(view, first, template, family, chain_at, pieces) == rules:
            if templates is None:
                templates = memo.chains[key] = []
            templates.append(template)
    return rules


def _learn_template(view: memoryview, first: int, size: int, count: int, family: int,
                    rules: tuple[IptablesRule, ...], memo: BlobMemo) -> ChainTemplate | None:
    """A template of the chain just decoded into ``rules``, or None when a part of it is its
    own in a way a template cannot set (a mask that is no prefix, a DNAT of a range, two
    comments in one rule)."""
    entry_size, ip_size, offsets_at, shape_at, length, _, _ = _LAYOUT[family]
    parts: list[bytes] = []  # the pattern's
    layout = ["="]  # the values' struct
    fills = []
    shapes, bodies = {}, {}
    literal_from = struct_at = first  # where the bytes taken as they are start; where the struct is
    values = 0

    def own(at: int, count: int, code: str | None = None, codes: int = 1) -> int:
        """Bytes ``at`` are the rule's own: any in the pattern, read as ``code`` (None: not read)."""
        nonlocal literal_from, struct_at, values
        parts.append(re.escape(bytes(view[literal_from:at])))
        parts.append(b".{%d}" % count)
        literal_from = at + count
        if code is None:
            return -1
        layout.append(f"{at - struct_at}x{code}")
        struct_at, values = at + count, values + codes
        return values - codes

    off = first
    for rule in rules:
        target_offset, next_offset = _OFFSETS.unpack_from(view, off + offsets_at)
        target_at = off + target_offset
        shape_key = bytes(view[off + shape_at:off + ip_size])
        shape = memo.ip.get(shape_key, False)
        if shape is _PER_ENTRY or shape is False:
            return None
        shapes[shape_key] = shape
        # The body as _decode_entries keeps it in the memo, if it does.
        body_raw = bytes(view[off + entry_size:off + next_offset])
        matches = body_raw[:target_offset - entry_size]
        for body_key in (matches, (body_raw,)):
            if body_key in memo.body:
                bodies[body_key] = memo.body[body_key]
        source_kind, destination_kind = shape[1], shape[3]
        source = own(off, length, f"{length}s") if source_kind is not _NO_ADDRESS else -1
        destination = own(off + length, length, f"{length}s") if destination_kind is not _NO_ADDRESS else -1
        own(off + entry_size - 16, 16)  # the counters
        comment = -1
        at = off + entry_size
        while at < target_at:  # the matches: a comment's text is the rule's own
            match_size = _U16.unpack_from(view, at)[0]
            if match_size < XT_HEADER:
                return None
            if view[at + 2:at + 10] == b"comment\0":
                if comment >= 0 or match_size != COMMENT_MATCH_SIZE or view[at + XT_HEADER - 1] != 0:
                    return None
                read_from = struct_at
                comment = own(at + XT_HEADER, match_size - XT_HEADER, f"{match_size}s")
                layout[-1] = f"{at - read_from}x{match_size}s"  # read with its header, for decode_piece
            at += match_size
        verdict = dnat = -1
        if view[target_at + 2] == 0:
            verdict = own(target_at + XT_HEADER, 4, "i")
        elif view[target_at + 2:target_at + 7] == b"DNAT\0":
            if _kube_proxy_dnat(body_raw, target_offset - entry_size, family) is None:
                return None
            dnat = own(target_at + 2 + 34, 36, "16s16s2s2s", 4)
        nxt = off - first + next_offset
        how, around = _how(verdict, source_kind, destination_kind, dnat, comment, rule)
        if how is _VERDICT_ONLY:
            fills.append((how, verdict, nxt, around))
        elif how is _VERDICT_AND_HOST:
            fills.append((how, verdict, nxt, around, source, rule.goto))
        elif how is _DNAT_ONLY:
            fills.append((how, dnat, around[0], around[1]))
        else:
            fills.append((None, verdict, nxt, source, source_kind, bytes(view[off + shape_at:off + shape_at + length]),
                          destination, destination_kind,
                          bytes(view[off + shape_at + length:off + shape_at + 2 * length]), dnat, comment, rule))
        off += next_offset
    if off != first + size or len(fills) != count:
        return None
    parts.append(re.escape(bytes(view[literal_from:off])))
    return ChainTemplate(re.compile(b"".join(parts), re.S), struct.Struct("".join(layout)), tuple(fills),
                         tuple(shapes.items()), tuple(bodies.items()))


def _target(verdict: int, next_at: int, chain_at: dict[int, str]) -> str | None:
    """A standard target's verdict as ``_decode_entries`` reads it; None when it is none."""
    if verdict >= 0:
        return "" if verdict == next_at else chain_at.get(verdict)
    return VERDICTS.get(verdict)


def _from_template(view: memoryview, first: int, template: ChainTemplate, family: int, chain_at: dict[int, str],
                   pieces: dict) -> tuple[IptablesRule, ...] | None:
    """The rules of the chain at ``first``, whose bytes the template's pattern matched; None
    when one of its own parts is not what the template's was (a verdict of no chain, a DNAT
    of a range): the chain is decoded entry by entry then, and said so there."""
    _, _, _, _, length, kind, host_prefix = _LAYOUT[family]
    inet_ntop = socket.inet_ntop
    values = template.values.unpack_from(view, first)
    rules = []
    append = rules.append
    for fill in template.fills:
        how = fill[0]
        if how is _VERDICT_ONLY:  # a jump (-m statistic ... -j KUBE-SEP-)
            verdict = values[fill[1]]
            target = ("" if verdict == first + fill[2] else chain_at.get(verdict)) if verdict >= 0 \
                else VERDICTS.get(verdict)
            if target is None:
                return None
            append(_new_rule(IptablesRule, (target,) + fill[3]))
            continue
        if how is _VERDICT_AND_HOST:  # -s ENDPOINT -j KUBE-MARK-MASQ
            _, verdict, nxt, around, source, goto = fill
            verdict = values[verdict]
            target = ("" if verdict == first + nxt else chain_at.get(verdict)) if verdict >= 0 \
                else VERDICTS.get(verdict)
            if target is None:
                return None
            append(_new_rule(IptablesRule, (target, goto, inet_ntop(kind, values[source]) + host_prefix) + around))
            continue
        if how is _DNAT_ONLY:  # -p tcp -m tcp -j DNAT --to-destination ENDPOINT:PORT
            _, dnat, head, tail = fill
            to_destination = _to_destination(values, dnat, family)
            if to_destination is None:
                return None
            append(_new_rule(IptablesRule, head + (to_destination,) + tail))
            continue
        _, verdict, nxt, source, source_kind, source_mask, destination, destination_kind, destination_mask, dnat, \
            comment, rule = fill
        fields = list(rule)
        if verdict >= 0:
            fields[_TARGET] = _target(values[verdict], first + nxt, chain_at)
            if fields[_TARGET] is None:
                return None
        if dnat >= 0:
            fields[_TO_DESTINATION] = _to_destination(values, dnat, family)
            if fields[_TO_DESTINATION] is None:
                return None
        if source_kind is _HOST:
            fields[_SOURCE] = inet_ntop(kind, values[source]) + host_prefix
        elif source_kind is _PREFIX:
            fields[_SOURCE] = _masked(pieces, family, values[source], source_mask, rule.source_negated, "-s")[0]
        if destination_kind is _HOST:
            fields[_DESTINATION] = inet_ntop(kind, values[destination]) + host_prefix
        elif destination_kind is _PREFIX:
            fields[_DESTINATION] = _masked(pieces, family, values[destination], destination_mask,
                                           rule.destination_negated, "-d")[0]
        if comment >= 0:
            piece = decode_piece(values[comment], False, family)
            if piece[1] or len(piece[0]) != 1 or piece[0][0][0] != _COMMENT:
                return None
            fields[_COMMENT] = piece[0][0][1]
        append(_new_rule(IptablesRule, fields))
    return tuple(rules)


def _to_destination(values: tuple, at: int, family: int) -> str | None:
    """``addr:port`` of a DNAT's range read into ``values`` from ``at``, as ``_kube_proxy_dnat``
    says it; None when the range is more than one address and port."""
    low, high, port_low, port_high = values[at:at + 4]
    if low != high or port_low != port_high:
        return None
    return _dnat_text(low, port_low, family)


# How a template's rule is composed: its own parts set on the template's rule's fields one by one,
# or, for the kinds most of kube-proxy's rules are, by one concatenation of the fields around them.
_VERDICT_ONLY, _VERDICT_AND_HOST, _DNAT_ONLY = "verdict", "verdict and host", "DNAT"


def _how(verdict_at: int, source_kind: int, destination_kind: int, dnat_at: int, comment_at: int,
         rule: IptablesRule) -> tuple[str | None, tuple]:
    """(how the rule is composed, the fields around its own parts) for ``_from_template``."""
    if destination_kind is _NO_ADDRESS and comment_at < 0:
        if verdict_at >= 0 and dnat_at < 0:
            if source_kind is _NO_ADDRESS:
                return _VERDICT_ONLY, rule[1:]
            if source_kind is _HOST:
                return _VERDICT_AND_HOST, rule[3:]
        elif dnat_at >= 0 and verdict_at < 0 and source_kind is _NO_ADDRESS:
            return _DNAT_ONLY, (rule[:_TO_DESTINATION], rule[_TO_DESTINATION + 1:])
    return None, ()
