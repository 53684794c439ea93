"""The drift collector in iptables mode end to end, on both backends: real rules, the API stand-in, the live exporter.

Everything runs in a network namespace of the test's own (``IptNS``): kube-proxy's
newest iptables rules (tests/ipt_rulesets.py) are loaded there with
`iptables-restore` of the backend under test (iptables-nft into nf_tables,
iptables-legacy into x_tables), and the API stand-in and the exporter (the
production client, store, Runner, collectors and HTTP server of ``DriftRig``) are
started from a thread that joined it, so their sockets and threads live there
too; each scrape is an HTTP GET from
inside it. The exporter's procfs is a folder of the test's own whose `thread-self`
is the real one, so the legacy source's /proc/thread-self/net/ip_tables_names is
the namespace's.
"""

from __future__ import annotations

import os
import time

import pytest

from exporter.dataplane import SCRAPE_WINDOW
from tests.apiserver import FakeApiServer
from tests import apiserver as api_objects
from tests.drift_rig import NODE, DriftRig, rfc3339, services_drifted, wait_until
from tests.drift_rig import RULES_KINDS as KINDS, rules_drift as drift, rules_no_drift as no_drift
from tests.helpers import value
from tests.ipt_rulesets import IptNS, ServicePort, chain_name, kube_objects, ruleset

NS = "iptdrift"
GRACE = 1.0
BACKENDS = ("nft", "legacy")


def service_ports() -> list[ServicePort]:
    # a and b IPv4 with two endpoints, c without endpoints (a REJECT in filter), v6 IPv6.
    return [ServicePort(NS, "a", "10.96.0.11", [("10.244.1.1", 8080), ("10.244.1.2", 8080)], port_name="http"),
            ServicePort(NS, "b", "10.96.0.12", [("10.244.2.1", 8080), ("10.244.2.2", 8080)], port_name="http"),
            ServicePort(NS, "c", "10.96.0.13", [], port_name="http"),
            ServicePort(NS, "v6", "fd00:96::14", [("fd00:244::1", 8080), ("fd00:244::2", 8080)], port_name="http")]


RESOURCES = {"Service": "services", "EndpointSlice": "endpointslices"}


class IptDrift:
    """The namespace, kube-proxy's rules in one backend, the API stand-in and the exporter in it."""

    def __init__(self, ns: IptNS, backend: str, tmp_path) -> None:
        self.ns, self.backend = ns, backend
        self.ports = service_ports()
        ns.run(lambda: os.system("ip link set lo up"))
        self.api = ns.run(lambda: FakeApiServer().start())
        self.api.create("nodes", api_objects.node(NODE, zone="zone-a"))
        self.publish()
        kubeconfig = self.api.write_kubeconfig(str(tmp_path / f"kubeconfig-ipt-{os.getpid()}"))
        self.load_rules()
        procfs = tmp_path / f"proc-ipt-{os.getpid()}"
        (procfs / "net").mkdir(parents=True)
        (procfs / "thread-self").symlink_to("/proc/thread-self")
        self.rig = ns.run(lambda: DriftRig(tmp_path, kubeconfig, procfs=str(procfs), grace=GRACE, follow=0.1,
                                           mode="iptables", extra=("--no-collector.process",
                                                                   "--no-collector.memcg")))
        self.rig.wait_synced()

    def publish(self, trigger: float | None = None, only: str | None = None) -> None:
        """The Services and EndpointSlices the rules stand for (created or replaced; ``only``
        that Service's, its slices stamped with the change's ``trigger`` time)."""
        for item in kube_objects([p for p in self.ports if only in (None, p.name)], NODE):
            if trigger is not None and item["kind"] == "EndpointSlice":
                item["metadata"].setdefault("annotations", {})[
                    "endpoints.kubernetes.io/last-change-trigger-time"] = rfc3339(trigger)
            self.api.create(RESOURCES[item["kind"]], item)

    def load_rules(self, backend: str | None = None) -> None:
        """kube-proxy's full sync of both families into ``backend`` (this world's by default)."""
        for family in (4, 6):
            self.ns.restore(ruleset(self.ports, family), family, backend or self.backend)
        time.sleep(SCRAPE_WINDOW + 0.05)

    def iptables(self, *args: str, family: int = 4) -> None:
        self.ns.iptables(*args, family=family, backend=self.backend)
        time.sleep(SCRAPE_WINDOW + 0.05)  # past the shared read's reuse window

    def port(self, name: str) -> ServicePort:
        return next(p for p in self.ports if p.name == name)

    def scrape(self) -> dict:
        return self.ns.run(self.rig.scrape)

    def close(self) -> None:
        self.rig.close()
        self.api.stop()


@pytest.fixture(params=BACKENDS)
def ipt_drift(request, tmp_path):
    with IptNS() as ns:
        world = IptDrift(ns, request.param, tmp_path)
        try:
            yield world
        finally:
            world.close()


def test_rules_as_kube_proxy_writes_them_are_no_drift(ipt_drift):
    s = wait_until(lambda: (lambda s: s if no_drift(s) else None)(ipt_drift.scrape()), what="no drift")
    assert value(s, "kubenode_dataplane_info", proxy="kube-proxy", mode="iptables") == 1
    # a, b, v6 send traffic to endpoints; c only has a REJECT.
    assert value(s, "kubenode_dataplane_desired_virtual_servers") == 3
    assert value(s, "kubenode_dataplane_desired_real_servers") == 6
    assert value(s, "kubenode_dataplane_read_seconds") is not None
    # The iptables collector is on, the IPVS and nftables ones off (no series at all).
    assert value(s, "kubenode_collector_success", collector="iptables") == 1
    assert value(s, "kubenode_collector_success", collector="ipvs") is None
    assert value(s, "kubenode_collector_success", collector="nftables") is None
    backend = {"nft": "iptables-nft", "legacy": "iptables-legacy"}[ipt_drift.backend]
    assert value(s, "kubenode_iptables_backend_info", backend=backend) == 1
    assert value(s, "kubenode_iptables_frontends") == 3
    assert value(s, "kubenode_iptables_endpoints") == 6
    assert value(s, "kubenode_iptables_rejected_frontends") == 1
    assert value(s, "kubenode_iptables_unread") == 0
    assert value(s, "kubenode_iptables_hooked", family="ip") == 1
    assert value(s, "kubenode_iptables_service_chains", family="ip") == 2
    for family in ("ip", "ip6"):
        assert value(s, "kubenode_iptables_kube_chains", family=family, table="nat") > 0
        assert value(s, "kubenode_iptables_rules", family=family, table="filter") > 0
    if ipt_drift.backend == "nft":
        # Looking for legacy rules created no legacy table (asking x_tables for one would).
        assert ipt_drift.ns.run(lambda: [open(f"/proc/thread-self/net/{name}").read()
                                         for name in ("ip_tables_names", "ip6_tables_names")]) == ["", ""]


def test_a_deleted_sep_jump_drifts_after_the_grace_period_and_clears_when_fixed(ipt_drift):
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="no drift at first")
    b = ipt_drift.port("b")
    svc, sep = chain_name(b, "SVC"), chain_name(b, "SEP", ("10.244.2.2", 8080))
    # b's last endpoint rule (the one without a probability) deleted: 10.244.2.2 gets no traffic.
    ipt_drift.iptables("-t", "nat", "-D", svc, "-m", "comment", "--comment", f"{NS}/b:http -> 10.244.2.2:8080",
                       "-j", sep)
    s = ipt_drift.scrape()
    assert drift(s) == dict.fromkeys(KINDS, 0.0), "within the grace period nothing counts"
    want = {**dict.fromkeys(KINDS, 0.0), "missing_real_server": 1.0}
    s = wait_until(lambda: (lambda s: s if drift(s) == want else None)(ipt_drift.scrape()),
                   timeout=GRACE + 10, what=f"drift {want}")
    assert services_drifted(s) == {("b", "missing_real_server"): 1}
    ipt_drift.load_rules()
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="drift cleared once the rules are right again")


def test_a_stale_frontend_is_named_by_its_chain_hash_without_comments(ipt_drift):
    """kube-proxy writes no comments past 1,000 endpoints: a frontend the API no longer has
    (a's port at an address it never had) is named from the chain's hash, not a comment."""
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="no drift at first")
    svc = chain_name(ipt_drift.port("a"), "SVC")
    ipt_drift.iptables("-t", "nat", "-I", "KUBE-SERVICES", "1", "-d", "10.96.0.99/32", "-p", "tcp", "-m", "tcp",
                       "--dport", "80", "-j", svc)
    # The rule's own comment is absent: only the chain's hash can say whose it is.
    want = {**dict.fromkeys(KINDS, 0.0), "stale_virtual_server": 1.0, "stale_real_server": 2.0}
    s = wait_until(lambda: (lambda s: s if drift(s) == want else None)(ipt_drift.scrape()),
                   timeout=GRACE + 10, what=f"drift {want}")
    assert services_drifted(s) == {("a", "stale_virtual_server"): 1, ("a", "stale_real_server"): 2}


def test_the_nat_table_flushed_is_every_frontend_missing(ipt_drift):
    """firewalld's reload (kubernetes 129128, rke2 10469): the nat table emptied, kube-proxy's
    filter chains left. Drift, loudly, not an unreadable table nor "no kube-proxy here"."""
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="no drift at first")
    ipt_drift.iptables("-t", "nat", "-F")
    ipt_drift.iptables("-t", "nat", "-X")
    # a and b gone (c has no endpoints: its REJECT in filter is still right); IPv6 untouched.
    want = {**dict.fromkeys(KINDS, 0.0), "missing_virtual_server": 2.0}
    s = wait_until(lambda: (lambda s: s if drift(s) == want else None)(ipt_drift.scrape()),
                   timeout=GRACE + 10, what=f"drift {want}")
    assert value(s, "kubenode_collector_success", collector="drift") == 1
    assert value(s, "kubenode_iptables_kube_chains", family="ip", table="nat") == 0
    ipt_drift.load_rules()
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="drift cleared once kube-proxy wrote its rules again")


def test_programming_latency_observed_when_the_rules_catch_up(ipt_drift):
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="no drift at first")
    assert value(ipt_drift.scrape(), "kubenode_dataplane_programming_latency_seconds_count") == 0
    trigger = time.time()
    ipt_drift.port("a").endpoints = [("10.244.1.1", 8080), ("10.244.1.3", 8080)]
    ipt_drift.publish(trigger, only="a")
    wait_until(lambda: value(ipt_drift.scrape(), "kubenode_dataplane_programming_latency_pending") == 1,
               what="the change followed")
    time.sleep(0.5)  # the proxy's delay
    assert value(ipt_drift.scrape(), "kubenode_dataplane_programming_latency_seconds_count") == 0
    ipt_drift.load_rules()
    s = wait_until(lambda: (lambda s: s if value(s, "kubenode_dataplane_programming_latency_seconds_count")
                            == 1 else None)(ipt_drift.scrape()), what="latency observed")
    observed = value(s, "kubenode_dataplane_programming_latency_seconds_sum")
    assert 0.5 <= observed < time.time() - trigger + 0.1
    assert value(s, "kubenode_dataplane_programming_latency_pending") == 0
    assert no_drift(s)


def test_mixed_backends_are_a_reader_error_naming_both(ipt_drift):
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="no drift at first")
    other = "legacy" if ipt_drift.backend == "nft" else "nft"
    ipt_drift.load_rules(other)
    s = ipt_drift.scrape()
    assert value(s, "kubenode_collector_success", collector="drift") == 0
    assert value(s, "kubenode_collector_success", collector="iptables") == 0
    assert value(s, "kubenode_dataplane_drift", kind="missing_virtual_server") is None, "no figures over it"
    reason = ipt_drift.ns.run(lambda: _reason(ipt_drift.rig, "drift"))
    assert "both iptables backends" in reason and "iptables-nft" in reason and "iptables-legacy" in reason


def _reason(rig: DriftRig, collector: str) -> str:
    """What the runner says of a failed collector (the one line it logs)."""
    slot = next(slot for slot in rig.runner.slots if slot.collector.name == collector)
    return slot.last.error


def test_the_exporter_reads_either_backend_without_any_iptables_tool(ipt_drift, tmp_path, monkeypatch):
    """The exporter's PATH without any iptables tool (as in the image): a change is read and
    resolved on both backends, the legacy one from the kernel's blob in-process."""
    wait_until(lambda: no_drift(ipt_drift.scrape()), what="no drift at first")
    ipt_drift.iptables("-t", "nat", "-N", f"OTHER-{os.getpid()}")  # a change, not kube-proxy's
    empty = tmp_path / f"empty-path-{os.getpid()}"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # after the test's own iptables run: the exporter's alone
    s = ipt_drift.scrape()
    for collector in ("drift", "iptables"):
        assert value(s, "kubenode_collector_success", collector=collector) == 1, \
            ipt_drift.ns.run(lambda: _reason(ipt_drift.rig, collector))
    assert no_drift(s)


def test_size_metrics_are_per_family_and_table_with_the_backend():
    from types import SimpleNamespace

    from exporter.collectors.iptables import size_metrics
    from exporter.dataplane import RealServer, VirtualServer, VirtualServerKey
    from exporter.readers.dataplanes import IptablesLive, ruleset_sizes
    from exporter.readers.iptables_rules import IptablesRule, IptablesRuleset

    rule = IptablesRule("RETURN")
    rulesets = [IptablesRuleset(4, {"nat": {"PREROUTING": (rule,), "KUBE-SERVICES": (rule, rule), "KUBE-SVC-X": ()},
                                    "filter": {"INPUT": ()}}),
                IptablesRuleset(6, {"nat": {"KUBE-SERVICES": ()}})]
    key = VirtualServerKey("TCP", "10.96.0.1", 443)
    table = {key: VirtualServer(key, "random", None, {("10.0.0.1", 6443): RealServer("10.0.0.1", 6443)})}
    from exporter.readers.iptables import IptablesSizes

    read = SimpleNamespace(table=table, rejected={VirtualServerKey("TCP", "10.96.0.2", 80): "reject"},
                           unread=(), firewalled=frozenset(),
                           sizes={"ipv4": IptablesSizes(4, 3, 2, 1, 1, True), "ipv6": IptablesSizes(1, 0, 1, 0, 0, False)})
    metrics = {m.name: m for m in size_metrics(IptablesLive(read, "legacy", ruleset_sizes(rulesets), 0.1, True))}
    samples = {(m.name, tuple(s.labels.values())): s.value for m in metrics.values() for s in m.samples}
    assert samples[("kubenode_iptables_backend_info", ("iptables-legacy",))] == 1
    assert samples[("kubenode_iptables_chains", ("ip", "nat"))] == 3
    assert samples[("kubenode_iptables_rules", ("ip", "nat"))] == 3
    assert samples[("kubenode_iptables_kube_chains", ("ip", "nat"))] == 2
    assert samples[("kubenode_iptables_chains", ("ip", "filter"))] == 1
    assert samples[("kubenode_iptables_kube_chains", ("ip6", "nat"))] == 1
    assert samples[("kubenode_iptables_frontends", ())] == 1
    assert samples[("kubenode_iptables_endpoints", ())] == 1
    assert samples[("kubenode_iptables_rejected_frontends", ())] == 1
    assert samples[("kubenode_iptables_unread", ())] == 0
    assert samples[("kubenode_iptables_service_chains", ("ip",))] == 1
    assert samples[("kubenode_iptables_endpoint_chains", ("ip6",))] == 0
    assert samples[("kubenode_iptables_hooked", ("ip",))] == 1
    assert samples[("kubenode_iptables_hooked", ("ip6",))] == 0
    assert all(m.documentation for m in metrics.values())
