"""The kube-proxy (IPVS mode) model, case by case.

Cases follow kubernetes/kubernetes pkg/proxy/ipvs/proxier_test.go (names in
the test names where one exists: TestOnlyLocalNodePorts, TestOnlyLocalLoadBalancing,
TestLoadBalancerSourceRanges, ...) and pkg/proxy/topology_test.go, with the
tables those tests expect written out here by hand.
"""

from __future__ import annotations

import pytest

from exporter.dataplane import VirtualServerKey
from exporter.kube import desired
from exporter.kube.objects import Node
from tests.kube_builders import NODE, endpoint, endpoint_slice, service, table_of


def model(svc, *slices, node=NODE, **kw):
    return desired.virtual_servers_for_service(svc, slices, node, "kube-proxy", **kw)


def test_cluster_ip_gets_every_ready_endpoint_with_weight_1_and_rr():
    svc = service()
    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.0.2", "other-node"))
    out = model(svc, es)
    assert table_of(out) == {"TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.0.2:80"]}
    (vs,) = out
    assert vs.scheduler == "rr" and vs.persistent_timeout is None and vs.service == "ns1/svc1"
    assert {rs.weight for rs in vs.real_servers.values()} == {1}
    assert {rs.forward for rs in vs.real_servers.values()} == {"Masq"}


def test_scheduler_comes_from_the_proxy_flag():
    (vs,) = model(service(), endpoint_slice("svc1", endpoint("10.180.0.1")), scheduler="lc")
    assert vs.scheduler == "lc"


def test_virtual_server_without_endpoints_still_exists():
    # syncService creates the virtual server before syncEndpoint looks at endpoints.
    assert table_of(model(service())) == {"TCP 10.20.30.41:80": []}


def test_only_local_node_ports():
    # TestOnlyLocalNodePorts: the NodePort VS gets only this node's endpoint; the ClusterIP VS both.
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.1.1", "other-node"))
    assert table_of(model(svc, es)) == {
        "TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.1.1:80"],
        "TCP 100.101.102.103:3001": ["10.180.0.1:80"],
    }


def test_only_local_load_balancing():
    # TestOnlyLocalLoadBalancing: LB VIP and NodePort local only.
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local",
                  status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})
    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.1.1", "other-node"))
    assert table_of(model(svc, es)) == {
        "TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.1.1:80"],
        "TCP 1.2.3.4:80": ["10.180.0.1:80"],
        "TCP 100.101.102.103:3001": ["10.180.0.1:80"],
    }


def test_load_balancer_cluster_policy_uses_every_endpoint():
    # TestLoadBalancerSourceRanges: an endpoint without nodeName is a real server of the VIP.
    svc = service(type="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})
    assert table_of(model(svc, endpoint_slice("svc1", endpoint("10.180.0.1")))) == {
        "TCP 10.20.30.41:80": ["10.180.0.1:80"], "TCP 1.2.3.4:80": ["10.180.0.1:80"]}


def test_load_balancer_ingress_ipmode_proxy_and_hostname_program_nothing():
    svc = service(type="LoadBalancer", status={"loadBalancer": {"ingress": [
        {"ip": "1.2.3.4", "ipMode": "VIP"}, {"ip": "1.2.3.5", "ipMode": "Proxy"}, {"hostname": "lb.example"}]}})
    assert set(table_of(model(svc))) == {"TCP 10.20.30.41:80", "TCP 1.2.3.4:80"}


def test_external_ips_follow_the_external_policy():
    svc = service(externalIPs=["5.6.7.8"], externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.1.1", "other-node"))
    assert table_of(model(svc, es)) == {
        "TCP 10.20.30.41:80": ["10.180.0.1:80", "10.180.1.1:80"],
        "TCP 5.6.7.8:80": ["10.180.0.1:80"],
    }


def test_local_policy_without_local_endpoints_falls_back_to_cluster_endpoints():
    # syncEndpoint: "Allow access from local PODs even if no local endpoints exist" (PR 97081).
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.1.1", "other-node"))
    assert table_of(model(svc, es))["TCP 100.101.102.103:3001"] == ["10.180.1.1:80"]


def test_internal_traffic_policy_local():
    svc = service(internalTrafficPolicy="Local")
    local_and_remote = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.1.1", "node-b"))
    assert table_of(model(svc, local_and_remote)) == {"TCP 10.20.30.41:80": ["10.180.0.1:80"]}
    # No local endpoint: a ClusterIP-only service never computes Cluster endpoints, so none.
    remote_only = endpoint_slice("svc1", endpoint("10.180.1.1", "node-b"))
    assert table_of(model(svc, remote_only)) == {"TCP 10.20.30.41:80": []}


def test_internal_local_on_an_externally_accessible_service_falls_back_to_cluster():
    # UsesClusterEndpoints is true once the port is externally accessible, so the fallback has something.
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), internalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.1.1", "node-b"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.180.1.1:80"],
                                        "TCP 100.101.102.103:3001": ["10.180.1.1:80"]}


def test_external_policy_local_is_ignored_on_a_cluster_ip_service():
    # apiservice.ExternalPolicyLocal is false for a service with no external access.
    svc = service(externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.180.1.1", "node-b"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.180.1.1:80"]}


@pytest.mark.parametrize("conditions, expected", [
    # ready wins; not-ready and serving-terminating are not used while a ready one exists
    ([("10.0.0.1", True, True, False), ("10.0.0.2", False, False, False), ("10.0.0.3", False, True, True)],
     ["10.0.0.1:80"]),
    # no ready endpoint: serving+terminating ones are used
    ([("10.0.0.2", False, False, False), ("10.0.0.3", False, True, True), ("10.0.0.4", False, True, True)],
     ["10.0.0.3:80", "10.0.0.4:80"]),
    # terminating but not serving: never
    ([("10.0.0.5", False, False, True)], []),
])
def test_ready_then_serving_terminating(conditions, expected):
    es = endpoint_slice("svc1", *(endpoint(ip, "node-b", ready=r, serving=s, terminating=t)
                                  for ip, r, s, t in conditions))
    assert table_of(model(service(), es))["TCP 10.20.30.41:80"] == expected


def test_local_terminating_fallback_is_independent_of_cluster():
    # Local: the local endpoint is only serving+terminating, a remote one is ready.
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a", ready=False, serving=True, terminating=True),
                        endpoint("10.0.0.2", "node-b"))
    out = table_of(model(svc, es))
    assert out["TCP 100.101.102.103:3001"] == ["10.0.0.1:80"]
    assert out["TCP 10.20.30.41:80"] == ["10.0.0.2:80"]


def test_zone_hints_used_when_every_ready_endpoint_has_them():
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a", zones=["zone-a"]),
                        endpoint("10.0.0.2", "node-b", zones=["zone-b"]),
                        endpoint("10.0.0.3", "node-c", ready=False, zones=None))
    assert table_of(model(service(), es))["TCP 10.20.30.41:80"] == ["10.0.0.1:80"]


@pytest.mark.parametrize("case", ["one ready endpoint without hints", "node has no zone", "no hint for this zone"])
def test_zone_hints_ignored(case):
    hints_b = None if case == "one ready endpoint without hints" else ["zone-b"]
    hints_a = ["zone-c"] if case == "no hint for this zone" else ["zone-a"]
    node = NODE._replace(zone=None) if case == "node has no zone" else NODE
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a", zones=hints_a),
                        endpoint("10.0.0.2", "node-b", zones=hints_b))
    assert table_of(model(service(), es, node=node))["TCP 10.20.30.41:80"] == ["10.0.0.1:80", "10.0.0.2:80"]


def test_node_hints_prefer_same_node_before_zone():
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a", zones=["zone-a"], nodes=["node-a"]),
                        endpoint("10.0.0.2", "node-x", zones=["zone-a"], nodes=["node-x"]))
    assert table_of(model(service(), es))["TCP 10.20.30.41:80"] == ["10.0.0.1:80"]


def test_topology_does_not_apply_to_local_policy():
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a", zones=["zone-b"]),
                        endpoint("10.0.0.2", "node-b", zones=["zone-a"]))
    out = table_of(model(svc, es))
    assert out["TCP 100.101.102.103:3001"] == ["10.0.0.1:80"]
    assert out["TCP 10.20.30.41:80"] == ["10.0.0.2:80"]  # cluster set honours the zone hint


def test_session_affinity_sets_persistence_on_every_virtual_server():
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), externalIPs=["5.6.7.8"],
                  sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
                  status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})
    out = model(svc)
    assert len(out) == 4
    assert {vs.persistent_timeout for vs in out} == {300}


def test_session_affinity_default_timeout():
    (vs,) = model(service(sessionAffinity="ClientIP"))
    assert vs.persistent_timeout == 10800


@pytest.mark.parametrize("svc", [
    service(cluster_ip="None"),
    service(type="ExternalName", cluster_ip=[], externalName="db.example.com"),
    service(labels={"service.kubernetes.io/service-proxy-name": "other"}),
    service(labels={"service.kubernetes.io/service-proxy-name": "kube-router"}),
    service(labels={"service.kubernetes.io/headless": ""}),
], ids=["headless", "external-name", "other-proxy", "kube-router-label", "headless-label"])
def test_services_kube_proxy_skips(svc):
    assert model(svc, endpoint_slice("svc1", endpoint("10.0.0.1"))) == []


def test_ports_matched_by_name_and_protocol_with_the_slice_target_port():
    svc = service(ports=(("dns", "UDP", 53, None), ("dns-tcp", "TCP", 53, None), ("", "TCP", 9153, None)))
    es = endpoint_slice("svc1", endpoint("10.0.0.1"),
                        ports=(("dns", "UDP", 5353), ("dns-tcp", "UDP", 5353), ("", "TCP", 9154)))
    assert table_of(model(svc, es)) == {
        "UDP 10.20.30.41:53": ["10.0.0.1:5353"],
        "TCP 10.20.30.41:53": [],  # the slice's dns-tcp is UDP: no match
        "TCP 10.20.30.41:9153": ["10.0.0.1:9154"],
    }


def test_sctp():
    svc = service(ports=(("s", "SCTP", 9999, None),))
    es = endpoint_slice("svc1", endpoint("10.0.0.1"), ports=(("s", "SCTP", 9999),))
    assert table_of(model(svc, es)) == {"SCTP 10.20.30.41:9999": ["10.0.0.1:9999"]}


def test_first_address_only_and_duplicates_across_slices():
    svc = service()
    a = endpoint_slice("svc1", endpoint(["10.0.0.1", "10.0.0.9"], "node-b"), name="a")
    b = endpoint_slice("svc1", endpoint("10.0.0.1", "node-b"), endpoint("10.0.0.2"), name="b")
    assert table_of(model(svc, a, b))["TCP 10.20.30.41:80"] == ["10.0.0.1:80", "10.0.0.2:80"]


def test_dual_stack_one_virtual_server_per_family_with_matching_endpoints():
    node = NODE._replace(addresses=("100.101.102.103", "2001:db8::1", "fe80::1", "127.0.0.1"))
    svc = service(cluster_ip=["10.20.30.41", "fd00::41"], type="NodePort", ports=(("p80", "TCP", 80, 3001),),
                  externalIPs=["5.6.7.8", "2001:db8::5678"])
    v4 = endpoint_slice("svc1", endpoint("10.0.0.1"), address_type="IPv4")
    v6 = endpoint_slice("svc1", endpoint("fd00:0:0:0:0:0:0:1"), address_type="IPv6")
    assert table_of(model(svc, v4, v6, node=node)) == {
        "TCP 10.20.30.41:80": ["10.0.0.1:80"],
        "TCP 5.6.7.8:80": ["10.0.0.1:80"],
        "TCP 100.101.102.103:3001": ["10.0.0.1:80"],
        "TCP [fd00::41]:80": ["[fd00::1]:80"],
        "TCP [2001:db8::5678]:80": ["[fd00::1]:80"],
        "TCP [2001:db8::1]:3001": ["[fd00::1]:80"],  # no link-local, no loopback
    }


def test_single_stack_service_ignores_addresses_of_the_other_family():
    node = NODE._replace(addresses=("100.101.102.103", "2001:db8::1"))
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), externalIPs=["2001:db8::5678"])
    assert set(table_of(model(svc, node=node))) == {"TCP 10.20.30.41:80", "TCP 100.101.102.103:3001"}


def test_node_port_on_each_node_address():
    node = NODE._replace(addresses=("192.168.1.10", "203.0.113.50"))
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 30080), ("p81", "UDP", 81, 30081)))
    assert set(table_of(model(svc, node=node))) == {
        "TCP 10.20.30.41:80", "UDP 10.20.30.41:81",
        "TCP 192.168.1.10:30080", "TCP 203.0.113.50:30080", "UDP 192.168.1.10:30081", "UDP 203.0.113.50:30081"}


def test_node_facts_sources():
    node = Node("node-a", "zone-a", ("192.168.1.10", "203.0.113.50"))
    assert desired.node_facts("node-a", node).addresses == ("192.168.1.10", "203.0.113.50")
    assert desired.node_facts("node-a", node, proxy="kube-router").addresses == ("192.168.1.10",)
    given = desired.node_facts("node-a", node, ["10.1.1.1", "2001:0db8::0001"])
    assert given == desired.NodeFacts("node-a", "zone-a", ("10.1.1.1", "2001:db8::1"))
    assert desired.node_facts("nowhere", None) == desired.NodeFacts("nowhere", None, ())


def test_desired_table_keys_and_first_claim_wins():
    a = service("a", cluster_ip="10.0.0.1", externalIPs=["5.6.7.8"])
    b = service("b", cluster_ip="10.0.0.2", externalIPs=["5.6.7.8"])
    slices = desired.slices_by_service([endpoint_slice("a", endpoint("10.1.0.1")),
                                        endpoint_slice("b", endpoint("10.2.0.1"))])
    table = desired.desired_table([b, a], slices, NODE)
    shared = table[VirtualServerKey("TCP", "5.6.7.8", 80)]
    assert shared.service == "ns1/a" and list(shared.real_servers) == [("10.1.0.1", 80)]
    assert len(table) == 3


def test_fixture_file_as_kube_proxy_sees_it():
    import yaml

    from exporter.kube.objects import parse_objects

    with open("tests/fixtures/cluster.yaml") as fh:
        objs = parse_objects(yaml.safe_load_all(fh))
    assert len(objs.errors) == 3
    node = desired.node_facts("node-a", objs.nodes["node-a"])
    table = desired.desired_table(objs.services.values(), desired.slices_by_service(objs.slices.values()), node)
    got = {str(k): sorted(f"{a}:{p}" for a, p in vs.real_servers) for k, vs in table.items()}
    assert got["TCP 10.96.1.1:80"] == ["10.244.1.10:8080"]  # ready only; terminating ignored
    assert got["TCP 203.0.113.10:443"] == ["10.244.1.20:8443"]  # Local LB VIP
    assert "TCP 203.0.113.11:443" not in got  # ipMode Proxy
    assert got["TCP 10.96.5.5:8080"] == []  # no slice at all
    assert got["TCP 10.96.6.6:80"] == []  # internal Local, no local endpoint
    assert got["TCP 10.96.7.7:80"] == ["10.244.1.70:80"]  # zone hints
    assert got["TCP [fd00:10:96::4]:80"] == ["fd00:10:244:1::28:8080"]
    assert table[VirtualServerKey("TCP", "198.51.100.7", 5432)].persistent_timeout == 600
    assert not any("10.96.10.10" in k or "10.96.999" in k for k in got)
    assert len(table) == 20


def test_real_servers_compare_equal_to_the_live_readers():
    # The model once built six-field tuples after RealServer lost its counters: they
    # neither printed nor compared equal to a live RealServer of the same endpoint.
    from exporter.dataplane import RealServer

    (vs,) = model(service(), endpoint_slice("svc1", endpoint("10.180.0.1")))
    assert vs.real_servers == {("10.180.0.1", 80): RealServer("10.180.0.1", 80)}
    assert repr(vs.real_servers[("10.180.0.1", 80)]) == "RealServer(address='10.180.0.1', port=80, weight=1, forward='Masq')"
