"""The kube-router model, case by case, from pkg/controllers/proxy (service_endpoints_sync.go,
network_services_controller.go) of cloudnativelabs/kube-router."""

from __future__ import annotations

import pytest

from exporter.dataplane import VirtualServerKey
from exporter.kube import desired
from tests.kube_builders import NODE, endpoint, endpoint_slice, service, table_of


def model(svc, *slices, node=NODE, fwmarks=None):
    return desired.virtual_servers_for_service(svc, slices, node, "kube-router", fwmarks=fwmarks)


def test_cluster_ip_and_node_port():
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),))
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, es)) == {
        "TCP 10.20.30.41:80": ["10.0.0.1:80", "10.0.0.2:80"],
        "TCP 100.101.102.103:3001": ["10.0.0.1:80", "10.0.0.2:80"],
    }


def test_ready_or_serving_endpoints_every_address():
    # buildEndpointSliceInfo: ready OR serving (terminating ones included even beside ready ones),
    # and every address of an endpoint, not just the first.
    es = endpoint_slice("svc1", endpoint(["10.0.0.1", "10.0.0.9"]),
                        endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
                        endpoint("10.0.0.3", ready=False, serving=False))
    assert table_of(model(service(), es))["TCP 10.20.30.41:80"] == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:80"]


def test_external_local_skips_node_port_and_external_without_local_endpoints():
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local",
                  externalIPs=["5.6.7.8"], status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})
    remote = endpoint_slice("svc1", endpoint("10.0.0.2", "node-b"))
    # hasActiveEndpoints false: NodePort and external VSs are not created at all (kube-proxy would
    # fall back to cluster endpoints instead); the ClusterIP VS keeps every endpoint.
    assert table_of(model(svc, remote)) == {"TCP 10.20.30.41:80": ["10.0.0.2:80"]}
    both = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, both)) == {
        "TCP 10.20.30.41:80": ["10.0.0.1:80", "10.0.0.2:80"],
        "TCP 100.101.102.103:3001": ["10.0.0.1:80"],
        "TCP 5.6.7.8:80": ["10.0.0.1:80"],
        "TCP 1.2.3.4:80": ["10.0.0.1:80"],
    }


def test_internal_local_skips_the_cluster_ip_without_local_endpoints():
    svc = service(internalTrafficPolicy="Local")
    assert model(svc, endpoint_slice("svc1", endpoint("10.0.0.2", "node-b"))) == []
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.0.0.1:80"]}


def test_local_annotation_forces_both_policies():
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),),
                  annotations={"kube-router.io/service.local": "true"})
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.0.0.1:80"],
                                        "TCP 100.101.102.103:3001": ["10.0.0.1:80"]}


@pytest.mark.parametrize("value, expected", [("lc", "lc"), ("sh", "sh"), ("mh", "mh"), ("wlc", "rr"), (None, "rr")])
def test_scheduler_annotation(value, expected):
    ann = {"kube-router.io/service.scheduler": value} if value else {}
    (vs,) = model(service(annotations=ann))
    assert vs.scheduler == expected


def test_session_affinity():
    (vs,) = model(service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}))
    assert vs.persistent_timeout == 60


def test_load_balancer_ips_of_every_ipmode_unless_skipped():
    status = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4", "ipMode": "Proxy"}, {"ip": "1.2.3.5"}]}}
    svc = service(type="LoadBalancer", status=status)
    assert set(table_of(model(svc))) == {"TCP 10.20.30.41:80", "TCP 1.2.3.4:80", "TCP 1.2.3.5:80"}
    skipped = service(type="LoadBalancer", status=status, externalIPs=["5.6.7.8"],
                      annotations={"kube-router.io/service.skiplbips": ""})
    assert set(table_of(model(skipped))) == {"TCP 10.20.30.41:80", "TCP 5.6.7.8:80"}


def test_dsr_makes_fwmark_services_with_tunnel_real_servers():
    svc = service(externalIPs=["5.6.7.8"], annotations={"kube-router.io/service.dsr": "tunnel"})
    out = model(svc, endpoint_slice("svc1", endpoint("10.0.0.1", "node-a")))
    keys = {vs.key for vs in out}
    mark = desired.kube_router_fwmark("5.6.7.8", "TCP", 80)
    assert keys == {VirtualServerKey("TCP", "10.20.30.41", 80), VirtualServerKey.for_fwmark(mark)}
    fw = next(vs for vs in out if vs.key.fwmark is not None)
    assert [rs.forward for rs in fw.real_servers.values()] == ["Tunnel"]
    cluster = next(vs for vs in out if vs.key.fwmark is None)
    assert [rs.forward for rs in cluster.real_servers.values()] == ["Masq"]  # ClusterIP is never DSR


def test_fwmark_is_fnv1a_of_ip_proto_port_masked_and_skips_clashes():
    # FNV-1a 32 test vectors (as Go's hash/fnv New32a).
    assert desired._fnv1a32(b"") == 0x811C9DC5
    assert desired._fnv1a32(b"a") == 0xE40C292C
    assert desired._fnv1a32(b"foobar") == 0xBF9CF968
    mark = desired.kube_router_fwmark("5.6.7.8", "TCP", 80)
    assert mark == desired._fnv1a32(b"5.6.7.8-tcp-80") & 0x3FFF
    taken = {mark: "somebody-else"}
    assert desired.kube_router_fwmark("5.6.7.8", "TCP", 80, taken) == desired._fnv1a32(b"5.6.7.8-tcp-80-1") & 0x3FFF
    assert desired.kube_router_fwmark("5.6.7.8", "TCP", 80, {mark: "5.6.7.8-tcp-80"}) == mark


@pytest.mark.parametrize("labels, kept", [
    ({"service.kubernetes.io/service-proxy-name": "kube-router"}, True),
    ({"service.kubernetes.io/service-proxy-name": "other"}, False),
    ({"service.kubernetes.io/headless": ""}, False),
])
def test_service_proxy_name_and_headless_labels(labels, kept):
    assert bool(model(service(labels=labels))) is kept


def test_headless_and_external_name_skipped():
    assert model(service(cluster_ip="None")) == []
    assert model(service(type="ExternalName", cluster_ip=[], externalName="x.example")) == []


def test_sctp_not_programmed():
    svc = service(ports=(("s", "SCTP", 9999, None), ("u", "UDP", 53, None)))
    es = endpoint_slice("svc1", endpoint("10.0.0.1"), ports=(("s", "SCTP", 9999), ("u", "UDP", 53)))
    assert table_of(model(svc, es)) == {"UDP 10.20.30.41:53": ["10.0.0.1:53"]}


def test_ports_matched_by_name_only():
    svc = service(ports=(("dns", "TCP", 53, None),))
    es = endpoint_slice("svc1", endpoint("10.0.0.1"), ports=(("dns", "UDP", 5353),))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:53": ["10.0.0.1:5353"]}


def test_topology_hints_ignored():
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a", zones=["zone-a"]),
                        endpoint("10.0.0.2", "node-b", zones=["zone-b"]))
    assert table_of(model(service(), es))["TCP 10.20.30.41:80"] == ["10.0.0.1:80", "10.0.0.2:80"]


def test_dual_stack_real_servers_by_family():
    svc = service(cluster_ip=["10.20.30.41", "fd00::41"])
    v4 = endpoint_slice("svc1", endpoint("10.0.0.1"), address_type="IPv4")
    v6 = endpoint_slice("svc1", endpoint("fd00::1"), address_type="IPv6")
    assert table_of(model(svc, v4, v6)) == {"TCP 10.20.30.41:80": ["10.0.0.1:80"],
                                            "TCP [fd00::41]:80": ["[fd00::1]:80"]}


def test_fixture_file_as_kube_router_sees_it():
    import yaml

    from exporter.kube.objects import parse_objects

    with open("tests/fixtures/cluster.yaml") as fh:
        objs = parse_objects(yaml.safe_load_all(fh))
    node = desired.node_facts("node-a", objs.nodes["node-a"], proxy="kube-router")
    assert node.addresses == ("192.168.1.10",)  # primary (first InternalIP) only
    table = desired.desired_table(objs.services.values(), desired.slices_by_service(objs.slices.values()),
                                  node, "kube-router")
    got = {str(k): sorted(f"{a}:{p}" for a, p in vs.real_servers) for k, vs in table.items()}
    assert got["TCP 10.96.1.1:80"] == ["10.244.1.10:8080", "10.244.2.12:8080"]
    assert "TCP 203.0.113.50:30080" not in got
    assert "TCP 203.0.113.11:443" in got  # ipMode Proxy is still programmed
    assert "TCP 10.96.6.6:80" not in got  # internal Local without local endpoints
    assert "SCTP 10.96.8.8:9999" not in got
    assert table[VirtualServerKey("TCP", "10.96.9.9", 80)].scheduler == "lc"
    assert any(k.fwmark is not None for k in table)
