"""The drift collector in nftables mode end to end: real nf_tables rules, the API stand-in, the live exporter.

Everything runs in a network namespace of the test's own (``NftNS``): the rules
are loaded there with `nft -f`, and the API stand-in and the exporter (the
production client, store, Runner, collectors and HTTP server of ``DriftRig``)
are started from a thread that joined it, so their sockets and the threads they
start live there too; each scrape is an HTTP GET from inside it. The rules are
kube-proxy's newest layout (tests/nft_rulesets.py) for the Services the API
holds, in both families; the drift cases are those of issue 13.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests import apiserver as api_objects
from tests.apiserver import FakeApiServer
from exporter.dataplane import SCRAPE_WINDOW
from tests.drift_rig import NODE, DriftRig, rfc3339, services_drifted, wait_until
from tests.drift_rig import RULES_KINDS as KINDS, rules_drift as drift, rules_no_drift as no_drift
from tests.helpers import value
from tests.nft_rulesets import NftNS, ServicePort, endpoints_changed, ruleset

NS = "nftdrift"
GRACE = 1.0


def service_port(name: str, cluster_ip: str, endpoints: list[str]) -> ServicePort:
    # As kube-proxy names the chains of port "http" (TCP 80) of that Service, endpoints on 8080.
    return ServicePort(NS, name, cluster_ip, [(a, 8080) for a in endpoints], port=80, port_name="http")


# name -> (cluster IP, ready endpoints): a, b and d IPv4, c without endpoints, v6 IPv6.
SERVICES = {
    "a": ("10.96.0.11", ["10.244.1.1", "10.244.1.2"]),
    "b": ("10.96.0.12", ["10.244.2.1", "10.244.2.2"]),
    "c": ("10.96.0.13", []),
    "d": ("10.96.0.15", ["10.244.4.1"]),
    "v6": ("fd00:96::14", ["fd00:244::1", "fd00:244::2"]),
}


def ports(family: str) -> list[ServicePort]:
    v6 = family == "ip6"
    return [service_port(name, ip, eps) for name, (ip, eps) in SERVICES.items() if (":" in ip) == v6]


def create_service(server: FakeApiServer, name: str, trigger: float | None = None) -> None:
    ip, endpoints = SERVICES[name]
    family = "IPv6" if ":" in ip else "IPv4"
    server.create("services", api_objects.service(NS, name, ip, ipFamilies=[family]))
    server.create("endpointslices", api_objects.endpoint_slice(
        NS, f"{name}-abcde", name, endpoints, address_type=family,
        trigger_time=rfc3339(trigger) if trigger else None))


class NftDrift:
    """The namespace, its rules, the API stand-in and the exporter in it."""

    def __init__(self, ns: NftNS, tmp_path) -> None:
        self.ns = ns
        subprocess.run(["nsenter", f"--net={ns.path}", "ip", "link", "set", "lo", "up"], check=True)
        self.api = ns.run(lambda: FakeApiServer().start())
        self.api.create("nodes", api_objects.node(NODE, zone="zone-a"))
        for name in SERVICES:
            create_service(self.api, name)
        kubeconfig = self.api.write_kubeconfig(str(tmp_path / f"kubeconfig-nft-{os.getpid()}"))
        self.load_rules()
        self.rig = ns.run(lambda: DriftRig(tmp_path, kubeconfig, grace=GRACE, follow=0.1, mode="nftables"))
        self.rig.wait_synced()

    def load_rules(self) -> None:
        """The rules kube-proxy writes for SERVICES, both families, from scratch."""
        existing = subprocess.run(["nsenter", f"--net={self.ns.path}", "nft", "list", "tables"],
                                  capture_output=True, text=True, check=True).stdout
        for family in ("ip", "ip6"):
            if f"table {family} kube-proxy" in existing:
                self.ns.nft(f"delete table {family} kube-proxy\n")
            self.ns.nft(ruleset(ports(family), family))
        time.sleep(SCRAPE_WINDOW + 0.05)

    def nft(self, script: str) -> None:
        self.ns.nft(script)
        time.sleep(SCRAPE_WINDOW + 0.05)  # past the shared read's reuse window

    def scrape(self) -> dict:
        return self.ns.run(self.rig.scrape)

    def close(self) -> None:
        self.rig.close()
        self.api.stop()


@pytest.fixture
def nft_drift(tmp_path):
    with NftNS() as ns:
        world = NftDrift(ns, tmp_path)
        try:
            yield world
        finally:
            world.close()


def test_rules_as_kube_proxy_writes_them_are_no_drift(nft_drift):
    s = wait_until(lambda: (lambda s: s if no_drift(s) else None)(nft_drift.scrape()), what="no drift")
    assert value(s, "kubenode_dataplane_info", proxy="kube-proxy", mode="nftables") == 1
    # a, b, d, v6 have frontends in the service maps; c only a reject verdict.
    assert value(s, "kubenode_dataplane_desired_virtual_servers") == 4
    assert value(s, "kubenode_dataplane_desired_real_servers") == 7
    assert value(s, "kubenode_dataplane_read_seconds") is not None
    # The IPVS collector is off on an nftables node: no series at all; the nftables one is on.
    assert value(s, "kubenode_collector_success", collector="ipvs") is None
    assert value(s, "kubenode_collector_success", collector="nftables") == 1
    assert value(s, "kubenode_nftables_tables") == 2
    assert value(s, "kubenode_nftables_map_elements", family="ip", map="service-ips") == 3
    assert value(s, "kubenode_nftables_map_elements", family="ip", map="no-endpoint-services") == 1
    assert value(s, "kubenode_nftables_map_elements", family="ip6", map="service-ips") == 1
    assert value(s, "kubenode_nftables_generation") > 0
    assert not any(name.startswith("kubenode_ipvs_") for name, _ in s)


def test_drift_cases_appear_after_the_grace_period_and_clear_when_fixed(nft_drift):
    wait_until(lambda: no_drift(nft_drift.scrape()), what="no drift at first")
    ns = nft_drift
    a, b, _, d = ports("ip")
    (v6,) = ports("ip6")
    ns.nft(
        # An element removed from a service map: a's ClusterIP is missing.
        "delete element ip kube-proxy service-ips { 10.96.0.11 . tcp . 80 }\n"
        # d left in the no-endpoint map (and out of service-ips) while it has a ready endpoint.
        "delete element ip kube-proxy service-ips { 10.96.0.15 . tcp . 80 }\n"
        'add element ip kube-proxy no-endpoint-services { 10.96.0.15 . tcp . 80 comment "nftdrift/d:http" '
        ": goto reject-chain }\n")
    # An endpoint removed from a service chain (b), a gone endpoint still referenced (v6).
    ns.nft(endpoints_changed(b, [("10.244.2.1", 8080)]))
    ns.nft(endpoints_changed(v6, [("fd00:244::1", 8080), ("fd00:244::2", 8080), ("fd00:244::9", 8080)], "ip6"))
    s = nft_drift.scrape()
    assert drift(s) == dict.fromkeys(KINDS, 0.0), "within the grace period nothing counts"
    assert sum(value(s, "kubenode_dataplane_drift_pending", kind=k) for k in KINDS) == 4

    want = {**dict.fromkeys(KINDS, 0.0), "missing_virtual_server": 1.0, "missing_real_server": 1.0,
            "stale_real_server": 1.0, "rejected_virtual_server": 1.0}
    s = wait_until(lambda: (lambda s: s if drift(s) == want else None)(nft_drift.scrape()),
                   timeout=GRACE + 10, what=f"drift {want}")
    assert services_drifted(s) == {("a", "missing_virtual_server"): 1, ("b", "missing_real_server"): 1,
                                   ("v6", "stale_real_server"): 1, ("d", "rejected_virtual_server"): 1}
    assert GRACE <= value(s, "kubenode_dataplane_drift_oldest_seconds", kind="rejected_virtual_server") < GRACE + 10

    nft_drift.load_rules()
    wait_until(lambda: no_drift(nft_drift.scrape()), what="drift cleared once the rules are right again")


def test_the_kube_proxy_table_deleted_is_every_frontend_missing(nft_drift):
    """firewalld's reload deleting the table: drift, not an unreadable table nor another mode."""
    wait_until(lambda: no_drift(nft_drift.scrape()), what="no drift at first")
    nft_drift.nft("delete table ip kube-proxy\n")
    # a, b, d mapped and c's reject verdict: all gone; the IPv6 table still right.
    want = {**dict.fromkeys(KINDS, 0.0), "missing_virtual_server": 4.0}
    s = wait_until(lambda: (lambda s: s if drift(s) == want else None)(nft_drift.scrape()),
                   timeout=GRACE + 10, what=f"drift {want}")
    assert value(s, "kubenode_collector_success", collector="drift") == 1
    assert value(s, "kubenode_nftables_tables") == 1
    nft_drift.nft("delete table ip6 kube-proxy\n")
    want = {**dict.fromkeys(KINDS, 0.0), "missing_virtual_server": 5.0}
    s = wait_until(lambda: (lambda s: s if drift(s) == want else None)(nft_drift.scrape()),
                   timeout=GRACE + 10, what="both tables gone: every frontend missing")
    assert value(s, "kubenode_nftables_tables") == 0
    nft_drift.load_rules()
    wait_until(lambda: no_drift(nft_drift.scrape()), what="drift cleared once kube-proxy wrote its tables again")


def test_programming_latency_observed_when_the_rules_catch_up(nft_drift):
    wait_until(lambda: no_drift(nft_drift.scrape()), what="no drift at first")
    s = nft_drift.scrape()
    assert value(s, "kubenode_dataplane_programming_latency_seconds_count") == 0
    trigger = time.time()
    SERVICES["a"] = ("10.96.0.11", ["10.244.1.1", "10.244.1.3"])
    try:
        create_service(nft_drift.api, "a", trigger)
        wait_until(lambda: value(nft_drift.scrape(), "kubenode_dataplane_programming_latency_pending") == 1,
                   what="the change followed")
        time.sleep(0.5)  # the proxy's delay
        assert value(nft_drift.scrape(), "kubenode_dataplane_programming_latency_seconds_count") == 0
        (a, *_) = ports("ip")
        nft_drift.nft(endpoints_changed(a, a.endpoints))
        s = wait_until(lambda: (lambda s: s if value(s, "kubenode_dataplane_programming_latency_seconds_count")
                                == 1 else None)(nft_drift.scrape()), what="latency observed")
        observed = value(s, "kubenode_dataplane_programming_latency_seconds_sum")
        assert 0.5 <= observed < time.time() - trigger + 0.1
        assert value(s, "kubenode_dataplane_programming_latency_pending") == 0
        assert no_drift(s)
    finally:
        SERVICES["a"] = ("10.96.0.11", ["10.244.1.1", "10.244.1.2"])
