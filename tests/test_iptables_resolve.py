"""The iptables resolver on kube-proxy's own rules, loaded into a namespace of the test's own.

Each fixture (tests/fixtures/iptables/, a kube-proxy unit test's expected
iptables-restore input, cited in its header) is loaded with `iptables-nft-restore`
and with `iptables-legacy-restore`, printed back by the same backend's `-save`,
parsed and resolved; the result must equal the iptables-mode desired model of the
Services and EndpointSlices the kube-proxy test builds (written here as the store's
inputs). Drift cases change the loaded rules with the backend's own `iptables`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.dataplane import RealServer, RealServers, VirtualServerKey
from exporter.kube import desired, desired_rules
from exporter.kube.diff import diff_tables
from exporter.readers.iptables import NoKubeProxyRules, chain_services_for, resolve_rulesets
from exporter.readers.iptables_rules import IptablesRuleset
from exporter.readers.iptables_save import parse_save
from tests.ipt_ns import BACKENDS, IptNS
from tests.kube_builders import endpoint, endpoint_slice, service
from tests.test_desired_rules import overall_objects

FIXTURES = Path(__file__).parent / "fixtures" / "iptables"
OVERALL = (FIXTURES / "overall.rules").read_text()
OVERALL_NODE = desired.NodeFacts("test-node", None, ("192.168.0.2",))
HOSTNAME_NODE = desired.NodeFacts("test-hostname", None, ("192.168.0.2",))


def tcp(address, port):
    return VirtualServerKey("TCP", address, port)


@pytest.fixture(params=BACKENDS)
def ns(request):
    with IptNS(request.param) as namespace:
        yield namespace


def read(ns: IptNS, services, families=(4,)):
    rulesets = [rs for family in families for rs in parse_save(ns.save(family), family)]
    return resolve_rulesets(rulesets, chain_services_for(services))


def model(services, slices, node):
    return desired_rules.desired_rules(services, desired.slices_by_service(slices), node, mode="iptables")


def drift(want, live) -> dict:
    """{kind: [str(frontend) or 'frontend -> endpoint']} of what differs, empty kinds left out."""
    result = diff_tables(want.table, live.table, want.rejected, live.rejected)
    out: dict = {}
    for item in result.items():
        text = str(item.vs) + (f" -> {item.real[0]}:{item.real[1]}" if item.real else "")
        out.setdefault(item.kind, []).append(text)
    return {kind: sorted(items) for kind, items in out.items()}


def local_nodeport_objects(cluster_ip, node_port, ips, address_type="IPv4"):
    """TestEnableLocalhostNodePortsIPv6 / TestOnlyLocalNodePortsNoClusterCIDR's objects:
    a Local NodePort Service, one endpoint on no node, one on test-hostname."""
    svc = service("svc1", "ns1", cluster_ip=cluster_ip, type="NodePort", ports=(("p80", "TCP", 80, node_port),),
                  externalTrafficPolicy="Local")
    eps = endpoint_slice("svc1", endpoint(ips[0]), endpoint(ips[1], "test-hostname"), address_type=address_type)
    return [svc], [eps]


# --- kube-proxy's own rules read back equal the model ---------------------------------------


def test_overall_rules_equal_the_model(ns):
    ns.restore(OVERALL)
    services, slices = overall_objects()
    live = read(ns, services)
    want = model(services, slices, OVERALL_NODE)
    assert live.unread == ()
    assert live.table == want.table and live.rejected == want.rejected and live.firewalled == want.firewalled
    assert drift(want, live) == {}
    # What it holds, spelled out: affinity through KUBE-FW -> KUBE-EXT -> KUBE-SVC, the Local
    # Service's external frontends with no endpoint here (dropped), the REJECT of svc6.
    lb = live.table[tcp("5.6.7.8", 80)]
    assert (lb.persistent_timeout, list(lb.real_servers), lb.service) == (10800, [("10.180.0.3", 80)], "ns5/svc5")
    assert live.table[tcp(None, 3001)].real_servers == {} and live.rejected[tcp(None, 3001)] == "drop"
    assert live.rejected[tcp("172.30.0.46", 80)] == "reject" and live.firewalled == {tcp("5.6.7.8", 80)}
    assert live.sizes["ipv4"].services == 5 and live.sizes["ipv4"].endpoints == 6


def test_ipv6_rules_equal_the_model(ns):
    ns.restore((FIXTURES / "localhost-nodeports-ipv6.rules").read_text(), family=6)
    services, slices = local_nodeport_objects("fd00:ab34::20", 30001, ("ff06::c1", "ff06::c2"), "IPv6")
    live = read(ns, services, families=(6,))
    want = model(services, slices, HOSTNAME_NODE)
    assert live.unread == () and drift(want, live) == {}
    assert list(live.table[tcp(None, 30001)].real_servers) == [("ff06::c2", 80)]  # the local endpoint only
    assert sorted(live.table[tcp("fd00:ab34::20", 80)].real_servers) == [("ff06::c1", 80), ("ff06::c2", 80)]
    assert set(live.sizes) == {"ipv6"}


def test_nodeport_addresses_hook_reads_the_same_frontends(ns):
    ns.restore((FIXTURES / "nodeport-addresses.rules").read_text())
    services, slices = local_nodeport_objects("172.30.0.41", 3001, ("10.180.0.1", "10.180.2.1"))
    live = read(ns, services)
    assert live.unread == () and drift(model(services, slices, HOSTNAME_NODE), live) == {}
    assert list(live.table[tcp(None, 3001)].real_servers) == [("10.180.2.1", 80)]


def test_both_families_and_a_dual_stack_nodeport_merged(ns):
    ns.restore((FIXTURES / "nodeport-addresses.rules").read_text())
    ns.restore((FIXTURES / "localhost-nodeports-ipv6.rules").read_text().replace("30001", "3001"), family=6)
    v4, _ = local_nodeport_objects("172.30.0.41", 3001, ("10.180.0.1", "10.180.2.1"))
    live = read(ns, v4, families=(4, 6))
    assert set(live.sizes) == {"ipv4", "ipv6"} and live.unread == ()
    # One NodePort frontend (address None) over both families' rules, each family's local endpoint.
    assert sorted(live.table[tcp(None, 3001)].real_servers) == [("10.180.2.1", 80), ("ff06::c2", 80)]


def test_without_comments_chains_map_to_services_by_their_hash(ns):
    # kube-proxy drops comments past 1,000 endpoints: the chain names alone must do.
    stripped = "\n".join(_without_comment(line) for line in OVERALL.splitlines())
    ns.restore(stripped)
    services, slices = overall_objects()
    live = read(ns, services)
    assert all(rule.comment is None for chains in parse_save(ns.save())[0].tables.values()
               for rules in chains.values() for rule in rules)
    assert live.unread == () and drift(model(services, slices, OVERALL_NODE), live) == {}
    assert live.table[tcp("172.30.0.41", 80)].service == "ns1/svc1"
    # Neither names nor comments: the same table, Services unknown.
    anonymous = resolve_rulesets(parse_save(ns.save()))
    assert {k: vs._replace(service=None) for k, vs in live.table.items()} == anonymous.table


def _without_comment(line: str) -> str:
    if "--comment" not in line:
        return line
    head, _, tail = line.partition(" -m comment --comment ")
    if tail.startswith('"'):
        tail = tail[1:].partition('"')[2]
    else:
        tail = " " + tail.partition(" ")[2]
    return (head + tail).rstrip()


# --- drift, made with the backend's own iptables -----------------------------------------------


@pytest.fixture
def overall(ns):
    ns.restore(OVERALL)
    services, slices = overall_objects()
    return ns, services, model(services, slices, OVERALL_NODE)


def test_a_kube_sep_jump_deleted_is_a_missing_real_server(overall):
    ns, services, want = overall
    ns.iptables("-t", "nat", "-D", "KUBE-SVC-4SW47YFZTEDKD3PK", "3")  # the jump to 10.180.0.5's KUBE-SEP
    live = read(ns, services)
    assert drift(want, live) == {"missing_real_servers": ["TCP 172.30.0.44:80 -> 10.180.0.5:80",
                                                          "TCP 192.168.99.33:80 -> 10.180.0.5:80"]}


def test_a_kube_services_rule_deleted_is_a_missing_virtual_server(overall):
    ns, services, want = overall
    ns.iptables("-t", "nat", "-D", "KUBE-SERVICES", "1")  # ns1/svc1's cluster IP
    assert drift(want, read(ns, services)) == {"missing_virtual_servers": ["TCP 172.30.0.41:80"]}


def test_a_stale_kube_sep_still_jumped_to_is_a_stale_real_server(overall):
    ns, services, want = overall
    ns.iptables("-t", "nat", "-N", "KUBE-SEP-STALESTALESTALE1")
    ns.iptables("-t", "nat", "-A", "KUBE-SEP-STALESTALESTALE1", "-p", "tcp", "-j", "DNAT",
                "--to-destination", "10.180.0.99:80")
    ns.iptables("-t", "nat", "-I", "KUBE-SVC-XPGD46QRK7WJZT7O", "2", "-m", "statistic", "--mode", "random",
                "--probability", "0.5", "-j", "KUBE-SEP-STALESTALESTALE1")
    assert drift(want, read(ns, services)) == {"stale_real_servers": ["TCP 172.30.0.41:80 -> 10.180.0.99:80"]}


def test_a_reject_left_for_a_service_with_ready_endpoints_is_rejected(overall):
    ns, services, want = overall
    ns.iptables("-t", "filter", "-I", "KUBE-SERVICES", "-p", "tcp", "-d", "172.30.0.41", "--dport", "80",
                "-j", "REJECT")
    live = read(ns, services)
    assert live.rejected[tcp("172.30.0.41", 80)] == "reject"
    assert drift(want, live) == {"rejected_virtual_servers": ["TCP 172.30.0.41:80"]}


def test_the_nat_table_flushed_shows_every_frontend_missing(overall):
    ns, services, want = overall
    ns.iptables("-t", "nat", "-F")
    live = read(ns, services)
    assert live.table == {} and live.unread == ()
    found = drift(want, live)
    assert found == {"missing_virtual_servers": sorted(str(k) for k in want.table)}
    # Deleted as well (firewalld's reload): still not an error while the filter rules stay.
    ns.iptables("-t", "nat", "-X")
    assert read(ns, services).table == {}


def test_ipv6_drift_is_read_from_ip6tables(ns):
    ns.restore((FIXTURES / "localhost-nodeports-ipv6.rules").read_text(), family=6)
    services, slices = local_nodeport_objects("fd00:ab34::20", 30001, ("ff06::c1", "ff06::c2"), "IPv6")
    ns.iptables("-t", "nat", "-D", "KUBE-SVC-XPGD46QRK7WJZT7O", "1", family=6)  # ff06::c1's jump
    live = read(ns, services, families=(6,))
    assert drift(model(services, slices, HOSTNAME_NODE), live) == {
        "missing_real_servers": ["TCP [fd00:ab34::20]:80 -> ff06::c1:80"]}


def test_emptied_chains_nothing_references_are_not_drift(overall):
    ns, services, want = overall
    for chain in ("KUBE-SVC-GONEGONEGONEGONE", "KUBE-SEP-GONEGONEGONEGONE", "KUBE-EXT-GONEGONEGONEGONE"):
        ns.iptables("-t", "nat", "-N", chain)
    assert drift(want, read(ns, services)) == {}


# --- what cannot be followed is named, never dropped (text, as a partial save can hold) -----


def _nat(*lines: str, chains=()) -> list[IptablesRuleset]:
    declared = {"KUBE-SERVICES", *chains}
    text = "*nat\n" + "".join(f":{c} - [0:0]\n" for c in sorted(declared)) + "\n".join(lines) + "\nCOMMIT\n"
    return parse_save(text)


FRONT = "-A KUBE-SERVICES -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA"
SVC_TO_SEP = "-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB"
SEP_DNAT = "-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m tcp -j DNAT --to-destination 10.1.0.1:8080"
CHAINS = ("KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB")


def test_a_whole_path_resolves():
    read_ = resolve_rulesets(_nat(FRONT, SVC_TO_SEP, SEP_DNAT, chains=CHAINS))
    assert read_.unread == () and list(read_.table[tcp("10.0.0.1", 80)].real_servers) == [("10.1.0.1", 8080)]


def test_a_services_frontends_share_one_compact_set_of_real_servers():
    """The ClusterIP and the NodePort (KUBE-EXT- to the same KUBE-SVC-) hold one RealServers
    object, its ports one int each, as the nftables reader's frontends do."""
    read_ = resolve_rulesets(_nat(
        FRONT,
        "-A KUBE-SVC-AAAAAAAAAAAAAAAA -m statistic --mode random --probability 0.5 -j KUBE-SEP-CCCCCCCCCCCCCCCC",
        SVC_TO_SEP, SEP_DNAT,
        "-A KUBE-SEP-CCCCCCCCCCCCCCCC -p tcp -m tcp -j DNAT --to-destination 10.1.0.2:8080",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        "-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-AAAAAAAAAAAAAAAA",
        "-A KUBE-EXT-AAAAAAAAAAAAAAAA -j KUBE-MARK-MASQ",
        "-A KUBE-EXT-AAAAAAAAAAAAAAAA -j KUBE-SVC-AAAAAAAAAAAAAAAA",
        chains=CHAINS + ("KUBE-SEP-CCCCCCCCCCCCCCCC", "KUBE-NODEPORTS", "KUBE-EXT-AAAAAAAAAAAAAAAA", "KUBE-MARK-MASQ")))
    cluster_ip, node_port = read_.table[tcp("10.0.0.1", 80)], read_.table[tcp(None, 30080)]
    assert read_.unread == ()
    assert isinstance(cluster_ip.real_servers, RealServers) and node_port.real_servers is cluster_ip.real_servers
    assert cluster_ip.real_servers == {("10.1.0.1", 8080): RealServer("10.1.0.1", 8080),
                                       ("10.1.0.2", 8080): RealServer("10.1.0.2", 8080)}
    first, second = cluster_ip.real_servers
    assert first[1] is second[1]  # 8080 read twice, one int


@pytest.mark.parametrize("lines, chains, words", [
    ((FRONT, SVC_TO_SEP), ("KUBE-SVC-AAAAAAAAAAAAAAAA",), "chain KUBE-SEP-BBBBBBBBBBBBBBBB is missing"),
    ((FRONT, SVC_TO_SEP, "-A KUBE-SEP-BBBBBBBBBBBBBBBB -j KUBE-MARK-MASQ"), CHAINS + ("KUBE-MARK-MASQ",),
     "chain KUBE-SEP-BBBBBBBBBBBBBBBB has no DNAT"),
    ((FRONT, "-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SVC-AAAAAAAAAAAAAAAA"), CHAINS, "loops back"),
    ((FRONT, "-A KUBE-SVC-AAAAAAAAAAAAAAAA -m conntrack --ctstate NEW -j KUBE-SEP-BBBBBBBBBBBBBBBB", SEP_DNAT),
     CHAINS, "-m conntrack --ctstate NEW"),
    ((FRONT, "-A KUBE-SVC-AAAAAAAAAAAAAAAA -j DNAT --to-destination 10.1.0.1:80"), CHAINS,
     "-j DNAT is not one of kube-proxy's paths"),
])
def test_what_cannot_be_followed_is_unread_naming_what_and_where(lines, chains, words):
    read_ = resolve_rulesets(_nat(*lines, chains=chains))
    assert read_.table == {}
    assert len(read_.unread) == 1 and "TCP 10.0.0.1:80" in read_.unread[0] and words in read_.unread[0], read_.unread


def test_a_frontend_rule_this_reader_does_not_understand_is_unread():
    read_ = resolve_rulesets(_nat("-A KUBE-SERVICES -d 10.0.0.0/24 -p tcp -m tcp --dport 80 "
                                  "-j KUBE-SVC-AAAAAAAAAAAAAAAA", SVC_TO_SEP, SEP_DNAT, chains=CHAINS))
    assert read_.table == {} and "KUBE-SERVICES rule 1" in read_.unread[0]


def test_no_kube_chain_anywhere_is_no_kube_proxy_rules():
    with pytest.raises(NoKubeProxyRules):
        resolve_rulesets([])
    with pytest.raises(NoKubeProxyRules):
        resolve_rulesets(parse_save("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j ACCEPT\nCOMMIT\n"))
    # Only the filter table's KUBE- chains left: kube-proxy's trace, every frontend missing.
    only_filter = resolve_rulesets(parse_save("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n"))
    assert only_filter.table == {} and only_filter.unread == ()


def test_a_frontend_unchanged_between_calls_is_the_same_object():
    cache: dict = {}
    first = resolve_rulesets(_nat(FRONT, SVC_TO_SEP, SEP_DNAT, chains=CHAINS), cache=cache)
    again = resolve_rulesets(_nat(FRONT, SVC_TO_SEP, SEP_DNAT, chains=CHAINS), cache=cache)
    key = tcp("10.0.0.1", 80)
    assert again.table[key] is first.table[key]
    changed = resolve_rulesets(_nat(FRONT, SVC_TO_SEP, SEP_DNAT.replace("8080", "9090"), chains=CHAINS), cache=cache)
    assert changed.table[key] is not first.table[key]


# --- tests/ipt_rulesets.py's generated rules: every shape, both families, both backends -------


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_rules_both_families_equal_the_model(backend):
    from tests import ipt_rulesets
    from tests.nft_rulesets import generated_services_v6
    from tests.test_desired_rules import NODE, generated_services, objects_of

    v4, v6 = generated_services(), generated_services_v6()
    with ipt_rulesets.IptNS() as ns:
        ns.load(v4, 4, backend)
        ns.load(v6, 6, backend)
        services, slices = objects_of(v4 + v6)
        rulesets = parse_save(ns.save(4, backend)) + parse_save(ns.save(6, backend))
    live = resolve_rulesets(rulesets, chain_services_for(services))
    want = model(services, slices, NODE)
    assert live.unread == ()
    assert live.table == want.table and live.rejected == want.rejected and live.firewalled == want.firewalled
    # iptables mode's own difference: a LoadBalancer without endpoints has no KUBE-FW chain.
    assert tcp("1.2.3.8", 80) not in live.firewalled and live.rejected[tcp("1.2.3.8", 80)] == "reject"
    assert all(size.hooked for size in live.sizes.values())


def test_another_agents_rule_inside_kube_proxys_chains_is_unread_beside_it_is_not():
    beside = resolve_rulesets(_nat(FRONT, SVC_TO_SEP, SEP_DNAT, "-A CNI-HOSTPORT-DNAT -j RETURN",
                                   chains=CHAINS + ("CNI-HOSTPORT-DNAT",)))
    assert beside.unread == () and len(beside.table) == 1
    inside = resolve_rulesets(_nat("-A KUBE-SERVICES -j CNI-HOSTPORT-DNAT", FRONT, SVC_TO_SEP, SEP_DNAT,
                                   chains=CHAINS + ("CNI-HOSTPORT-DNAT",)))
    assert len(inside.unread) == 1 and "KUBE-SERVICES rule 1 (-j CNI-HOSTPORT-DNAT) is not kube-proxy's" \
        in inside.unread[0]
    old_chain = resolve_rulesets(_nat("-A KUBE-SERVICES -d 10.0.0.2/32 -p tcp -m tcp --dport 80 "
                                      "-j KUBE-XLB-AAAAAAAAAAAAAAAA", chains=("KUBE-XLB-AAAAAAAAAAAAAAAA",)))
    assert "is not kube-proxy's" in old_chain.unread[0]
    filter_ = parse_save("*filter\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 10.0.0.1/32 -p tcp -m tcp "
                         "--dport 80 -m conntrack --ctstate NEW -j REJECT\nCOMMIT\n")
    assert "ipv4 filter: KUBE-SERVICES rule 1 (-j REJECT): -m conntrack --ctstate NEW" in \
        resolve_rulesets(filter_).unread[0]


def test_chain_names_are_kube_proxys_hashes():
    # The chains every cluster has (kube-dns over UDP and TCP, the API server's Service).
    dns = service("kube-dns", "kube-system", cluster_ip="10.96.0.10",
                  ports=(("dns", "UDP", 53, None), ("dns-tcp", "TCP", 53, None)))
    api = service("kubernetes", "default", cluster_ip="10.96.0.1", ports=(("https", "TCP", 443, None),))
    unnamed = service("web", "ns", ports=(("", "TCP", 80, None),))
    names = chain_services_for([dns, api, unnamed])
    assert names["KUBE-SVC-TCOU7JCQXEZGVUNU"] == names["KUBE-SVC-ERIFXISQEP7F7OF4"] == "kube-system/kube-dns"
    assert names["KUBE-SVC-NPX46M4PTMTKRN6Y"] == "default/kubernetes"
    assert len(names) == 4 * 4  # KUBE-SVC-, -SVL-, -EXT-, -FW- of each of the four ports
    assert all(n.startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-")) for n in names)
    from exporter.readers.iptables import port_proto_hash
    assert f"KUBE-SVL-{port_proto_hash('ns/web', 'tcp')}" in names  # an unnamed port: `ns/name` alone
