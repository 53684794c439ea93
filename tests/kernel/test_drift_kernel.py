"""Inside the VM: the desired table programmed into a real kernel reads back with no drift,
and faults injected with ipvsadm come out of `diff` with the right kind and service.

This checks that the model's keys (compressed IPv6, SCTP, fwmark, persistence in
seconds) are the kernel's keys as the IPVS reader sees them, not just our own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from exporter.dataplane import Table, VirtualServerKey
from exporter.kube import desired as model
from exporter.kube.diff import KINDS, diff_tables
from exporter.kube.objects import parse_objects
from exporter.readers.ipvs import IPVSReader
from tests.kernel import ipvs_tables

FIXTURE = "tests/fixtures/cluster.yaml"
FORWARD = {"Masq": "-m", "Tunnel": "-i", "Route": "-g"}


@pytest.fixture
def ipvs():
    ipvs_tables.load_modules()
    ipvs_tables.clear()
    yield ipvs_tables
    ipvs_tables.clear()


def desired_of(proxy: str) -> Table:
    with open(FIXTURE) as fh:
        objs = parse_objects(yaml.safe_load_all(fh))
    node = model.node_facts("node-a", objs.nodes["node-a"], proxy=proxy)
    # kube-router admits no externalIP under its default flags, so no DSR fwmark service would be
    # programmed; without strict validation the fixture's externalIPs (and DSR) are kept.
    flags = model.KubeRouterFlags(strict_external_ip_validation=False)
    return model.desired_table(objs.services.values(), model.slices_by_service(objs.slices.values()), node, proxy,
                               kube_router_flags=flags)


def service_flag(key: VirtualServerKey) -> str:
    if key.fwmark is not None:
        return f"-f {key.fwmark}"
    flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[key.protocol]
    host = f"[{key.address}]" if ":" in key.address else key.address
    return f"{flag} {host}:{key.port}"


def rules(table: Table) -> list[str]:
    """`ipvsadm -R` lines that program ``table`` as a proxy would."""
    lines = []
    for key, vs in table.items():
        opts = f"-s {vs.scheduler}" + (f" -p {vs.persistent_timeout}" if vs.persistent_timeout is not None else "")
        lines.append(f"-A {service_flag(key)} {opts}")
        for rs in vs.real_servers.values():
            host = f"[{rs.address}]" if ":" in rs.address else rs.address
            port = rs.port if rs.forward == "Masq" else 0 if rs.forward == "Route" else rs.port
            lines.append(f"-a {service_flag(key)} -r {host}:{port} {FORWARD[rs.forward]} -w {rs.weight}")
    return lines


def live() -> Table:
    return IPVSReader().get(max_age=0)


@pytest.mark.parametrize("proxy", ["kube-proxy", "kube-router"])
def test_programmed_desired_table_reads_back_without_drift(ipvs, proxy):
    want = desired_of(proxy)
    ipvs.restore(rules(want))
    result = diff_tables(want, live())
    assert {k: [str(i.vs) for i in result.of(k)] for k in KINDS if result.of(k)} == {}
    keys = {str(k) for k in want}
    if proxy == "kube-proxy":  # the kinds of key this checked: IPv6 and SCTP
        assert {"TCP [fd00:10:96::4]:80", "SCTP 10.96.8.8:9999"} <= keys
    else:  # and a DSR fwmark service with tunnel real servers
        assert any(k.fwmark is not None for k in want)


def run_diff(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "diff", "--objects", FIXTURE, "--node-name", "node-a",
                           "--output", "json", *extra], capture_output=True, text=True, timeout=120)


def test_faults_injected_behind_the_proxy_are_reported_by_kind_and_service(ipvs):
    want = desired_of("kube-proxy")
    ipvs.restore(rules(want))
    clean = run_diff()  # no --ipvs: the live table of this (guest) host
    assert clean.returncode == 0, clean.stdout + clean.stderr

    ipvs.ipvsadm("-D", "-t", "10.96.7.7:80")  # missing virtual server (default/zoned)
    ipvs.ipvsadm("-A", "-t", "10.96.200.1:80", "-s", "rr")  # stale virtual server, with real servers
    ipvs.ipvsadm("-a", "-t", "10.96.200.1:80", "-r", "10.244.7.1:8080", "-m", "-w", "1")  # still takes traffic
    ipvs.ipvsadm("-a", "-t", "10.96.200.1:80", "-r", "10.244.7.2:8080", "-m", "-w", "0")
    ipvs.ipvsadm("-d", "-u", "10.96.0.10:53", "-r", "10.244.2.7:53")  # missing real server
    ipvs.ipvsadm("-a", "-u", "10.96.0.10:53", "-r", "10.244.9.9:53", "-m", "-w", "1")  # stale real server
    ipvs.ipvsadm("-e", "-t", "10.96.1.1:80", "-r", "10.244.1.10:8080", "-m", "-w", "0")  # zero weight
    ipvs.ipvsadm("-a", "-t", "10.96.1.1:80", "-r", "10.244.2.99:8080", "-m", "-w", "0")  # draining
    ipvs.ipvsadm("-E", "-t", "10.96.3.3:5432", "-s", "rr")  # ClientIP affinity lost (not persistent)
    proc = run_diff()
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    got = {kind: sorted((i["address"], i.get("real_address"), i["service"]) for i in doc[kind]) for kind in doc}
    assert got == {
        "missing_virtual_servers": [("10.96.7.7", None, "default/zoned")],
        "stale_virtual_servers": [("10.96.200.1", None, None)],
        "missing_real_servers": [("10.96.0.10", "10.244.2.7", "kube-system/kube-dns")],
        # The stale virtual server's real servers are listed too (the contract), by weight.
        "stale_real_servers": [("10.96.0.10", "10.244.9.9", "kube-system/kube-dns"),
                               ("10.96.200.1", "10.244.7.1", None)],
        "zero_weight_real_servers": [("10.96.1.1", "10.244.1.10", "default/web")],
        "draining_real_servers": [("10.96.1.1", "10.244.2.99", "default/web"), ("10.96.200.1", "10.244.7.2", None)],
        "rejected_virtual_servers": [],  # IPVS has no no-endpoint verdicts
        "mismatched_virtual_servers": [("10.96.3.3", None, "default/sticky")],
    }
    mismatch = doc["mismatched_virtual_servers"][0]
    assert (mismatch["persistent_timeout"], mismatch["live_persistent_timeout"]) == (600, None)

    # Put things right except the draining real server: not drift, exit 0.
    ipvs.clear()
    ipvs.restore(rules(want))
    ipvs.ipvsadm("-a", "-t", "10.96.1.1:80", "-r", "10.244.2.99:8080", "-m", "-w", "0")
    proc = run_diff()
    assert proc.returncode == 0, proc.stdout
    assert len(json.loads(proc.stdout)["draining_real_servers"]) == 1


def test_with_no_services_every_real_server_of_the_table_is_listed(ipvs, tmp_path):
    """`diff` with no Services on a real kernel's table: every virtual server is stale and
    every one of its real servers is listed with its weight (they all still take traffic)."""
    ipvs.restore(ipvs_tables.uniform_table(300, reals=5))
    ipvs.ipvsadm("-e", "-t", "10.96.0.0:80", "-r", "10.128.0.0:8080", "-m", "-w", "0")
    empty = tmp_path / "no-services.yaml"
    empty.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    proc = subprocess.run([sys.executable, "-m", "exporter", "diff", "--objects", str(empty), "--node-name", "node-a",
                           "--output", "json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["stale_virtual_servers"]) == 300
    assert len(doc["stale_real_servers"]) == 1499 and len(doc["draining_real_servers"]) == 1
    assert doc["draining_real_servers"][0]["real_address"] == "10.128.0.0"
    assert {i["weight"] for i in doc["stale_real_servers"]} == {1}
    listed = {(i["address"], i["port"], i["real_address"], i["real_port"])
              for kind in ("stale_real_servers", "draining_real_servers") for i in doc[kind]}
    table = live()
    assert listed == {(k.address, k.port, a, p) for k, vs in table.items() for (a, p) in vs.real_servers}
