"""The iptables-nft source's rule shapes (``decode_rule``'s fast path): every rule read through
a shape equals the generic decode, expression by expression, of the same bytes.

Rules: kube-proxy's (tests/ipt_rulesets.py, its own TestOverallIPTablesRules fixture) and
every option the decoders know, loaded with iptables-nft-restore into a namespace of the
test's own; their bytes as the kernel dumps them. Then a random sample of those rules with
one byte changed (an address, a port, a jump, a DNAT, a counter, or a byte no hole holds),
read through the shapes the real rules taught: what a shape fills must be what the generic
decode reads, and what it does not fill must be a constant of the shape.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from exporter.readers import iptables_netlink
from exporter.readers.iptables_netlink import _decode_expressions, decode_rule
from exporter.readers.iptables_nft import FAMILIES, TABLES
from exporter.readers.iptables_rules import IptablesRule
from exporter.readers.nftables_netlink import NftNetlink
from tests import ipt_rulesets
from tests.ipt_rulesets import IptNS
from tests.test_iptables_netlink import EVERY_OPTION

FIXTURES = Path(__file__).parent / "fixtures" / "iptables"


def _load(ns: IptNS, which: str) -> None:
    if which == "generated":
        ns.load(ipt_rulesets.generated_services(), family=4)
        ns.load(ipt_rulesets.generated_services_v6(), family=6)
    elif which == "overall":
        ns.restore((FIXTURES / "overall.rules").read_text())
    elif which == "every-option":
        for family, text in EVERY_OPTION.items():
            ns.restore(text, family=family)
    else:  # 1,100 endpoints: no comments, as kube-proxy writes a large cluster's rules
        ns.load(ipt_rulesets.bench_services(220, 5))


def _raw_rules(ns: IptNS) -> list[tuple[int, bytes, bytes | None]]:
    """(family, expressions, user data) of every rule of both tables and families, in dump order."""
    rules = []

    def keep(family: int):
        def decode(buf, chain, handle, exprs, udata):
            rules.append((family, bytes(buf[slice(*exprs)]) if exprs else b"",
                          bytes(buf[slice(*udata)]) if udata else None))
        return decode

    def dump() -> None:
        with NftNetlink() as nl:
            for family, nfproto in FAMILIES:
                for table in TABLES:
                    if nl.table(nfproto, table) is not None:
                        nl.each_rule(nfproto, table, keep(family))
    ns.run(dump)
    return rules


def _decode(raw: bytes, udata: bytes | None, family: int, memo: dict | None) -> IptablesRule | str:
    """The rule, or the error's type and text (a malformed rule fails alike both ways)."""
    message = raw + (udata or b"")
    where = (len(raw), len(message)) if udata is not None else None
    try:
        if memo is None:
            return _decode_expressions(message, (0, len(raw)), where, family, {})
        return decode_rule(message, (0, len(raw)), where, family, memo)
    except Exception as err:  # noqa: BLE001 - compared, not hidden
        return f"{type(err).__name__}: {err}"


@pytest.mark.parametrize("which", ["generated", "overall", "every-option", "large"])
def test_rules_read_through_shapes_equal_the_generic_decode(which):
    with IptNS() as ns:
        _load(ns, which)
        rules = _raw_rules(ns)
    assert rules
    memo: dict = {}
    for family, raw, udata in rules:
        assert _decode(raw, udata, family, memo) == _decode(raw, udata, family, None), (family, raw)
    shaped = sum(len(shapes) for key, found in memo.items() if isinstance(key, tuple)
                 for shapes in found.by_length.values())
    assert shaped > 0
    if which == "large":  # a large table's rules share a few shapes: the fast path is taken
        assert shaped < 40 < len(rules) / 10

    # One byte changed in a random sample: through the shapes learned above, as the generic decode.
    rng = random.Random(14)
    for _ in range(3000):
        family, raw, udata = rules[rng.randrange(len(rules))]
        changed = bytearray(raw)
        at = rng.randrange(len(raw))
        changed[at] = rng.choice([changed[at] ^ 1, rng.randrange(256), ord("Q")])
        changed = bytes(changed)
        assert _decode(changed, udata, family, memo) == _decode(changed, udata, family, None), (family, raw, at)


def _dnat_rule(address: bytes, port: int, flags: int = 3, high_port: int | None = None) -> bytes:
    """``-p tcp -j DNAT --to-destination A:P`` (rev 2) as iptables-nft writes it: meta, cmp, counter, target."""
    import struct

    from tests.test_iptables_netlink import _attr

    def expression(name: bytes, *fields: tuple[int, bytes]) -> bytes:
        return _attr(1, _attr(1, name + b"\0") + _attr(2, b"".join(_attr(kind, value) for kind, value in fields)))

    be32 = struct.Struct(">I").pack
    info = struct.pack("=I16s16s2s2s", flags, address, address, port.to_bytes(2, "big"),
                       (port if high_port is None else high_port).to_bytes(2, "big")) + b"\0\0\0\0"
    return (expression(b"meta", (2, be32(16)), (1, be32(1)))
            + expression(b"cmp", (1, be32(1)), (2, be32(0)), (3, _attr(1, b"\x06")))
            + expression(b"counter", (1, struct.pack(">Q", port)), (2, struct.pack(">Q", port * 60)))
            + expression(b"target", (1, b"DNAT\0"), (2, be32(2)), (3, info)))


def test_a_shape_fills_each_rules_own_dnat_and_leaves_a_range_to_the_generic_decode():
    memo: dict = {}
    for index in range(1, 50):
        raw = _dnat_rule(bytes([10, 0, 0, index]) + bytes(12), 8000 + index)
        rule = decode_rule(raw, (0, len(raw)), None, 4, memo)
        assert rule == IptablesRule("DNAT", protocol="tcp", to_destination=f"10.0.0.{index}:{8000 + index}")
    # Same length, same constants: a port range or a flag is the generic decode's, not the shape's.
    ranged = _dnat_rule(bytes([10, 0, 0, 1]) + bytes(12), 80, high_port=81)
    assert decode_rule(ranged, (0, len(ranged)), None, 4, memo).unknown == ("-j DNAT --to-destination 10.0.0.1:80-81",)
    random_ = _dnat_rule(bytes([10, 0, 0, 1]) + bytes(12), 80, flags=3 | 4)
    assert decode_rule(random_, (0, len(random_)), None, 4, memo) == _decode_expressions(
        random_, (0, len(random_)), None, 4, {})
    shapes = memo[iptables_netlink._SHAPES_KEY, 4].by_length
    assert sum(map(len, shapes.values())) == 1  # the 49 rules and the two others: one shape
