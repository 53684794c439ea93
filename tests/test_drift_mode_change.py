"""A node whose kube-proxy is redeployed in another mode, with ``--proxy-mode auto``: real rules
in a network namespace of the test's own, the API stand-in, the live exporter (``DriftRig``).

A migration from iptables to nftables mode (what clusters are doing now that nftables is
GA), or its roll-back, cleans up the old mode's rules: `kube-proxy --cleanup` of the old mode, or a reboot.
The exporter read the old mode's rules until its next 5-minute check of the mode, so
every frontend was missing past the 60 s grace period and KubeNodeDataplaneMissing-
VirtualServers' 2 minutes, on every node of the migration. Now the drift it sees asks
for the mode to be checked again at once (on the mode's own thread, never on a scrape).
"""

from __future__ import annotations

import os
import time

import pytest

from exporter.dataplane import SCRAPE_WINDOW
from tests import apiserver as api_objects
from tests.apiserver import FakeApiServer
from tests.drift_rig import NODE, DriftRig
from tests.helpers import value
from tests.ipt_rulesets import IptNS, ServicePort, kube_objects, ruleset as iptables_rules
from tests.nft_rulesets import ruleset as nftables_rules

NS = "modechange"
RESOURCES = {"Service": "services", "EndpointSlice": "endpointslices"}
GRACE = 2.0  # seconds: past it, the old mode's rules gone would be reported missing


def service_ports() -> list[ServicePort]:
    return [ServicePort(NS, "a", "10.96.0.11", [("10.244.1.1", 8080), ("10.244.1.2", 8080)], port_name="http"),
            ServicePort(NS, "b", "10.96.0.12", [("10.244.2.1", 8080)], port_name="http")]


def _total(s: dict, name: str) -> float:
    return sum(v for (sample, _), v in s.items() if sample == name)


def _mode(s: dict) -> str | None:
    return next((dict(labels)["mode"] for (sample, labels), v in s.items()
                 if sample == "kubenode_dataplane_info" and v == 1.0), None)


def _program_iptables(ns: IptNS, ports: list[ServicePort]) -> None:
    ns.restore(iptables_rules(ports, 4), 4)


def _clean_iptables(ns: IptNS) -> None:
    for table in ("nat", "filter"):
        ns.iptables("-t", table, "-F")
        ns.iptables("-t", table, "-X")
    assert "KUBE-" not in ns.save(4)


def _program_nftables(ns: IptNS, ports: list[ServicePort]) -> None:
    ns._exec(["nft", "-f", "-"], nftables_rules(ports, "ip"))  # nsenter into the namespace


def _clean_nftables(ns: IptNS) -> None:
    ns._exec(["nft", "-f", "-"], "delete table ip kube-proxy\n")


PROGRAM = {"iptables": (_program_iptables, _clean_iptables), "nftables": (_program_nftables, _clean_nftables)}


@pytest.mark.parametrize("before, after", [("iptables", "nftables"), ("nftables", "iptables")],
                         ids=["iptables-to-nftables", "nftables-back-to-iptables"])
def test_a_proxy_redeployed_in_another_mode_is_followed_before_its_old_rules_are_drift(tmp_path, caplog,
                                                                                       before, after):
    """kube-proxy in one mode (iptables: iptables-nft), then redeployed in the other (a
    migration to nftables, or its roll-back): the new mode's rules programmed and the old
    ones cleaned up. Within a few scrapes the exporter reads the new mode's rules and finds
    no drift; no scrape reports the old mode's missing rules past the grace period.
    Before: the old mode until the next 5-minute check, every frontend missing past the
    grace period."""
    ports = service_ports()
    with IptNS() as ns:
        ns.run(lambda: os.system("ip link set lo up"))
        api = ns.run(lambda: FakeApiServer().start())
        rig = None
        try:
            api.create("nodes", api_objects.node(NODE, zone="zone-a"))
            for item in kube_objects(ports, NODE):
                api.create(RESOURCES[item["kind"]], item)
            kubeconfig = api.write_kubeconfig(str(tmp_path / f"kubeconfig-mode-{os.getpid()}"))
            PROGRAM[before][0](ns, ports)  # kube-proxy in its first mode
            procfs = tmp_path / f"proc-mode-{os.getpid()}"
            (procfs / "net").mkdir(parents=True)
            (procfs / "thread-self").symlink_to("/proc/thread-self")  # the legacy tables' names: the namespace's
            rig = ns.run(lambda: DriftRig(tmp_path, kubeconfig, procfs=str(procfs), grace=GRACE, follow=0.1,
                                          mode="auto", kube_mode=before,
                                          extra=("--no-collector.process", "--no-collector.memcg")))
            rig.wait_synced()
            s = ns.run(rig.scrape)
            assert _mode(s) == before and value(s, "kubenode_collector_success", collector="drift") == 1.0
            assert _total(s, "kubenode_dataplane_drift") == _total(s, "kubenode_dataplane_drift_pending") == 0

            # Redeployed in the other mode: its rules programmed, the old mode's cleaned up.
            PROGRAM[after][0](ns, ports)
            PROGRAM[before][1](ns)
            moved = time.monotonic()
            seen = []
            while time.monotonic() - moved < 4 * GRACE:
                time.sleep(SCRAPE_WINDOW + 0.1)
                s = ns.run(rig.scrape)
                seen.append((round(time.monotonic() - moved, 2), _mode(s), _total(s, "kubenode_dataplane_drift"),
                             _total(s, "kubenode_dataplane_drift_pending")))
                assert _total(s, "kubenode_dataplane_drift") == 0, f"drift reported past the grace period: {seen}"
            assert _mode(s) == after, f"not following the {after} rules {4 * GRACE:g} s after: {seen}"
            assert value(s, "kubenode_dataplane_drift_synced") == 1.0 and _total(s, "kubenode_dataplane_drift_pending") == 0, seen
            assert value(s, "kubenode_collector_success", collector="drift") == 1.0
            assert any(f"proxy mode changed from {before} to {after}" in r.getMessage() for r in caplog.records)
        finally:
            if rig is not None:
                rig.close()
            api.stop()
