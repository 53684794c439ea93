"""The iptables-nft source (exporter/readers/iptables_nft.py: nf_tables over netlink, each
chain dumped and decoded when asked for) and the rule and xtables blob decoders, on real
rules in a network namespace of the test's own (loaded with iptables-nft-restore, read
from a thread that joined the namespace).

What the kernel holds is checked against what `iptables-nft-save` prints for the same
rules, as ``parse_save`` (exporter/readers/iptables_save.py) reads it: every chain of
both tables must read alike, rule by rule (``dict(chains)`` of the source's mappings:
every chain dumped and decoded).
Rulesets: tests/ipt_rulesets.py (kube-proxy's newest layout, both families) and
``EVERY_OPTION`` (each option the decoders know, and some they must name as unknown).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from exporter.readers import iptables_netlink, xtables
from exporter.readers.iptables import resolve_rulesets
from exporter.readers.iptables_nft import IptablesNftSource
from exporter.readers.iptables_rules import IptablesRule, IptablesRuleset
from exporter.readers.iptables_save import parse_save
from tests import ipt_rulesets
from tests.ipt_rulesets import IptNS

@pytest.fixture
def ns():
    with IptNS() as namespace:
        yield namespace


# -- the save text's rules -------------------------------------------------------

def read_tables(ns: IptNS, source: IptablesNftSource | None = None) -> dict[int, IptablesRuleset]:
    source = source or IptablesNftSource()
    return {ruleset.family: ruleset for ruleset in ns.run(source.read)}


def assert_reads_as_saved(ns: IptNS, family: int, read: IptablesRuleset) -> None:
    """The netlink read equals t-iptcore's parse of `iptables-nft-save` on the same rules,
    chain by chain, rule by rule."""
    [parsed] = parse_save(ns.save(family=family), family)
    saved = parsed.tables
    assert set(read.tables) == set(saved)
    for table, chains in saved.items():
        got = dict(read.tables[table])
        assert set(got) == set(chains), table
        for chain, rules in chains.items():
            assert got[chain] == tuple(rules), f"{table} {chain}"
        # The counts the source keeps (the iptables collector's sizes) are the chains' own.
        assert dict(read.tables[table].lengths()) == {chain: len(rules) for chain, rules in chains.items()}, table


# -- kube-proxy's rules ---------------------------------------------------------

def test_generated_rules_read_as_iptables_save_prints_them(ns):
    ns.load(ipt_rulesets.generated_services(), family=4)
    ns.load(ipt_rulesets.generated_services_v6(), family=6)
    read = read_tables(ns)
    for family in (4, 6):
        assert_reads_as_saved(ns, family, read[family])
    nat4 = read[4].tables["nat"]
    svc5 = ipt_rulesets.generated_services()[2]
    sep = ipt_rulesets.chain_name(svc5, "SEP", svc5.endpoints[0])
    assert nat4[sep][1] == IptablesRule(
        "DNAT", protocol="tcp", recent_name=sep, recent_mode="set", comment="ns5/svc5:p80",
        to_destination="10.180.0.3:80")
    assert nat4[ipt_rulesets.chain_name(svc5, "SVC")][3].probability == 0.5
    v6 = ipt_rulesets.generated_services_v6()[0]
    assert read[6].tables["nat"][ipt_rulesets.chain_name(v6, "SEP", v6.endpoints[0])][1].to_destination \
        == "[fd00:10::1]:80"


def test_kube_proxys_own_overall_rules_read_and_resolve_as_the_save_text(ns):
    # tests/fixtures/iptables/overall.rules: kube-proxy's TestOverallIPTablesRules (its header cites it).
    ns.restore((Path(__file__).parent / "fixtures" / "iptables" / "overall.rules").read_text())
    read = ns.run(IptablesNftSource().read)
    assert_reads_as_saved(ns, 4, read[0])
    resolved, from_text = resolve_rulesets(read), resolve_rulesets(parse_save(ns.save(), 4))
    # The source gives both families (IPv6 without tables here), the text only IPv4.
    assert resolved._replace(sizes=None) == from_text._replace(sizes=None)
    assert resolved.sizes["ipv4"] == from_text.sizes["ipv4"]
    assert len(resolved.table) == 12 and not resolved.unread


def test_large_cluster_rules_without_comments_read_alike(ns):
    services = ipt_rulesets.bench_services(220, 5)  # 1,100 endpoints: kube-proxy drops the comments
    ns.load(services)
    read = read_tables(ns)
    assert_reads_as_saved(ns, 4, read[4])
    sep = ipt_rulesets.chain_name(services[0], "SEP", services[0].endpoints[0])
    assert read[4].tables["nat"][sep][0].comment is None


# -- every option -----------------------------------------------------------------

EVERY_OPTION = {4: """\
*nat
:KUBE-TEST - [0:0]
:KUBE-OTHER - [0:0]
-A KUBE-TEST -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-OTHER
-A KUBE-TEST ! -s 10.0.0.0/8 -d 172.30.0.0/16 -p udp -m udp --dport 53 -g KUBE-OTHER
-A KUBE-TEST -s 203.0.113.0/25 ! -d 198.51.100.0/23 -j RETURN
-A KUBE-TEST -p sctp -m sctp --dport 7777 -j RETURN
-A KUBE-TEST -m statistic --mode random --probability 0.2000000000 -j KUBE-OTHER
-A KUBE-TEST -m statistic --mode random --probability 0.3333333333 -j KUBE-OTHER
-A KUBE-TEST -m recent --name KUBE-SEP-X --rcheck --seconds 10800 --reap -j KUBE-OTHER
-A KUBE-TEST -m recent --name KUBE-SEP-X --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-TEST -m recent --name KUBE-SEP-Y --set --mask 255.255.255.0 -j KUBE-OTHER
-A KUBE-TEST -m addrtype --src-type LOCAL -j KUBE-OTHER
-A KUBE-TEST -m addrtype ! --dst-type LOCAL -j KUBE-OTHER
-A KUBE-TEST -m comment --comment "x" -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-OTHER
-A KUBE-TEST -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-TEST -j MARK --or-mark 0x4000
-A KUBE-TEST -j MARK --xor-mark 0x4000
-A KUBE-TEST -j MASQUERADE --random-fully
-A KUBE-TEST -p tcp -j DNAT --to-destination 10.180.0.2
-A KUBE-TEST -i eth0 -j RETURN
-A KUBE-TEST -p tcp --dport 99 -j RETURN
-A KUBE-TEST -m comment --comment "only a comment"
-A KUBE-TEST -p tcp -m tcp --dport 80:90 -j RETURN
-A KUBE-TEST -p tcp -m tcp ! --dport 80 -j RETURN
-A KUBE-TEST -p udp -m udp --sport 53 -j RETURN
-A KUBE-TEST -p icmp -j RETURN
-A KUBE-TEST ! -i eth+ -o lo -j RETURN
-A KUBE-TEST -m mark --mark 0x1 -j RETURN
-A KUBE-TEST -p tcp -j DNAT --to-destination 10.180.0.3:80 --random
-A KUBE-TEST -p tcp -j DNAT --to-destination 10.180.0.4:80-81
COMMIT
*filter
:KUBE-F - [0:0]
-A KUBE-F -m conntrack --ctstate NEW -j REJECT
-A KUBE-F -p tcp -d 1.2.3.4 --dport 80 -j REJECT --reject-with icmp-host-unreachable
-A KUBE-F -p tcp -d 1.2.3.4 --dport 81 -j DROP
-A KUBE-F -p tcp -d 1.2.3.4 --dport 82 -j ACCEPT
COMMIT
""", 6: """\
*nat
:KUBE-TEST - [0:0]
-A KUBE-TEST ! -s fd00:10::/64 -d fd00:10:96::41/128 -p tcp -m tcp --dport 80 -m recent --name KUBE-SEP-Z --rcheck --seconds 60 --reap -j DNAT --to-destination [fd00::1]:80
-A KUBE-TEST -s 10::/20 -j MASQUERADE
-A KUBE-TEST -p tcp -m comment --comment "v6 sep" -m tcp -j DNAT --to-destination [fd00::2]:8080
COMMIT
*filter
:KUBE-F - [0:0]
-A KUBE-F -p udp -d fd00:10:96::53 --dport 53 -j REJECT
COMMIT
"""}


def test_a_read_whose_expression_memo_is_cleared_reads_as_iptables_save(ns, monkeypatch):
    # A memo of 8 expressions is cleared every few rules: what was decoded again reads alike.
    monkeypatch.setattr(iptables_netlink, "MEMO_SIZE", 8)
    ns.load(ipt_rulesets.generated_services(), family=4)
    ns.load(ipt_rulesets.generated_services_v6(), family=6)
    read = read_tables(ns)
    for family in (4, 6):
        assert_reads_as_saved(ns, family, read[family])


def test_every_option_reads_as_iptables_save_prints_it(ns):
    for family, text in EVERY_OPTION.items():
        ns.restore(text, family=family)
    read = read_tables(ns)
    for family in (4, 6):
        assert_reads_as_saved(ns, family, read[family])
    test = read[4].tables["nat"]["KUBE-TEST"]
    assert test[2].source == "203.0.113.0/25" and test[2].destination == "198.51.100.0/23"
    assert test[2].destination_negated
    assert test[3].dport == 7777 and test[3].protocol == "sctp"
    assert [test[4].probability, test[5].probability] == [0.20000000019, 0.33333333349]
    assert test[8].unknown == ("-m recent --mask 255.255.255.0",)
    assert test[11].dport == 3001 and test[11].unknown == ("-m nfacct --nfacct-name localhost_nps_accepted_pkts",)
    assert test[12].unknown == ("-m mark ! --mark 0x4000/0x4000",)
    assert [test[13].set_xmark, test[14].set_xmark] == ["0x4000/0x4000", "0x4000/0x0"]
    assert test[15].unknown == ("-j MASQUERADE --random-fully",)
    assert test[16].unknown == ("-j DNAT --to-destination 10.180.0.2",)
    assert test[17].unknown == ("-i eth0",)
    assert test[19] == IptablesRule("", comment="only a comment")
    reject = read[4].tables["filter"]["KUBE-F"]
    assert reject[0].unknown == ("-m conntrack --ctstate NEW",) and reject[0].reject_with == "icmp-port-unreachable"
    assert reject[1].reject_with == "icmp-host-unreachable"


def test_expressions_no_iptables_option_writes_are_named_unknown(ns):
    ns.restore(EVERY_OPTION[4])
    subprocess_nft(ns, "add set ip nat allowed { type ipv4_addr ; }",
                   "add rule ip nat KUBE-TEST ip saddr @allowed counter return",
                   "add rule ip nat KUBE-TEST ct state new counter accept",
                   "add rule ip nat KUBE-TEST tcp dport 80-90 counter return")
    rules = read_tables(ns)[4].tables["nat"]["KUBE-TEST"]
    assert rules[-3] == IptablesRule("RETURN", unknown=("expr lookup",))
    assert rules[-2] == IptablesRule("ACCEPT", unknown=("expr ct",))
    assert rules[-1] == IptablesRule("RETURN", protocol="tcp", unknown=("expr cmp gte", "expr cmp lte"))


def subprocess_nft(ns: IptNS, *commands: str) -> None:
    import subprocess

    for command in commands:
        subprocess.run(["nsenter", f"--net={ns.path}", "nft", command], check=True, capture_output=True)


# -- absent tables, generation, the decode cache ------------------------------------

def test_no_nat_table_reads_as_an_empty_ruleset(ns):
    source = IptablesNftSource()
    assert ns.run(source.read) == [IptablesRuleset(4, {}), IptablesRuleset(6, {})]
    assert ns.run(source.present) is False
    ns.restore("*filter\n:KUBE-F - [0:0]\nCOMMIT\n")
    assert set(read_tables(ns, source)[4].tables) == {"filter"}
    assert ns.run(source.present) is False
    ns.restore("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n", family=6)
    assert ns.run(source.present) is True


def test_generation_moves_on_a_change_and_a_known_one_skips_the_dump(ns):
    source = IptablesNftSource(feed=False)  # the generation alone says whether to read again
    ns.load(ipt_rulesets.generated_services())
    first = ns.run(source.read)
    generation = source.last_generation
    assert ns.run(source.generation) == generation
    assert ns.run(lambda: source.read(known=generation)) is first and source.dumped == 0
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    assert ns.run(source.generation) != generation
    again = ns.run(lambda: source.read(known=generation))
    assert again is not first and again[0].tables["nat"].changed is None  # a full read: all may have moved
    assert again[0].tables["nat"]["KUBE-MARK-MASQ"][-1] == IptablesRule("RETURN")
    assert source.dumped == 1 and source.decoded == len(again[0].tables["nat"]["KUBE-MARK-MASQ"])


def test_a_reread_after_one_service_changed_dumps_only_that_services_chains(ns):
    services = ipt_rulesets.bench_services(60, 5)
    ns.load(services)
    source = IptablesNftSource()
    cache: dict = {}
    first = ns.run(source.read)
    resolve_rulesets(first, None, cache)
    assert ns.run(source.verify)  # as the dataplane does: a walk not verified is not trusted to a digest
    total = sum(length for chains in first[0].tables.values() for _, length in chains.lengths())
    changed = services[7]
    old = list(changed.endpoints)
    ns.restore(ipt_rulesets.endpoints_changed(services, changed, [("10.99.0.1", 8080)] + old[1:]))
    own = {ipt_rulesets.chain_name(changed, kind) for kind in ("SVC", "SVL", "EXT", "FW")} | {
        ipt_rulesets.chain_name(changed, "SEP", endpoint) for endpoint in old + changed.endpoints}
    second = ns.run(source.read)
    nat = second[0].tables["nat"]
    # kube-proxy's partial sync flushed and wrote again every top-level chain, the same:
    # from the feed, only the Service's own chains changed (its KUBE-SVC- chain, the
    # endpoint chain it deleted and the one it made; its KUBE-EXT- for a NodePort).
    assert source.full_reads == 1, source.last_resync
    gone, new = ipt_rulesets.chain_name(changed, "SEP", old[0]), ipt_rulesets.chain_name(changed, "SEP", ("10.99.0.1", 8080))
    assert {gone, new, ipt_rulesets.chain_name(changed, "SVC")} <= nat.changed <= own, nat.changed
    read = resolve_rulesets(second, None, cache)
    # Walked again: that Service's chains, not the table.
    assert 0 < source.decoded < total / 10, (source.decoded, total)
    assert read == resolve_rulesets(ns.run(IptablesNftSource(feed=False).read), None)
    assert_reads_as_saved(ns, 4, second[0])
    assert nat[new][-1].to_destination == "10.99.0.1:8080" and gone not in nat


def test_a_table_created_again_is_decoded_again(ns):
    source = IptablesNftSource()
    ns.restore(EVERY_OPTION[4])
    read_tables(ns, source)
    subprocess_nft(ns, "delete table ip nat")
    ns.restore("*nat\n:KUBE-TEST - [0:0]\n:KUBE-OTHER - [0:0]\n-A KUBE-TEST -j RETURN\nCOMMIT\n")
    # The new table numbers its handles from 1 again: a cache kept by handle alone
    # would hand back the old table's first rule here.
    assert read_tables(ns, source)[4].tables["nat"]["KUBE-TEST"] == (IptablesRule("RETURN"),)


def test_generator_loads_alike_on_both_backends():
    text = {}
    for backend in ("nft", "legacy"):
        with IptNS() as namespace:
            namespace.load(ipt_rulesets.generated_services(), backend=backend)
            [text[backend]] = parse_save(namespace.save(backend=backend), 4)
    assert text["nft"] == text["legacy"]
    assert len(text["nft"].tables["nat"]["KUBE-SERVICES"]) == 8


# -- the blob decoders on their own --------------------------------------------------

def test_decoders_read_the_structs_iptables_writes():
    # Blobs as iptables 1.8.9 wrote them (NFTA_MATCH_INFO / NFTA_TARGET_INFO of the rules above).
    assert xtables.statistic(bytes.fromhex("000000009a999919000000009a9999190000000000000000")) \
        == xtables.Statistic("random", 0.20000000019, None, None, False)
    dnat = xtables.nat_range(bytes.fromhex("030000000ab400010000000000000000000000000ab40001"
                                           "000000000000000000000000005000500000000000000000"), 2, 4)
    assert dnat.to_destination(4) == "10.180.0.1:80" and dnat.flags == ()
    masquerade = xtables.nat_range(bytes.fromhex("010000001000000000000000000000000000000000000000"), 0, 4)
    assert masquerade == xtables.NatRange(None, None, None, None, ("random-fully",))
    assert xtables.mark_target(bytes.fromhex("0040000000400000")).operation == "--or-mark 0x4000"
    assert xtables.mark_target(bytes.fromhex("0040000000000000")).operation == "--xor-mark 0x4000"
    assert xtables.addrtype(bytes.fromhex("0000040002000000"), 1) == xtables.Addrtype(None, False, "LOCAL", True, None)
    assert xtables.reject(bytes.fromhex("03000000"), 4) == xtables.Reject("icmp-port-unreachable")
    v6 = xtables.NatRange("fd00::1", "fd00::1", 80, 80, ())
    assert v6.to_destination(6) == "[fd00::1]:80"
    assert xtables.decode_match("owner", 1, b"", 4) == xtables.Unknown("owner", 1)


def test_a_truncated_blob_is_an_error_and_the_rule_names_it():
    with pytest.raises(xtables.XtablesError):
        xtables.statistic(b"\0" * 8)
    with pytest.raises(xtables.XtablesError):
        xtables.nat_range(b"\0" * 20, 2, 6)
    from exporter.readers.iptables_netlink import decode_rule
    from exporter.readers.nftables_netlink import NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM

    def attr(kind: int, payload: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)

    match = attr(NFTA_LIST_ELEM, attr(NFTA_EXPR_NAME, b"match\0") + attr(NFTA_EXPR_DATA, attr(
        1, b"statistic\0") + attr(2, struct.pack(">I", 0)) + attr(3, b"\0" * 8)))
    rule = decode_rule(match, (0, len(match)), None, 4)
    assert rule.probability is None
    assert rule.unknown == ("-m statistic (statistic info is 8 bytes, its struct needs 16)",)


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _endpoint_rule(index: int) -> bytes:
    """``-s 10.x.y.z/32 -j KUBE-SEP-<index>`` as iptables-nft writes it: payload, cmp, counter,
    immediate (every rule's address and jump differ, as a large table's endpoints do)."""
    def expression(name: bytes, *fields: tuple[int, bytes]) -> bytes:
        data = b"".join(_attr(kind, value) for kind, value in fields)
        return _attr(1, _attr(1, name + b"\0") + _attr(2, data))

    be32 = struct.Struct(">I").pack
    address = bytes([10, index >> 16 & 255, index >> 8 & 255, index & 255])
    verdict = _attr(2, _attr(1, struct.pack(">i", -3)) + _attr(2, f"KUBE-SEP-{index:016d}".encode() + b"\0"))
    return (expression(b"payload", (1, be32(1)), (2, be32(1)), (3, be32(12)), (4, be32(4)))
            + expression(b"cmp", (1, be32(1)), (2, be32(0)), (3, _attr(1, address)))
            + expression(b"counter", (1, struct.pack(">Q", index)), (2, struct.pack(">Q", index * 60)))
            + expression(b"immediate", (1, be32(0)), (2, verdict)))


def test_the_expression_memo_of_a_read_stays_bounded():
    # Most expressions of a large table are one rule's own (its endpoint, its jump): a memo of
    # them all held ~20 MB at 3,000 Services x 5 at the peak of a first read.
    memo: dict = {}
    count = iptables_netlink.MEMO_SIZE * 2
    for index in range(count):
        raw = _endpoint_rule(index)
        rule = iptables_netlink.decode_rule(raw, (0, len(raw)), None, 4, memo)
        assert rule == IptablesRule(f"KUBE-SEP-{index:016d}", source=f"10.{index >> 16 & 255}.{index >> 8 & 255}."
                                    f"{index & 255}/32")
    held = sum(len(entries) if isinstance(entries, dict) else 1 for entries in memo.values())
    assert 0 < held <= iptables_netlink.MEMO_SIZE
