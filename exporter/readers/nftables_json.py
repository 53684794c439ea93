"""kube-proxy's nftables rules from the JSON `nft -j` prints: the offline `diff --rules FILE`.

Takes `nft -j list ruleset`, or `nft -j list table ip kube-proxy` and `... ip6
kube-proxy` (one file each), and answers exactly what the live netlink reader
(``exporter.readers.nftables``) answers for the same rules: both fill a
``FamilyRules`` (the same ``Rule`` / ``Element`` / ``SetInfo`` plain data, element
keys in the kernel's byte layout) and one resolver says what they mean.

JSON carries what netlink carries, spelled differently:
- a rule's ``expr`` list: ``match`` (a test, or a look-up when its right side is
  ``@set``), ``jump``/``goto``/``drop``/... verdicts, ``reject``, ``vmap`` (a named
  map, or an inline anonymous one keyed by ``numgen``), ``dnat`` (an address and
  port, or ``addr.map`` with ``numgen`` key and inline ``addr . port`` data),
  ``set`` (``update @affinity-...``);
- a map's ``elem`` list of ``[key, verdict]``, a key being a value, a ``concat``,
  or ``{"elem": {"val": ..., "comment": ...}}``, typed by the map's ``type``.
Whatever does not have kube-proxy's shape becomes an element or rule the resolver
cannot decode, so it is named in ``unread``, never dropped; a file without
kube-proxy's tables is an error, never an empty table.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

from exporter.readers.nftables import (FAMILIES, TABLE_NAME, FamilyRules, NftablesRead, Resolution,
                                       ResolverCache, _HOST_U32)
from exporter.readers.nftables_netlink import (NF_ACCEPT, NF_DROP, NFT_CONTINUE, NFT_GOTO, NFT_JUMP,
                                               NFT_RETURN, NFT_SET_INTERVAL, NFT_SET_MAP, NFT_SET_TIMEOUT,
                                               Element, NftReadError, Rule, SetInfo, Verdict)

# `nft -j list ruleset` of 10,000 Services x 5 endpoints is 8.5 MB (field.md):
# eight times that is room for any real node, and a bound on what a file may cost.
MAX_JSON_BYTES = 64 * 1024 * 1024
_VERDICTS = {"drop": NF_DROP, "accept": NF_ACCEPT, "jump": NFT_JUMP, "goto": NFT_GOTO,
             "return": NFT_RETURN, "continue": NFT_CONTINUE}
_PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
_ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}


class NftJsonError(NftReadError):
    """A file that is not usable `nft -j` output; the message is one line."""


def load_ruleset_json(raw: bytes, source: str) -> list:
    """The ``nftables`` list of one `nft -j` output. NftJsonError when it is not one."""
    if len(raw) > MAX_JSON_BYTES:
        raise NftJsonError(f"{source} is larger than {MAX_JSON_BYTES // 2**20} MiB: "
                           "not the `nft -j` output of one node's rules")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        cut = " (cut short?)" if isinstance(err, json.JSONDecodeError) and err.pos >= len(raw.rstrip()) else ""
        raise NftJsonError(f"{source} is not JSON{where}{cut}: expected the output of `nft -j list ruleset`") \
            from None
    objects = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(objects, list):
        raise NftJsonError(f"{source} is JSON but not `nft -j` output (no \"nftables\" list): "
                           "expected the output of `nft -j list ruleset`")
    return objects


def read_rules_json(files: list[tuple[str, bytes]]) -> NftablesRead:
    """kube-proxy's tables in one or more `nft -j` outputs (name, bytes), read as the
    live reader reads them. A family's table may be in one file only."""
    start = time.perf_counter()
    by_family: dict[str, list[dict]] = {}
    seen_in: dict[str, str] = {}
    for source, raw in files:
        for obj in load_ruleset_json(raw, source):
            if not isinstance(obj, dict) or len(obj) != 1:
                continue
            (kind, body), = obj.items()
            if not isinstance(body, dict) or body.get("family") not in ("ip", "ip6"):
                continue
            family = body["family"]
            if kind == "table" and body.get("name") == TABLE_NAME:
                if family in seen_in:
                    raise NftJsonError(f"table {family} {TABLE_NAME} is in both {seen_in[family]} and {source}")
                seen_in[family] = source
            elif body.get("table") == TABLE_NAME:
                by_family.setdefault(family, []).append(obj)
    resolution = Resolution()
    for family_name, _, addr_len in FAMILIES:
        if family_name in seen_in:
            objects = by_family.get(family_name, [])
            resolution.add(family_name, lambda: _JsonFamily(family_name, addr_len, objects), ResolverCache())
    if not resolution.present:
        names = ", ".join(name for name, _ in files)
        raise NftJsonError(f"no kube-proxy table (ip or ip6 {TABLE_NAME}) in {names}: "
                           "this node's proxy is not in nftables mode, or the file lists other tables")
    return resolution.result()._replace(read_seconds=time.perf_counter() - start)


class _JsonFamily(FamilyRules):
    """One family's kube-proxy table from `nft -j` objects."""

    def __init__(self, name: str, addr_len: int, objects: list[dict]) -> None:
        self.name, self.addr_len = name, addr_len
        self.version = 4 if addr_len == 4 else 6
        self.sets: dict[str, SetInfo] = {}
        self._set_bodies: dict[str, dict] = {}
        self.chain_names: set[str] = set()
        self.by_chain: dict[str, list[Rule]] = {}
        self._anonymous: dict[tuple[str, int], dict[str, list[Element]]] = {}
        self.rule_count = 0
        for obj in objects:
            (kind, body), = obj.items()
            if kind in ("set", "map"):
                self._add_set(body)
            elif kind == "chain" and isinstance(body.get("name"), str):
                self.chain_names.add(body["name"])
        # Rules after sets: a rule's inline sets are decoded with the types it names.
        for obj in objects:
            (kind, body), = obj.items()
            if kind == "rule" and isinstance(body.get("chain"), str):
                rule, anonymous = _RuleDecoder(self, body).decode()
                self.by_chain.setdefault(rule.chain, []).append(rule)
                self._anonymous[(rule.chain, rule.handle)] = anonymous
                self.rule_count += 1

    def _add_set(self, body: dict) -> None:
        name = body.get("name")
        if not isinstance(name, str):
            return
        flags = NFT_SET_MAP if "map" in body else 0
        declared = body.get("flags") or []
        if "timeout" in declared:
            flags |= NFT_SET_TIMEOUT
        if "interval" in declared:
            flags |= NFT_SET_INTERVAL
        timeout = body.get("timeout")
        timeout_ms = int(timeout) * 1000 if isinstance(timeout, int) and not isinstance(timeout, bool) else None
        self.sets[name] = SetInfo(name, _int(body.get("handle")), flags, 0, 0, timeout_ms)
        self._set_bodies[name] = body

    def named(self, name: str) -> list[Element]:
        body = self._set_bodies[name]
        types = body.get("type")
        types = types if isinstance(types, list) else [types]
        elements = body.get("elem") or []
        if not isinstance(elements, list):
            return [Element(b"", None, 0, None)]
        return [self._element(item, types) for item in elements]

    def anonymous(self, rule: Rule, set_name: str) -> list[Element]:
        inline = self._anonymous.get((rule.chain, rule.handle), {})
        if set_name in inline:
            return inline[set_name]
        if set_name in self._set_bodies:  # a named map in a dnat or vmap: read as any named set
            return self.named(set_name)
        raise NftReadError(f"set {set_name} used by chain {rule.chain} is missing")

    def _element(self, item: Any, types: list) -> Element:
        """``[key, data]`` (a map) or a key (a set), in the kernel's byte layout."""
        key, data = (item[0], item[1]) if isinstance(item, list) and len(item) == 2 else (item, None)
        comment = None
        if isinstance(key, dict) and isinstance(key.get("elem"), dict):
            comment = key["elem"].get("comment")
            key = key["elem"].get("val")
        return Element(self.encode(key, types) or b"", _data(data, self) if data is not None else None, 0,
                       comment if isinstance(comment, str) else None)

    def encode(self, value: Any, types: list) -> bytes | None:
        """A key or value of the given nft types as the kernel stores it (each field
        padded to 4 bytes); None when it is not of those types."""
        parts = value.get("concat") if isinstance(value, dict) else [value]
        if not isinstance(parts, list) or len(parts) != len(types):
            return None
        out = b""
        for part, kind in zip(parts, types):
            field = self._field(part, kind)
            if field is None:
                return None
            out += field + b"\0" * (-len(field) % 4)
        return out

    def _field(self, part: Any, kind: Any) -> bytes | None:
        if kind in _ADDRESS_TYPES:
            try:
                ip = ipaddress.ip_address(part)
            except (TypeError, ValueError):
                return None
            return ip.packed if ip.version == _ADDRESS_TYPES[kind] else None
        if kind == "inet_proto":
            number = _PROTOCOL_NUMBERS.get(part) if isinstance(part, str) else part
            return bytes([number]) if _is_int(number) and 0 <= number <= 255 else None
        if kind == "inet_service":
            port = int(part) if isinstance(part, str) and part.isdigit() else part
            return port.to_bytes(2, "big") if _is_int(port) and 0 <= port <= 65535 else None
        if kind == "integer":  # numgen's keys: host byte order, as numgen writes its register
            return _HOST_U32.pack(part) if _is_int(part) and 0 <= part < 2**32 else None
        return None

    def address_types(self) -> list[str]:
        return ["ipv4_addr" if self.version == 4 else "ipv6_addr", "inet_service"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any) -> int:
    return value if _is_int(value) else 0


def _verdict(value: Any) -> Verdict | None:
    if isinstance(value, dict) and len(value) == 1:
        (name, body), = value.items()
        code = _VERDICTS.get(name)
        if code is None:
            return None
        target = body.get("target") if isinstance(body, dict) else None
        if code in (NFT_JUMP, NFT_GOTO) and not isinstance(target, str):
            return None
        return Verdict(code, target if code in (NFT_JUMP, NFT_GOTO) else None)
    return None


def _data(value: Any, family: _JsonFamily) -> bytes | Verdict | None:
    """A map element's data: a verdict, or an ``addr . port`` DNAT target."""
    verdict = _verdict(value)
    if verdict is not None:
        return verdict
    return family.encode(value, family.address_types())


class _RuleDecoder:
    """One `nft -j` rule into a ``Rule`` and the elements of its inline sets."""

    def __init__(self, family: _JsonFamily, body: dict) -> None:
        self.family, self.body = family, body
        self.anonymous: dict[str, list[Element]] = {}
        self.unknown: list[str] = []
        self.modulus: int | None = None

    def decode(self) -> tuple[Rule, dict[str, list[Element]]]:
        body = self.body
        chain, handle = body["chain"], _int(body.get("handle"))
        verdict = dnat = vmap = None
        conditional = rejects = False
        lookups: list[str] = []
        updates: list[str] = []
        exprs = body.get("expr")
        if not isinstance(exprs, list):
            self.unknown.append("a rule without an expression list")
            exprs = []
        for expr in exprs:
            if not isinstance(expr, dict) or len(expr) != 1:
                self.unknown.append("an expression this reader cannot decode")
                continue
            (kind, arg), = expr.items()
            if kind in _VERDICTS:
                verdict = _verdict(expr)
                if verdict is None:
                    self.unknown.append(f"a {kind} without a target")
            elif kind == "match":
                conditional = True
                right = arg.get("right") if isinstance(arg, dict) else None
                if isinstance(right, str) and right.startswith("@"):
                    lookups.append(right[1:])
            elif kind == "reject":
                rejects = True
            elif kind == "set":
                target = arg.get("set") if isinstance(arg, dict) else None
                if isinstance(target, str):
                    updates.append(target.lstrip("@"))
            elif kind == "vmap":
                vmap = self._map(arg, "verdict")
            elif kind == "dnat":
                dnat = self._dnat(arg)
        comment = body.get("comment")
        rule = Rule(chain, handle, verdict, conditional, dnat, vmap, tuple(lookups), tuple(updates), rejects,
                    comment if isinstance(comment, str) else None, tuple(self.unknown), self.modulus)
        return rule, self.anonymous

    def _map(self, arg: Any, data_kind: str) -> str | None:
        """The set a map look-up reads: ``@name``, or an inline set kept as this rule's own."""
        if not isinstance(arg, dict):
            self.unknown.append(f"a {data_kind} map this reader cannot decode")
            return None
        key, data = arg.get("key"), arg.get("data")
        numgen = key.get("numgen") if isinstance(key, dict) else None
        if isinstance(numgen, dict) and _is_int(numgen.get("mod")):
            self.modulus = numgen["mod"]
        if isinstance(data, str) and data.startswith("@"):
            return data[1:]
        inline = data.get("set") if isinstance(data, dict) else None
        if not isinstance(inline, list):
            self.unknown.append(f"a {data_kind} map this reader cannot decode")
            return None
        name = f"__map{len(self.anonymous)}"
        key_types = ["integer"] if numgen is not None else [None]
        self.anonymous[name] = [self.family._element(item, key_types) for item in inline]
        return name

    def _dnat(self, arg: Any) -> tuple | None:
        if not isinstance(arg, dict):
            self.unknown.append("a dnat this reader cannot decode")
            return None
        addr, port = arg.get("addr"), arg.get("port")
        if isinstance(addr, dict) and "map" in addr:
            name = self._map(addr["map"], "dnat")
            return ("map", name, None) if name is not None else None
        family = self.family
        address = family._field(addr, family.address_types()[0])
        if address is None:
            self.unknown.append("dnat without an address register this reader follows")
            return None
        port_bytes = family._field(port, "inet_service") if port is not None else None
        return ("value", address, port_bytes)
