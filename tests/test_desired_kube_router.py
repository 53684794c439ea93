"""The kube-router model, case by case, from pkg/controllers/proxy (service_endpoints_sync.go,
network_services_controller.go) of cloudnativelabs/kube-router."""

from __future__ import annotations

import pytest

from exporter.dataplane import VirtualServerKey
from exporter.kube import desired
from tests.kube_builders import NODE, endpoint, endpoint_slice, service, table_of
from tests.kube_helpers import apiserver  # noqa: F401  (fixture)


def model(svc, *slices, node=NODE, fwmarks=None, flags=desired.KUBE_ROUTER_DEFAULT_FLAGS):
    return desired.virtual_servers_for_service(svc, slices, node, "kube-router", fwmarks=fwmarks,
                                               kube_router_flags=flags)


# --strict-external-ip-validation=false: every externalIP and LoadBalancer IP admitted (kube-router < 2.8).
ADMIT_ALL = desired.KubeRouterFlags(strict_external_ip_validation=False)


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
    assert table_of(model(svc, remote, flags=ADMIT_ALL)) == {"TCP 10.20.30.41:80": ["10.0.0.2:80"]}
    both = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, both, flags=ADMIT_ALL)) == {
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


def test_local_annotation_makes_external_traffic_local_and_keeps_the_cluster_ip_on_every_endpoint():
    # buildServicesInfo: service.local "true" sets the internal policy to Cluster (even over a spec
    # internalTrafficPolicy Local) and the external policy to Local.
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), internalTrafficPolicy="Local",
                  annotations={"kube-router.io/service.local": "true"})
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.0.0.1:80", "10.0.0.2:80"],
                                        "TCP 100.101.102.103:3001": ["10.0.0.1:80"]}
    # No endpoint on this node: the NodePort goes (external Local), the cluster IP stays with every endpoint.
    remote = endpoint_slice("svc1", endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, remote)) == {"TCP 10.20.30.41:80": ["10.0.0.2:80"]}


@pytest.mark.parametrize("value", ["false", "True", "yes", ""])
def test_local_annotation_other_than_true_changes_nothing(value):
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),),
                  annotations={"kube-router.io/service.local": value})
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"), endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.0.0.1:80", "10.0.0.2:80"],
                                        "TCP 100.101.102.103:3001": ["10.0.0.1:80", "10.0.0.2:80"]}


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
    assert set(table_of(model(svc, flags=ADMIT_ALL))) == {"TCP 10.20.30.41:80", "TCP 1.2.3.4:80", "TCP 1.2.3.5:80"}
    skipped = service(type="LoadBalancer", status=status, externalIPs=["5.6.7.8"],
                      annotations={"kube-router.io/service.skiplbips": ""})
    assert set(table_of(model(skipped, flags=ADMIT_ALL))) == {"TCP 10.20.30.41:80", "TCP 5.6.7.8:80"}


def test_dsr_makes_fwmark_services_with_tunnel_real_servers():
    svc = service(externalIPs=["5.6.7.8"], annotations={"kube-router.io/service.dsr": "tunnel"})
    out = model(svc, endpoint_slice("svc1", endpoint("10.0.0.1", "node-a")), flags=ADMIT_ALL)
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
    slices = desired.slices_by_service(objs.slices.values())

    def table_with(flags):
        table = desired.desired_table(objs.services.values(), slices, node, "kube-router", kube_router_flags=flags)
        return table, {str(k): sorted(f"{a}:{p}" for a, p in vs.real_servers) for k, vs in table.items()}

    table, got = table_with(desired.KUBE_ROUTER_DEFAULT_FLAGS)
    assert got["TCP 10.96.1.1:80"] == ["10.244.1.10:8080", "10.244.2.12:8080"]
    assert "TCP 203.0.113.50:30080" not in got
    assert "TCP 10.96.6.6:80" not in got  # internal Local without local endpoints
    assert "SCTP 10.96.8.8:9999" not in got
    assert table[VirtualServerKey("TCP", "10.96.9.9", 80)].scheduler == "lc"
    # default flags: no externalIP, no LoadBalancer IP, so no DSR fwmark service either
    external = {"203.0.113.10", "203.0.113.11", "198.51.100.7"}
    assert not {k.address for k in table} & external and all(k.fwmark is None for k in table)

    table, got = table_with(ADMIT_ALL)
    assert "TCP 203.0.113.11:443" in got  # ipMode Proxy is still programmed
    assert any(k.fwmark is not None for k in table)

# --- external IPs and LoadBalancer ingress under --strict-external-ip-validation (kube-router >= 2.8) ---


def flags(**kw):
    return desired.KubeRouterFlags.parse(**kw)


def test_default_flags_program_no_external_or_load_balancer_ip():
    # Default flags: strict validation on, no --service-external-ip-range, no --loadbalancer-ip-range:
    # svcip FilterExternalIPs / FilterLoadBalancerIPs reject every address (default-deny).
    svc = service(type="LoadBalancer", ports=(("p80", "TCP", 80, 3001),), externalIPs=["1.1.1.1", "2.2.2.2"],
                  status={"loadBalancer": {"ingress": [{"ip": "10.255.0.1"}, {"ip": "10.255.0.2"}]}})
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.0.0.1:80"],
                                        "TCP 100.101.102.103:3001": ["10.0.0.1:80"]}


# TestBuildServicesInfoWithStrictValidation (network_services_controller_test.go), case by case.
@pytest.mark.parametrize("kw, external_ips, ingress, expected", [
    (dict(service_external_ip_ranges=["10.243.0.0/24"], loadbalancer_ip_ranges=["10.255.0.0/24"]),
     ["10.243.0.1", "192.168.100.50"], [], {"10.243.0.1"}),
    (dict(service_external_ip_ranges=["10.243.0.0/24"], loadbalancer_ip_ranges=["10.255.0.0/24"]),
     [], ["10.255.0.1", "8.8.8.8"], {"10.255.0.1"}),
    (dict(service_external_ip_ranges=["10.0.0.0/8"], service_cluster_ip_ranges=["10.96.0.0/12"]),
     ["10.96.0.10", "10.243.0.1"], [], {"10.243.0.1"}),
    (dict(strict_external_ip_validation=False), ["1.1.1.1", "2.2.2.2"], ["10.255.0.1"],
     {"1.1.1.1", "2.2.2.2", "10.255.0.1"}),
    # svcip validator_test.go: an IPv6 range admits only its own addresses; the cluster range
    # default (10.96.0.0/12) still rejects a conflicting address once a range is given.
    (dict(service_external_ip_ranges=["fd00::/64"]), ["fd00::1", "fe80::1"], [], {"fd00::1"}),
    (dict(loadbalancer_ip_ranges=["10.0.0.0/8"]), [], ["10.96.0.10", "10.255.0.1"], {"10.255.0.1"}),
], ids=["external-out-of-range", "lb-out-of-range", "external-in-cluster-range", "strict-off", "ipv6",
        "lb-in-default-cluster-range"])
def test_strict_validation_filters_external_and_load_balancer_ips(kw, external_ips, ingress, expected):
    svc = service(type="LoadBalancer", cluster_ip=["10.0.0.1", "fd00:ffff::1"], externalIPs=external_ips,
                  status={"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}})
    out = desired.virtual_servers_for_service(svc, (), NODE, "kube-router", kube_router_flags=flags(**kw))
    assert {vs.key.address for vs in out} - {"10.0.0.1", "fd00:ffff::1"} == expected


def test_external_ranges_do_not_admit_load_balancer_ips_nor_the_reverse():
    svc = service(type="LoadBalancer", externalIPs=["10.255.0.9"],
                  status={"loadBalancer": {"ingress": [{"ip": "10.243.0.9"}]}})
    f = flags(service_external_ip_ranges=["10.243.0.0/24"], loadbalancer_ip_ranges=["10.255.0.0/24"])
    assert set(table_of(desired.virtual_servers_for_service(svc, (), NODE, "kube-router",
                                                            kube_router_flags=f))) == {"TCP 10.20.30.41:80"}


def test_flag_ranges_are_checked_at_parse():
    with pytest.raises(ValueError, match="--service-external-ip-range"):
        flags(service_external_ip_ranges=["10.243.0.1/24x"])
    with pytest.raises(ValueError, match="--loadbalancer-ip-range"):
        flags(loadbalancer_ip_ranges=["not-a-cidr"])
    with pytest.raises(ValueError, match="--service-cluster-ip-range"):
        flags(service_cluster_ip_ranges=[])


# --- kube-router.io/service.dsr ---


def test_dsr_with_default_flags_programs_only_the_cluster_ip():
    # DSR applies to external and LoadBalancer IPs only (setupExternalIPServices); under default
    # flags there are none, so the annotation leaves a plain ClusterIP virtual server.
    svc = service(externalIPs=["5.6.7.8"], annotations={"kube-router.io/service.dsr": "tunnel"},
                  type="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})
    out = model(svc, endpoint_slice("svc1", endpoint("10.0.0.1", "node-a")))
    assert [vs.key for vs in out] == [VirtualServerKey("TCP", "10.20.30.41", 80)]
    assert [rs.forward for rs in out[0].real_servers.values()] == ["Masq"]


# TestDSR_* (network_services_controller_test.go), with the external IP admitted by a range.
DSR_FLAGS = dict(service_external_ip_ranges=["1.1.1.0/24"])


def dsr_service(ext_policy="Cluster"):
    return service(cluster_ip="10.100.1.1", ports=(("http", "TCP", 8080, None),), externalIPs=["1.1.1.1"],
                   externalTrafficPolicy=ext_policy, annotations={"kube-router.io/service.dsr": "tunnel"})


def dsr_model(svc, *slices):
    return desired.virtual_servers_for_service(svc, slices, NODE, "kube-router", kube_router_flags=flags(**DSR_FLAGS))


def test_dsr_service_creates_fwmark_based_ipvs_service():
    es = endpoint_slice("svc1", endpoint("172.20.1.1", "node-a"), endpoint("172.20.1.2", "node-a"),
                        ports=(("http", "TCP", 80),))
    out = dsr_model(dsr_service(), es)
    mark = desired.kube_router_fwmark("1.1.1.1", "TCP", 8080)
    assert {vs.key for vs in out} == {VirtualServerKey("TCP", "10.100.1.1", 8080), VirtualServerKey.for_fwmark(mark)}
    fw = next(vs for vs in out if vs.key.fwmark is not None)
    assert {(rs.address, rs.forward, rs.weight) for rs in fw.real_servers.values()} == {
        ("172.20.1.1", "Tunnel", 1), ("172.20.1.2", "Tunnel", 1)}


def test_dsr_external_traffic_policy_local():
    es = endpoint_slice("svc1", endpoint("172.20.1.1", "node-a"), endpoint("172.20.2.1", "node-b"),
                        ports=(("http", "TCP", 80),))
    out = {str(vs.key): vs for vs in dsr_model(dsr_service("Local"), es)}
    mark = desired.kube_router_fwmark("1.1.1.1", "TCP", 8080)
    assert sorted(a for a, _ in out[f"FWM {mark}"].real_servers) == ["172.20.1.1"]  # only local
    assert sorted(a for a, _ in out["TCP 10.100.1.1:8080"].real_servers) == ["172.20.1.1", "172.20.2.1"]
    # ..._NoLocalEndpoints: no fwmark service at all, the cluster IP keeps the remote endpoint.
    remote = endpoint_slice("svc1", endpoint("172.20.2.1", "node-b"), ports=(("http", "TCP", 80),))
    assert table_of(dsr_model(dsr_service("Local"), remote)) == {"TCP 10.100.1.1:8080": ["172.20.2.1:80"]}


def test_dsr_method_other_than_tunnel_is_a_plain_external_ip_service():
    svc = dsr_service()._replace(annotations=(("kube-router.io/service.dsr", "dr"),))
    es = endpoint_slice("svc1", endpoint("172.20.1.1", "node-a"), ports=(("http", "TCP", 80),))
    assert set(table_of(dsr_model(svc, es))) == {"TCP 10.100.1.1:8080", "TCP 1.1.1.1:8080"}


# --- endpoint conditions: buildEndpointSliceInfo reads an absent condition as false ---


@pytest.mark.parametrize("conditions, programmed", [
    (dict(ready=True), True),
    (dict(ready=False, serving=True, terminating=True), True),  # beside a ready one, not only as a fallback
    (dict(ready=None, serving=True, terminating=True), True),
    (dict(ready=False, serving=False, terminating=True), False),
    (dict(ready=None, serving=False, terminating=True), False),  # absent ready is not ready here
    (dict(ready=None, terminating=True), False),
    (dict(ready=None), False),  # no conditions at all
    (dict(ready=False), False),
], ids=["ready", "serving-terminating", "serving-terminating-ready-absent", "terminating-not-serving",
        "not-serving-ready-absent", "terminating-only", "no-conditions", "not-ready"])
def test_endpoint_conditions_as_kube_router_reads_them(conditions, programmed):
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-b"), endpoint("10.0.0.2", "node-b", **conditions))
    got = table_of(model(service(), es))["TCP 10.20.30.41:80"]
    assert got == (["10.0.0.1:80", "10.0.0.2:80"] if programmed else ["10.0.0.1:80"])


def test_absent_conditions_still_mean_ready_to_kube_proxy():
    # The shared parser keeps the API's defaults for kube-proxy (and the models that share its
    # categorisation); only the kube-router model reads the stated conditions.
    es = endpoint_slice("svc1", endpoint("10.0.0.2", "node-b", ready=None))
    assert table_of(desired.virtual_servers_for_service(service(), [es], NODE, "kube-proxy")) == {
        "TCP 10.20.30.41:80": ["10.0.0.2:80"]}


def test_serving_terminating_local_endpoint_keeps_a_local_service():
    # hasActiveEndpoints counts a local endpoint whatever its conditions once it is in the list.
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 3001),), externalTrafficPolicy="Local")
    es = endpoint_slice("svc1", endpoint("10.0.0.1", "node-a", ready=False, serving=True, terminating=True),
                        endpoint("10.0.0.2", "node-b"))
    assert table_of(model(svc, es)) == {"TCP 10.20.30.41:80": ["10.0.0.1:80", "10.0.0.2:80"],
                                        "TCP 100.101.102.103:3001": ["10.0.0.1:80"]}


# --- the exporter's kube-router.* options: for a kube-router not run with these defaults ---


def test_options_default_to_kube_routers_own_defaults():
    from exporter.cli import settings_from_args

    assert desired.kube_router_flags_from(settings_from_args([]).get) == desired.KUBE_ROUTER_DEFAULT_FLAGS


def test_options_from_flags_and_file(tmp_path):
    from exporter.cli import settings_from_args

    path = tmp_path / "config.yml"
    path.write_text("kube-router:\n  loadbalancer-ip-range: [10.255.0.0/24]\n")
    s = settings_from_args(["--config.file", str(path), "--no-kube-router.strict-external-ip-validation",
                            "--kube-router.service-external-ip-range", "198.51.100.0/24",
                            "--kube-router.service-external-ip-range", "fd00::/64"])
    assert desired.kube_router_flags_from(s.get) == desired.KubeRouterFlags.parse(
        False, ["198.51.100.0/24", "fd00::/64"], ["10.255.0.0/24"])


@pytest.mark.parametrize("argv, message", [
    (["--kube-router.service-external-ip-range", "10.0.0.0/33"], "must be CIDRs ('10.0.0.0/33' is not one)"),
    (["--kube-router.loadbalancer-ip-range", "lb"], "must be CIDRs ('lb' is not one)"),
    (["--kube-router.service-cluster-ip-range", "10.96.0.0/12", "--kube-router.service-cluster-ip-range",
      "fd00::/108", "--kube-router.service-cluster-ip-range", "10.0.0.0/16"], "one or two CIDRs"),
])
def test_bad_option_is_one_clear_line(argv, message):
    from exporter.cli import settings_from_args
    from exporter.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from_args(argv)


def test_offline_desired_takes_the_same_options():
    import json
    import subprocess
    import sys

    def desired_addresses(*extra):
        proc = subprocess.run([sys.executable, "-m", "exporter", "desired", "--objects", "tests/fixtures/cluster.yaml",
                               "--node-name", "node-a", "--proxy", "kube-router", "--output", "json", *extra],
                              capture_output=True, text=True, timeout=60)
        return proc, {v["address"] for v in json.loads(proc.stdout or '{"virtual_servers": []}')["virtual_servers"]}

    _, addresses = desired_addresses()
    assert "198.51.100.7" not in addresses
    _, addresses = desired_addresses("--kube-router.service-external-ip-range", "198.51.100.0/24")
    assert "198.51.100.7" in addresses and "203.0.113.10" not in addresses
    proc, _ = desired_addresses("--kube-router.loadbalancer-ip-range", "nonsense")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--loadbalancer-ip-range" in proc.stderr


def test_serving_store_models_the_configured_flags(apiserver, tmp_path):
    from exporter.cli import settings_from_args
    from exporter.kube.store import KubeStore
    from tests.apiserver import service as api_service

    apiserver.create("services", api_service("ns1", "web", "10.96.1.1", externalIPs=["198.51.100.7"]))
    path = apiserver.write_kubeconfig(str(tmp_path / "kc"))
    for extra, expected in (([], False), (["--kube-router.service-external-ip-range", "198.51.100.0/24"], True)):
        settings = settings_from_args(["--kubeconfig", path, "--node-name", "node-a", "--node-ip", "10.0.0.9",
                                       "--proxy", "kube-router", *extra])
        store = KubeStore.from_settings(settings)
        store.start()
        try:
            assert store.wait_synced(10)
            table = store.state.snapshot().table
            assert (VirtualServerKey("TCP", "198.51.100.7", 80) in table) is expected
            assert VirtualServerKey("TCP", "10.96.1.1", 80) in table
        finally:
            store.stop()
