"""The iptables-save text parser, on the text the real tools print (both backends, both families)."""

from __future__ import annotations

import pytest

from exporter.readers.iptables_rules import IptablesRule
from exporter.readers.iptables_save import IptablesSaveError, parse_save
from tests.ipt_ns import BACKENDS, IptNS

# kube-proxy-like rules: every option the parser interprets, and some it keeps as text.
RULES_V4 = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name  localhost_nps_accepted_pkts -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment ns1/svc1:p80 -m recent --name KUBE-SEP-BBBBBBBBBBBBBBBB --rcheck --seconds 10800 --reap -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SEP-BBBBBBBBBBBBBBBB -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-BBBBBBBBBBBBBBBB -m comment --comment ns1/svc1:p80 -m recent --name KUBE-SEP-BBBBBBBBBBBBBBBB --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
COMMIT
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3002 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name  ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -i eth0 -j ACCEPT
COMMIT
"""

SVC = "KUBE-SVC-AAAAAAAAAAAAAAAA"
SEP = "KUBE-SEP-BBBBBBBBBBBBBBBB"


@pytest.fixture(params=BACKENDS)
def ns(request):
    with IptNS(request.param) as namespace:
        yield namespace


def test_rules_as_the_real_tools_save_them(ns):
    ns.restore(RULES_V4)
    text = ns.save()
    (ruleset,) = parse_save(text)
    assert ruleset.family == 4
    nat, filt = ruleset.tables["nat"], ruleset.tables["filter"]
    assert "PREROUTING" in nat and "INPUT" in filt  # built-in chains too
    (cluster_ip, nodeports) = nat["KUBE-SERVICES"]
    assert cluster_ip == IptablesRule(target=SVC, destination="172.30.0.41/32", protocol="tcp", dport=80,
                                      comment="ns1/svc1:p80 cluster IP")
    assert nodeports.dst_type == "LOCAL" and not nodeports.dst_type_negated and nodeports.target == "KUBE-NODEPORTS"
    (localhost,) = nat["KUBE-NODEPORTS"]
    assert (localhost.destination, localhost.dport, localhost.target) == ("127.0.0.0/8", 3001, SVC)
    assert localhost.unknown == ("-m nfacct --nfacct-name localhost_nps_accepted_pkts",)
    masq, affinity, pick = nat[SVC]
    assert (masq.source, masq.source_negated, masq.target) == ("10.0.0.0/8", True, "KUBE-MARK-MASQ")
    assert (affinity.recent_name, affinity.recent_mode, affinity.recent_seconds) == (SEP, "rcheck", 10800)
    assert affinity.unknown == ()  # --reap, --mask 255.255.255.255 and --rsource are understood
    assert (pick.probability, pick.target, pick.comment) == (0.5, SEP, "ns1/svc1:p80 -> 10.180.0.1:80")
    _, dnat = nat[SEP]
    assert (dnat.target, dnat.to_destination, dnat.recent_mode, dnat.unknown) == ("DNAT", "10.180.0.1:80", "set", ())
    assert nat["KUBE-MARK-MASQ"][0].set_xmark == "0x4000/0x4000"
    reject, drop = filt["KUBE-SERVICES"][0], filt["KUBE-EXTERNAL-SERVICES"][0]
    assert (reject.target, reject.reject_with, reject.destination) == ("REJECT", "icmp-port-unreachable",
                                                                       "172.30.0.42/32")
    assert (drop.target, drop.dport, drop.dst_type) == ("DROP", 3002, "LOCAL")
    invalid, iface = filt["KUBE-FORWARD"]
    assert invalid.unknown == ("-m conntrack --ctstate INVALID",
                               "-m nfacct --nfacct-name ct_state_invalid_dropped_pkts")
    assert iface.unknown == ("-i eth0",)


def test_ipv6_from_the_save_header_and_the_addresses(ns):
    rules = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SEP-CCCCCCCCCCCCCCCC - [0:0]
-A KUBE-SERVICES -m tcp -p tcp -d fd00:0:0::10 --dport 53 -j KUBE-SEP-CCCCCCCCCCCCCCCC
-A KUBE-SEP-CCCCCCCCCCCCCCCC -m tcp -p tcp -j DNAT --to-destination [fd00:10:0::5]:53
COMMIT
"""
    ns.restore(rules, family=6)
    text = ns.save(family=6)
    (ruleset,) = parse_save(text)
    assert ruleset.family == 6
    nat = ruleset.tables["nat"]
    assert nat["KUBE-SERVICES"][0].destination == "fd00::10/128"
    assert nat["KUBE-SEP-CCCCCCCCCCCCCCCC"][0].to_destination == "[fd00:10::5]:53"
    # Without the header, the addresses tell; the caller's family wins over both.
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert parse_save(body)[0].family == 6
    assert parse_save(text, family=4)[0].family == 4


def test_the_header_of_every_save_tool_tells_the_family(ns):
    # No address to tell by: only the header of ip6tables-nft-save / ip6tables-legacy-save.
    for family in (4, 6):
        ns.restore("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n", family=family)
    text = ns.save(family=6)
    assert text.startswith("# Generated by ip6tables-")  # -nft-save (nft), -save (legacy)
    assert [r.family for r in parse_save(text)] == [6]
    assert [r.family for r in parse_save(ns.save(family=4))] == [4]


def test_both_saves_in_one_text_give_one_ruleset_per_family():
    v4 = "# Generated by iptables-save v1.8.9\n*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n"
    v6 = "# Generated by ip6tables-save v1.8.9\n*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n"
    assert [r.family for r in parse_save(v4 + v6)] == [4, 6]


def test_options_not_positions():
    orders = [
        "-A X -d 10.0.0.1/32 -p tcp -m comment --comment \"a b\" -m tcp --dport 80 -j Y",
        "-A X -m tcp -p tcp --dport 80 -m comment --comment \"a b\" -d 10.0.0.1 -j Y",
        "-A X -p tcp -m tcp --dport 80 -d 10.0.0.1 -m comment --comment 'a' -j Y".replace("'a'", '"a b"'),
    ]
    parsed = [parse_save(f"*nat\n:X - [0:0]\n:Y - [0:0]\n{rule}\nCOMMIT\n")[0].tables["nat"]["X"][0]
              for rule in orders]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0].comment == "a b" and parsed[0].dport == 80


def test_quoted_comment_with_escaped_quotes():
    text = '*nat\n:X - [0:0]\n-A X -m comment --comment "say \\"hi\\" now" -j RETURN\nCOMMIT\n'
    assert parse_save(text)[0].tables["nat"]["X"][0].comment == 'say "hi" now'


def test_text_without_tables_is_no_ruleset():
    assert parse_save("") == []
    assert parse_save("# Generated by iptables-save v1.8.9\n") == []


@pytest.mark.parametrize("text, where", [
    ('{"nftables": [{"metainfo": {}}]}', "line 1"),
    ("hello world\n", "line 1"),
    ("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\n", "has no COMMIT"),
    ("-A KUBE-SERVICES -j X\n", "line 1: a rule outside a table"),
    ("*nat\n:A - [0:0]\n-A B -j A\nCOMMIT\n", "line 3: a rule of chain B"),
    ("*nat\n:A - [0:0]\n-A A -d\nCOMMIT\n", "line 3: -d without a value"),
    ("*nat\n:A - [0:0]\n-A A -d notanaddress -j A\nCOMMIT\n", "line 3: 'notanaddress' is not an address"),
    ("*nat\n*filter\nCOMMIT\n", "line 2"),
    ("COMMIT\n", "line 1: COMMIT outside a table"),
])
def test_not_iptables_save_output_is_one_line_naming_where(text, where):
    with pytest.raises(IptablesSaveError) as err:
        parse_save(text)
    message = str(err.value)
    assert "\n" not in message and where in message, message
