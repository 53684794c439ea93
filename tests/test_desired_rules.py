"""kube-proxy's nftables (and iptables) mode model, case by case, and against real rules.

Model cases follow kubernetes/kubernetes pkg/proxy/nftables/proxier_test.go (test
names in the test names where one exists: TestOverallNFTablesRules,
TestNoEndpointsReject, TestExternalTrafficPolicyLocal...) and pkg/proxy/topology_test.go.
The strongest checks load rules in a network namespace of the test's own and compare
what the live reader reads with what the model says from the objects the rules came
from: kube-proxy's own TestOverallNFTablesRules (its Services and EndpointSlices built
here as that Go test builds them) and tests/nft_rulesets.py's generated rulesets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.dataplane import RealServer, VirtualServer, VirtualServerKey
from exporter.kube import desired, desired_rules
from exporter.kube.desired_rules import DROP, FIREWALLED, REJECT, UNMAPPED, DesiredRules, rules_view
from exporter.kube.objects import Node, parse_endpoint_slice, parse_service
from exporter.kube.store import ClusterState
from exporter.readers.nftables import SCHEDULER as READER_SCHEDULER
from exporter.readers.nftables import NftablesReader
from tests import nft_rulesets
from tests.kube_builders import NODE, endpoint, endpoint_slice, service
from tests.kube_helpers import api, apiserver  # noqa: F401 (fixtures)
from tests.nft_rulesets import NftNS, ServicePort, ruleset

FIXTURES = Path(__file__).parent / "fixtures" / "nftables"
LB = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}


def rules(svc, *slices, node=NODE) -> DesiredRules:
    return rules_view(desired_rules.frontends_for_service(svc, slices, node))


def tcp(address, port):
    return VirtualServerKey("TCP", address, port)


def eps_of(read: DesiredRules) -> dict[str, list[str]]:
    """{frontend: sorted 'ip:port' endpoints} for compact assertions."""
    return {str(k): sorted(f"{a}:{p}" if ":" not in a else f"[{a}]:{p}" for a, p in vs.real_servers)
            for k, vs in read.table.items()}


# --- frontends, endpoints, shapes ---------------------------------------------------


def test_cluster_ip_in_the_readers_shape():
    out = rules(service(), endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.0.2", "b")))
    assert eps_of(out) == {"TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.0.2:80"]}
    vs = out.table[tcp("10.20.30.41", 80)]
    assert vs == VirtualServer(tcp("10.20.30.41", 80), READER_SCHEDULER, None,
                               {("10.180.0.1", 80): RealServer("10.180.0.1", 80),
                                ("10.180.0.2", 80): RealServer("10.180.0.2", 80)}, "ns1/svc1")
    assert desired_rules.SCHEDULER == READER_SCHEDULER and out.rejected == {} and out.firewalled == frozenset()


def test_no_endpoints_reject_every_frontend_and_map_none():
    # TestNoEndpointsReject: cluster IP, externalIP, NodePort and LoadBalancer IP all REJECT;
    # with no endpoint at all kube-proxy writes no chain, so nothing is in the service maps.
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), externalIPs=["192.168.99.11"], status=LB)
    out = rules(svc, endpoint_slice("svc1"))
    assert out.table == {}
    assert out.rejected == {tcp("10.20.30.41", 80): REJECT, tcp("192.168.99.11", 80): REJECT,
                            tcp("1.2.3.4", 80): REJECT, tcp(None, 3001): REJECT}


def test_node_port_has_no_address_whatever_the_node_addresses():
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001), ("dns", "UDP", 53, 3053)))
    es = endpoint_slice("svc1", endpoint("10.180.0.1"), ports=(("p80", "TCP", 8080), ("dns", "UDP", 5353)))
    for node in (NODE, NODE._replace(addresses=()), NODE._replace(addresses=("192.0.2.1", "2001:db8::1"))):
        assert eps_of(rules(svc, es, node=node)) == {
            "TCP 10.20.30.41:80": ["10.180.0.1:8080"], "TCP None:3001": ["10.180.0.1:8080"],
            "UDP 10.20.30.41:53": ["10.180.0.1:5353"], "UDP None:3053": ["10.180.0.1:5353"]}


def test_external_ips_and_load_balancer_vips_go_to_the_cluster_endpoints():
    svc = service(type="LoadBalancer", ports=(("p80", "SCTP", 80, 3001),), externalIPs=["192.168.99.33"],
                  status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4", "ipMode": "VIP"},
                                                       {"ip": "1.2.3.5", "ipMode": "Proxy"},
                                                       {"hostname": "lb.example"}]}})
    es = endpoint_slice("svc1", endpoint("10.180.0.4"), endpoint("10.180.0.5", "node-a"), ports=(("p80", "SCTP", 80),))
    both = ["10.180.0.4:80", "10.180.0.5:80"]
    assert eps_of(rules(svc, es)) == {"SCTP 10.20.30.41:80": both, "SCTP 192.168.99.33:80": both,
                                      "SCTP 1.2.3.4:80": both, "SCTP None:3001": both}


def test_session_affinity_on_frontends_with_endpoints_only():
    # The timeout lives in the endpoints' affinity sets: a frontend without endpoints shows none.
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), status=LB,
                  externalTrafficPolicy="Local", sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    out = rules(svc, endpoint_slice("svc1", endpoint("10.180.0.1", "other-node")))
    assert out.table[tcp("10.20.30.41", 80)].persistent_timeout == 60
    assert out.table[tcp("1.2.3.4", 80)].persistent_timeout is None
    assert out.table[tcp(None, 3001)].persistent_timeout is None


def test_headless_external_name_and_other_proxies_services_have_no_rules():
    es = endpoint_slice("svc1", endpoint("10.180.0.1"))
    assert rules(service(cluster_ip="None"), es) == DesiredRules({}, {}, frozenset())
    assert rules(service(type="ExternalName", cluster_ip=[], externalName="x.example"), es).table == {}
    assert rules(service(labels={"service.kubernetes.io/service-proxy-name": "other"}), es).table == {}
    assert rules(service(labels={"service.kubernetes.io/headless": ""}), es).table == {}


# --- categorisation: the one kube-proxy uses, shared with IPVS ---------------------------


def test_serving_terminating_endpoints_when_none_is_ready():
    es = endpoint_slice("svc1", endpoint("10.180.0.1", ready=False, serving=True, terminating=True),
                        endpoint("10.180.0.2", ready=False, serving=False, terminating=True),
                        endpoint("10.180.0.3", ready=False, serving=True, terminating=False))
    assert eps_of(rules(service(), es)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"]}
    # With a ready endpoint, the terminating ones are not used.
    es = endpoint_slice("svc1", endpoint("10.180.0.1", ready=False, serving=True, terminating=True),
                        endpoint("10.180.0.4"))
    assert eps_of(rules(service(), es)) == {"TCP 10.20.30.41:80": ["10.180.0.4:80"]}


def test_not_ready_endpoints_only_reject():
    es = endpoint_slice("svc1", endpoint("10.180.0.1", ready=False, serving=False))
    assert rules(service(), es).rejected == {tcp("10.20.30.41", 80): REJECT}


def test_external_local_uses_this_nodes_endpoints():
    # TestExternalTrafficPolicyLocal: external frontends reach the local endpoint, the cluster IP every one.
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), externalIPs=["192.168.99.22"], status=LB,
                  externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.0.2", "other-node"))
    out = rules(svc, es)
    assert eps_of(out) == {"TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.0.2:80"],
                           "TCP 192.168.99.22:80": ["10.180.0.1:80"], "TCP 1.2.3.4:80": ["10.180.0.1:80"],
                           "TCP None:3001": ["10.180.0.1:80"]}
    assert out.rejected == {}


def test_external_local_without_a_local_endpoint_drops_and_does_not_fall_back():
    # No fallback to the Cluster endpoints (IPVS mode's syncEndpoint falls back; nftables
    # and iptables drop): the frontends stay mapped to a chain that only short-circuits.
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), externalIPs=["192.168.99.22"], status=LB,
                  externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.0.2", "other-node"))
    out = rules(svc, es)
    assert eps_of(out) == {"TCP 10.20.30.41:80": ["10.180.0.2:80"], "TCP 192.168.99.22:80": [],
                           "TCP 1.2.3.4:80": [], "TCP None:3001": []}
    assert out.rejected == {tcp("192.168.99.22", 80): DROP, tcp("1.2.3.4", 80): DROP, tcp(None, 3001): DROP}
    ipvs = {str(vs.key): sorted(vs.real_servers)
            for vs in desired.virtual_servers_for_service(svc, [es], NODE, "kube-proxy")}
    assert ipvs["TCP 1.2.3.4:80"] == [("10.180.0.2", 80)]  # the same objects, IPVS's fallback


def test_external_local_with_a_local_terminating_endpoint_uses_it():
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a", ready=False, serving=True, terminating=True),
                        endpoint("10.180.0.2", "other-node"))
    assert eps_of(rules(svc, es)) == {"TCP 10.20.30.41:80": ["10.180.0.2:80"], "TCP None:3001": ["10.180.0.1:80"]}


def test_internal_local():
    svc = service(internalTrafficPolicy="Local")
    local = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.0.2", "other-node"))
    assert eps_of(rules(svc, local)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"]}
    # Endpoints elsewhere only: the cluster IP drops (not mapped); none anywhere: it rejects.
    remote = rules(svc, endpoint_slice("svc1", endpoint("10.180.0.2", "other-node")))
    assert remote.table == {} and remote.rejected == {tcp("10.20.30.41", 80): DROP}
    assert rules(svc, endpoint_slice("svc1")).rejected == {tcp("10.20.30.41", 80): REJECT}
    # A remote terminating endpoint still counts as "has endpoints": drop, not reject.
    terminating = endpoint_slice("svc1", endpoint("10.180.0.2", "other-node", ready=False, serving=True,
                                                  terminating=True))
    assert rules(svc, terminating).rejected == {tcp("10.20.30.41", 80): DROP}


def test_internal_local_external_cluster():
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), internalTrafficPolicy="Local")
    out = rules(svc, endpoint_slice("svc1", endpoint("10.180.0.2", "other-node")))
    assert eps_of(out) == {"TCP None:3001": ["10.180.0.2:80"]}
    assert out.rejected == {tcp("10.20.30.41", 80): DROP}


def test_topology_hints_prefer_the_zone_when_every_ready_endpoint_has_them():
    es = endpoint_slice("svc1", endpoint("10.180.0.1", zones=["zone-a"]), endpoint("10.180.0.2", zones=["zone-b"]))
    assert eps_of(rules(service(), es)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"]}
    missing = endpoint_slice("svc1", endpoint("10.180.0.1", zones=["zone-a"]), endpoint("10.180.0.2"))
    assert eps_of(rules(service(), missing)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.0.2:80"]}
    elsewhere = endpoint_slice("svc1", endpoint("10.180.0.1", zones=["zone-c"]), endpoint("10.180.0.2", zones=["zone-b"]))
    assert eps_of(rules(service(), elsewhere)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.0.2:80"]}


def test_topology_node_hints():
    es = endpoint_slice("svc1", endpoint("10.180.0.1", nodes=["node-a"], zones=["zone-a"]),
                        endpoint("10.180.0.2", nodes=["node-b"], zones=["zone-a"]))
    assert eps_of(rules(service(), es)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"]}


def test_the_ipvs_model_and_this_one_share_the_categorisation():
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),))
    es = endpoint_slice("svc1", endpoint("10.180.0.1", zones=["zone-a"]), endpoint("10.180.0.2", zones=["zone-b"]),
                        endpoint("10.180.0.3", ready=False, serving=True, terminating=True, zones=["zone-a"]))
    ipvs = desired.virtual_servers_for_service(svc, [es], NODE, "kube-proxy")
    nft = desired_rules.frontends_for_service(svc, [es], NODE)
    assert ipvs[0].key == nft[0].key and ipvs[0].real_servers == nft[0].real_servers


# --- LoadBalancer source ranges -------------------------------------------------------------


def test_source_ranges_firewall_load_balancer_vips_of_their_family():
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3002),), externalIPs=["192.168.99.22"],
                  status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}, {"ip": "2001:db8::8"}]}},
                  loadBalancerSourceRanges=[" 203.0.113.0/25", "not a cidr"])
    assert svc.load_balancer_source_ranges == ("203.0.113.0/25",)
    out = rules(svc, endpoint_slice("svc1", endpoint("10.180.0.3")))
    assert out.firewalled == {tcp("5.6.7.8", 80)}  # not the externalIP, not the NodePort, no IPv6 VIP range
    assert FIREWALLED not in out.table[tcp("5.6.7.8", 80)].flags
    # Firewalled with or without endpoints.
    assert rules(svc, endpoint_slice("svc1")).firewalled == {tcp("5.6.7.8", 80)}
    v6 = service(type="LoadBalancer", cluster_ip=["10.20.30.41", "fd00::41"],
                 status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}, {"ip": "2001:db8::8"}]}},
                 loadBalancerSourceRanges=["2001:db8::/64"])
    assert rules(v6, endpoint_slice("svc1", endpoint("10.180.0.3"))).firewalled == {tcp("2001:db8::8", 80)}


def test_iptables_mode_firewalls_only_a_service_with_endpoints():
    # pkg/proxy/iptables/proxier.go: usesFWChain := hasEndpoints && LoadBalancerVIPs && SourceRanges.
    # Without endpoints there is no KUBE-FW chain and no KUBE-PROXY-FIREWALL drop: the VIP is rejected.
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3002),),
                  status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}}, loadBalancerSourceRanges=["203.0.113.0/25"])

    def iptables_rules(*slices):
        return rules_view(desired_rules.model_for("kube-proxy", "iptables")(svc, slices, NODE, "kube-proxy"))

    assert iptables_rules(endpoint_slice("svc1", endpoint("10.180.0.3"))).firewalled == {tcp("5.6.7.8", 80)}
    empty = iptables_rules(endpoint_slice("svc1"))
    assert empty.firewalled == frozenset() and empty.rejected[tcp("5.6.7.8", 80)] == REJECT
    assert rules(svc, endpoint_slice("svc1")).firewalled == {tcp("5.6.7.8", 80)}  # nftables mode: still


# --- both families ------------------------------------------------------------------------


def dual_stack(**spec):
    return service(type="NodePort", cluster_ip=["fd00::41", "10.20.30.41"], ports=(("p80", "TCP", 80, 3001),),
                   externalIPs=["192.168.99.22", "2001:db8::22"], **spec)


def test_dual_stack_frontends_per_family_and_one_node_port():
    v4 = endpoint_slice("svc1", endpoint("10.180.0.1"), name="v4")
    v6 = endpoint_slice("svc1", endpoint("fd00:10::1"), name="v6", address_type="IPv6")
    assert eps_of(rules(dual_stack(), v4, v6)) == {
        "TCP [fd00::41]:80": ["[fd00:10::1]:80"], "TCP [2001:db8::22]:80": ["[fd00:10::1]:80"],
        "TCP 10.20.30.41:80": ["10.180.0.1:80"], "TCP 192.168.99.22:80": ["10.180.0.1:80"],
        # One NodePort frontend over both tables, as the reader merges it.
        "TCP None:3001": ["10.180.0.1:80", "[fd00:10::1]:80"]}


def test_dual_stack_node_port_with_one_family_empty():
    # The IPv4 table maps the NodePort; the IPv6 one rejects it: the reader keeps the
    # mapped frontend and the IPv6 verdict, and so does the model.
    out = rules(dual_stack(), endpoint_slice("svc1", endpoint("10.180.0.1"), name="v4"))
    assert eps_of(out)["TCP None:3001"] == ["10.180.0.1:80"]
    assert out.rejected == {tcp("fd00::41", 80): REJECT, tcp("2001:db8::22", 80): REJECT, tcp(None, 3001): REJECT}
    only_v6 = rules(dual_stack(), endpoint_slice("svc1", endpoint("fd00:10::1"), name="v6", address_type="IPv6"))
    assert eps_of(only_v6)["TCP None:3001"] == ["[fd00:10::1]:80"] and only_v6.rejected[tcp(None, 3001)] == REJECT


# --- the store: one table per mode, picked by (proxy, mode) ---------------------------------


def test_model_for_proxy_and_mode():
    assert desired_rules.model_for("kube-proxy", "ipvs") is desired.virtual_servers_for_service
    assert desired_rules.model_for("kube-proxy", "nftables") is desired_rules.kube_proxy_rules_model
    assert desired_rules.model_for("kube-proxy", "iptables") is desired_rules.kube_proxy_iptables_model
    assert desired_rules.model_for("kube-router", "ipvs") is desired.virtual_servers_for_service
    with pytest.raises(ValueError, match="kube-router programs IPVS only"):
        desired_rules.model_for("kube-router", "nftables")
    with pytest.raises(ValueError, match="unknown proxy mode 'auto'"):
        desired_rules.model_for("kube-proxy", "auto")


def test_store_keeps_the_rules_model_incrementally():
    svcs = {"ns1/svc1": service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), status=LB,
                                externalTrafficPolicy="Local"),
            "ns1/svc2": service("svc2", cluster_ip="10.20.30.42")}
    slices = {"ns1/svc1-ipv4": endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"))}
    st = ClusterState("node-a", "kube-proxy", model=desired_rules.model_for("kube-proxy", "nftables"))
    st.replace("services", svcs)
    st.replace("endpointslices", slices)
    st.replace("nodes", {"node-a": Node("node-a", "zone-a")})
    node = st.node()

    def expected():
        by_service = desired.slices_by_service(slices.values())
        return desired_rules.desired_rules(svcs.values(), by_service, node)

    assert rules_view(st.snapshot().table.values()) == expected()
    assert st.snapshot().table[tcp("10.20.30.42", 80)].flags == (REJECT, UNMAPPED)
    # The local endpoint goes: external frontends drop; svc2 gets one and is mapped.
    slices["ns1/svc1-ipv4"] = endpoint_slice("svc1", endpoint("10.180.0.9", "other-node"))
    st.upsert("endpointslices", "ns1/svc1-ipv4", slices["ns1/svc1-ipv4"])
    slices["ns1/svc2-ipv4"] = endpoint_slice("svc2", endpoint("10.180.0.7"))
    st.upsert("endpointslices", "ns1/svc2-ipv4", slices["ns1/svc2-ipv4"])
    view = rules_view(st.snapshot().table.values())
    assert view == expected()
    assert view.rejected == {tcp("1.2.3.4", 80): DROP, tcp(None, 3001): DROP}


# --- against real rules in a network namespace ----------------------------------------------


@pytest.fixture
def ns():
    with NftNS() as namespace:
        yield namespace


def overall_objects():
    """TestOverallNFTablesRules' Services and EndpointSlices (pkg/proxy/nftables/proxier_test.go)."""
    def svc(ns_, name, ip, **kw):
        return service(name, ns_, cluster_ip=ip, **kw)

    def es(ns_, name, *endpoints):
        return endpoint_slice(name, *endpoints, namespace=ns_, name=f"{name}-1")

    services = [
        svc("ns1", "svc1", "172.30.0.41"),
        svc("ns2", "svc2", "172.30.0.42", type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),),
            externalTrafficPolicy="Local", externalIPs=["192.168.99.22"], healthCheckNodePort=30000, status=LB),
        svc("ns3", "svc3", "172.30.0.43", type="NodePort", ports=(("p80", "TCP", 80, 3003),)),
        svc("ns4", "svc4", "172.30.0.44", type="NodePort", externalIPs=["192.168.99.33"]),
        svc("ns5", "svc5", "172.30.0.45", type="LoadBalancer", ports=(("p80", "TCP", 80, 3002),),
            externalTrafficPolicy="Cluster", healthCheckNodePort=30000,
            status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}},
            loadBalancerSourceRanges=[" 203.0.113.0/25"], sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}}),
        svc("ns6", "svc6", "172.30.0.46"),
    ]
    slices = [
        es("ns1", "svc1", endpoint("10.180.0.1")),
        # No nodeName: not local, so svc2's Local external frontends have none.
        es("ns2", "svc2", endpoint("10.180.0.2")),
        es("ns3", "svc3", endpoint("10.180.0.3")),
        es("ns4", "svc4", endpoint("10.180.0.4"), endpoint("10.180.0.5", "test-node")),
        es("ns5", "svc5", endpoint("10.180.0.3")),
    ]
    return services, slices


def model_rules(services, slices, node) -> DesiredRules:
    return desired_rules.desired_rules(services, desired.slices_by_service(slices), node)


def test_kube_proxy_overall_rules_read_live_equal_the_model(ns):
    ns.nft((FIXTURES / "overall-v1.31.nft").read_text())
    live = ns.run(NftablesReader().read)
    assert live.unread == ()
    services, slices = overall_objects()
    want = model_rules(services, slices, desired.NodeFacts("test-node", None, ("192.168.0.2",)))
    assert want.table == live.table
    assert want.rejected == live.rejected
    assert want.firewalled == live.firewalled
    assert want.rejected == {tcp("1.2.3.4", 80): DROP, tcp("192.168.99.22", 80): DROP, tcp(None, 3001): DROP,
                             tcp("172.30.0.46", 80): REJECT}


def objects_of(ports: list[ServicePort], node: str = "node-a"):
    """The parsed Services and EndpointSlices tests/nft_rulesets.py rulesets of ``ports``
    stand for (nft_rulesets.kube_objects), local endpoints on ``node``."""
    items = nft_rulesets.kube_objects(ports, node)
    return ([parse_service(item) for item in items if item["kind"] == "Service"],
            [parse_endpoint_slice(item) for item in items if item["kind"] == "EndpointSlice"])


def generated_services() -> list[ServicePort]:
    return nft_rulesets.generated_services() + [
        # External frontends without any endpoint: only rejected (TestNoEndpointsReject).
        ServicePort("ns8", "svc8", "172.30.0.48", [], node_port=3008, lb_ips=["1.2.3.8"],
                    external_ips=["192.168.99.88"], source_ranges=["203.0.113.0/25"]),
    ]


@pytest.mark.parametrize("layout", ["newest", "v1.31"])
def test_generated_rules_read_live_equal_the_model(ns, layout):
    v4, v6 = generated_services(), nft_rulesets.generated_services_v6()
    ns.nft(ruleset(v4, "ip", layout))
    ns.nft(ruleset(v6, "ip6", layout))
    live = ns.run(NftablesReader().read)
    assert live.unread == ()
    services, slices = objects_of(v4 + v6)
    want = model_rules(services, slices, NODE)
    assert want.table == live.table
    assert want.rejected == live.rejected
    assert want.firewalled == live.firewalled
    assert tcp("1.2.3.8", 80) in want.firewalled and want.rejected[tcp("1.2.3.8", 80)] == REJECT
    assert len(want.table) == 14


def test_bench_sized_dual_stack_rules_read_live_equal_the_model(ns):
    """tests/nft_rulesets.bench_services in both families: 200 dual-stack Services (every
    tenth a NodePort, one frontend over both tables) and 150 IPv4-only ones."""
    v4, v6 = nft_rulesets.bench_services(350), nft_rulesets.bench_services(200, family="ip6")
    ns.nft(ruleset(v4, "ip"))
    ns.nft(ruleset(v6, "ip6"))
    live = ns.run(NftablesReader().read)
    assert live.unread == ()
    services, slices = objects_of(v4 + v6)
    want = model_rules(services, slices, NODE)
    assert want.table == live.table and want.rejected == live.rejected == {}
    assert len(want.table) == 350 + 200 + 35
    assert len(want.table[tcp(None, 30000)].real_servers) == 10


def test_kube_store_picks_the_model_by_proxy_and_mode(apiserver, api, tmp_path):  # noqa: F811
    from exporter.cli import settings_from_args
    from exporter.kube.store import KubeStore

    called = []

    def host():
        called.append(1)
        return ("203.0.113.1",)

    def flags_of_a_service_without_endpoints(store):
        store.state.replace("services", {"ns1/svc1": service()})
        store.state.replace("endpointslices", {})
        store.state.replace("nodes", {})
        return store.state.snapshot().table[tcp("10.20.30.41", 80)].flags

    nft = KubeStore(api, "node-a", "kube-proxy", mode="nftables", host_addresses=host)
    assert nft.mode == "nftables" and not called  # NodePorts match every node-port address
    assert flags_of_a_service_without_endpoints(nft) == (REJECT, UNMAPPED)
    ipvs = KubeStore(api, "node-a", "kube-proxy", host_addresses=host)
    assert ipvs.mode == "ipvs" and called
    assert flags_of_a_service_without_endpoints(ipvs) == ()

    path = apiserver.write_kubeconfig(str(tmp_path / "kc"))
    settings = settings_from_args(["--kubeconfig", path, "--node-name", "n1", "--node-ip", "10.0.0.9"])
    store = KubeStore.from_settings(settings, mode="iptables")
    try:
        assert store.mode == "iptables" and flags_of_a_service_without_endpoints(store) == (REJECT, UNMAPPED)
    finally:
        store.stop()
    router = settings_from_args(["--kubeconfig", path, "--proxy", "kube-router"])
    with pytest.raises(ValueError, match="kube-router programs IPVS only"):
        KubeStore.from_settings(router, mode="nftables")


def test_rules_view_is_built_again_only_when_the_store_changed():
    """A scrape with nothing changed reuses the view, copies of flagged frontends included,
    so the drift diff compares nothing again; a change of the store makes a new view."""
    from exporter.kube.diff import TableDiffer
    from exporter.kube.store import DesiredSnapshot

    key = VirtualServerKey("TCP", "10.0.0.1", 80)
    flagged = VirtualServerKey("TCP", "1.2.3.4", 80)
    reals = {("10.1.0.1", 80): RealServer("10.1.0.1", 80)}
    table = {key: VirtualServer(key, READER_SCHEDULER, None, reals, "ns/a"),
             flagged: VirtualServer(flagged, READER_SCHEDULER, None, reals, "ns/b", (FIREWALLED,))}
    views = desired_rules.RulesViews()
    first = views.of(DesiredSnapshot(table, {}, 2, 7, True))
    again = views.of(DesiredSnapshot(dict(table), {}, 2, 7, True))
    assert again is first and first.firewalled == {flagged}
    live = {k: vs._replace(flags=()) for k, vs in table.items()}
    differ = TableDiffer()
    differ.diff(first.table, live)
    assert differ.compared == 2
    differ.diff(again.table, live)
    assert differ.compared == 0, "an unchanged store's view is compared again"
    table[flagged] = table[flagged]._replace(flags=(DROP,))
    changed = views.of(DesiredSnapshot(table, {}, 2, 8, True))
    assert changed is not first and changed.rejected == {flagged: DROP} and not changed.firewalled
