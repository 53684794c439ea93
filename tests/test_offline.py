"""`kubenode-exporter desired` and `diff` end to end, as subprocesses (`python -m exporter ...`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from exporter.kube import desired as model
from exporter.kube.objects import parse_objects
from exporter.readers.ipvs import kernel_hz
from tests.ipset_ns import NetNS
from tests.ipvs_text import format_ip_vs

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = str(ROOT / "tests" / "fixtures" / "cluster.yaml")

SMALL = {
    "apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system"},
         "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "default"},
         "spec": {"type": "NodePort", "clusterIPs": ["10.96.1.1", "fd00::1:1"],
                  "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}},
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-1", "namespace": "kube-system",
                      "labels": {"kubernetes.io/service-name": "kube-dns"}},
         "addressType": "IPv4", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
         "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}},
                       {"addresses": ["10.244.10.5"], "conditions": {"ready": True}}]},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-v6", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv6", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["fd00:0:0:0:0:0:244:1"], "conditions": {"ready": True}}]},
    ]}


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix=f"kubenode-model-offline-{os.getpid()}-")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(*args: str, env: dict | None = None, netns: NetNS | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it: no cluster in the environment, optionally inside `netns`."""
    environ = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "NODE_NAME")}
    environ.update(env or {})
    prefix = ["nsenter", f"--net={netns.path}"] if netns else []
    return subprocess.run([*prefix, sys.executable, "-m", "exporter", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


def assert_bad_input(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- desired ------------------------------------------------------------------


def test_desired_json_exactly_per_contract(workdir):
    objects = write(workdir / "small.json", json.dumps(SMALL))
    proc = run("desired", "--objects", objects, "--node-name", "node-a", "--node-ip", "192.168.1.10",
               "--node-ip", "2001:0db8:0000::0010", "--output", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"virtual_servers": [
        {"protocol": "TCP", "address": "10.96.1.1", "port": 80, "fwmark": None, "scheduler": "rr",
         "persistent_timeout": 300, "service": "default/web", "real_servers": []},
        {"protocol": "TCP", "address": "192.168.1.10", "port": 30080, "fwmark": None, "scheduler": "rr",
         "persistent_timeout": 300, "service": "default/web", "real_servers": []},
        {"protocol": "TCP", "address": "2001:db8::10", "port": 30080, "fwmark": None, "scheduler": "rr",
         "persistent_timeout": 300, "service": "default/web",
         "real_servers": [{"address": "fd00::244:1", "port": 8080, "weight": 1}]},
        {"protocol": "TCP", "address": "fd00::1:1", "port": 80, "fwmark": None, "scheduler": "rr",
         "persistent_timeout": 300, "service": "default/web",
         "real_servers": [{"address": "fd00::244:1", "port": 8080, "weight": 1}]},
        {"protocol": "UDP", "address": "10.96.0.10", "port": 53, "fwmark": None, "scheduler": "rr",
         "persistent_timeout": None, "service": "kube-system/kube-dns",
         "real_servers": [{"address": "10.244.1.5", "port": 53, "weight": 1},
                          {"address": "10.244.10.5", "port": 53, "weight": 1}]},
    ]}


def test_desired_yaml_fixture_node_addresses_from_the_node_and_malformed_objects_skipped():
    proc = run("desired", "--objects", FIXTURE, "--node-name", "node-a", "--output", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    keys = [(v["protocol"], v["address"], v["port"]) for v in doc["virtual_servers"]]
    assert ("TCP", "192.168.1.10", 30080) in keys and ("TCP", "203.0.113.50", 30080) in keys
    assert len(keys) == 20 and len(set(keys)) == 20
    # the three malformed objects are named on stderr, one line each, and nothing else failed
    skipped = [line for line in proc.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 3 and any("default/bad-ip" in s for s in skipped)
    assert "Traceback" not in proc.stderr


def test_desired_kube_router_uses_the_primary_node_ip_and_its_default_flags():
    proc = run("desired", "--objects", FIXTURE, "--node-name", "node-a", "--proxy", "kube-router",
               "--output", "json")
    assert proc.returncode == 0, proc.stderr
    vss = json.loads(proc.stdout)["virtual_servers"]
    node_ports = {v["address"] for v in vss if v["port"] in (30080, 30443)}
    assert node_ports == {"192.168.1.10"}
    # kube-router >= 2.8 with default flags admits no externalIP or LoadBalancer IP (strict
    # validation, no ranges), so the fixture's DSR service has no fwmark service either.
    assert not {v["address"] for v in vss} & {"203.0.113.10", "203.0.113.11", "198.51.100.7"}
    assert all(v["fwmark"] is None for v in vss)


def test_fwmark_virtual_servers_print_without_address_and_sort_last():
    from exporter.offline import table_json

    vss = table_json(desired_of(FIXTURE, proxy="kube-router",
                                kube_router_flags=model.KubeRouterFlags(strict_external_ip_validation=False))
                     )["virtual_servers"]
    fw = [v for v in vss if v["fwmark"] is not None]
    assert len(fw) == 1 and fw[0]["protocol"] is None and fw[0]["address"] is None and fw[0]["port"] is None
    assert vss.index(fw[0]) == len(vss) - 1  # fwmark services sort last


def test_desired_text_is_a_readable_table():
    proc = run("desired", "--objects", FIXTURE, "--node-name", "node-a")
    assert proc.returncode == 0
    out = proc.stdout
    assert "TCP 10.96.0.10:53" in out and "kube-system/kube-dns" in out
    assert "  -> 10.244.1.5:53" in out and "weight 1" in out
    assert "persistent 600" in out and "(no real servers)" in out
    assert out.rstrip().endswith("20 virtual servers, 22 real servers")


def test_desired_without_node_addresses_warns_and_leaves_node_ports_out():
    proc = run("desired", "--objects", FIXTURE, "--node-name", "no-such-node", "--output", "json")
    assert proc.returncode == 0
    assert "no NodePort addresses" in proc.stderr
    ports = {v["port"] for v in json.loads(proc.stdout)["virtual_servers"]}
    assert 30080 not in ports


def test_node_name_from_environment():
    proc = run("desired", "--objects", FIXTURE, "--output", "json", env={"NODE_NAME": "node-a"})
    vss = json.loads(proc.stdout)["virtual_servers"]
    assert any(v["address"] == "192.168.1.10" for v in vss)


def test_help_says_where_node_port_addresses_come_from():
    proc = run("desired", "--help")
    assert proc.returncode == 0
    assert "InternalIP/ExternalIP" in " ".join(proc.stdout.split())


@pytest.mark.parametrize("content, words", [
    (None, ["cannot read", "nope.yaml"]),
    ("items: [\n  - {kind: Service\n", ["not valid YAML", "line"]),
    ("kind: Service\nmetadata: {name: x}\n", ["not a List", "Service"]),
    ("42\n", ["not a List"]),
    ("", ["empty"]),
    ('{"kind": "List", "items": {}}', ["not a List"]),
    (b"\xff\xfe\x00", ["not UTF-8"]),
])
def test_bad_objects_file_is_exit_2_with_one_line(workdir, content, words):
    path = workdir / "nope.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    for command in ("desired", "diff"):
        extra = ["--ipvs", write(workdir / "empty_ipvs", format_ip_vs({}, 250))] if command == "diff" else []
        assert_bad_input(run(command, "--objects", str(path), *extra), *words)


def test_bad_flags_are_exit_2_with_one_line():
    assert_bad_input(run("desired", "--objects", FIXTURE, "--proxy", "cilium"), "--proxy")
    assert_bad_input(run("desired", "--objects", FIXTURE, "--node-ip", "300.1.1.1"), "300.1.1.1")
    assert_bad_input(run("desired", "--objects", FIXTURE, "--output", "xml"), "--output")


def test_no_objects_and_no_kubeconfig_is_exit_2():
    assert_bad_input(run("desired"), "--objects")


# --- diff ---------------------------------------------------------------------


def desired_of(path: str, node: str = "node-a", proxy: str = "kube-proxy", **kw):
    import yaml

    with open(path) as fh:
        objs = parse_objects(yaml.safe_load_all(fh))
    facts = model.node_facts(node, objs.nodes.get(node), proxy=proxy)
    return model.desired_table(objs.services.values(), model.slices_by_service(objs.slices.values()), facts, proxy,
                               **kw)


def live_file(workdir: Path, table, connections=None) -> str:
    return write(workdir / "ip_vs", format_ip_vs(table, kernel_hz(), connections))


@pytest.mark.parametrize("proxy", ["kube-proxy", "kube-router"])
def test_diff_of_a_matching_table_is_exit_0_and_empty(workdir, proxy):
    live = live_file(workdir, desired_of(FIXTURE, proxy=proxy))
    proc = run("diff", "--objects", FIXTURE, "--ipvs", live, "--node-name", "node-a", "--proxy", proxy,
               "--output", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc)[:6] == ["missing_virtual_servers", "stale_virtual_servers", "missing_real_servers",
                             "stale_real_servers", "zero_weight_real_servers", "draining_real_servers"]
    assert all(v == [] for v in doc.values())


def test_diff_reports_each_fault_with_kind_and_service(workdir):
    from exporter.dataplane import RealServer, VirtualServerKey

    table = dict(desired_of(FIXTURE))
    dns = VirtualServerKey("UDP", "10.96.0.10", 53)
    web = VirtualServerKey("TCP", "10.96.1.1", 80)
    sticky = VirtualServerKey("TCP", "10.96.3.3", 5432)
    del table[VirtualServerKey("TCP", "10.96.7.7", 80)]  # missing virtual server
    web_copy = VirtualServerKey("TCP", "10.96.200.1", 80)
    table[web_copy] = table[web]._replace(key=web_copy, service=None)  # stale virtual server
    rs = dict(table[dns].real_servers)
    rs.pop(("10.244.2.7", 53))  # missing real server
    rs[("10.244.9.9", 53)] = RealServer("10.244.9.9", 53, 1, "Masq")  # stale real server
    table[dns] = table[dns]._replace(real_servers=rs)
    rs = dict(table[web].real_servers)
    rs[("10.244.1.10", 8080)] = rs[("10.244.1.10", 8080)]._replace(weight=0)  # zero weight
    rs[("10.244.2.99", 8080)] = RealServer("10.244.2.99", 8080, 0, "Masq")  # draining
    table[web] = table[web]._replace(real_servers=rs)
    table[sticky] = table[sticky]._replace(persistent_timeout=None)  # affinity lost
    connections = {(dns, ("10.244.9.9", 53)): (4, 1), (web, ("10.244.2.99", 8080)): (0, 3)}
    proc = run("diff", "--objects", FIXTURE, "--ipvs", live_file(workdir, table, connections),
               "--node-name", "node-a", "--output", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["missing_virtual_servers"] == [{
        "protocol": "TCP", "address": "10.96.7.7", "port": 80, "fwmark": None, "service": "default/zoned",
        "real_servers": 1, "scheduler": "rr", "persistent_timeout": None}]
    assert [(i["address"], i["service"]) for i in doc["stale_virtual_servers"]] == [("10.96.200.1", None)]
    # Every real server of the stale virtual server is listed too, with its weight.
    stale_vs_reals = sorted((i["real_address"], i["weight"]) for kind in ("stale_real_servers", "draining_real_servers")
                            for i in doc[kind] if i["address"] == "10.96.200.1")
    assert stale_vs_reals == sorted((a, rs.weight) for (a, _), rs in table[web_copy].real_servers.items())
    assert stale_vs_reals
    doc["stale_real_servers"] = [i for i in doc["stale_real_servers"] if i["address"] != "10.96.200.1"]
    assert doc["missing_real_servers"] == [{
        "protocol": "UDP", "address": "10.96.0.10", "port": 53, "fwmark": None,
        "real_address": "10.244.2.7", "real_port": 53, "weight": 1, "service": "kube-system/kube-dns"}]
    assert doc["stale_real_servers"] == [{
        "protocol": "UDP", "address": "10.96.0.10", "port": 53, "fwmark": None,
        "real_address": "10.244.9.9", "real_port": 53, "weight": 1, "service": "kube-system/kube-dns",
        "active_connections": 4, "inactive_connections": 1}]
    assert [(i["real_address"], i["weight"], i["service"]) for i in doc["zero_weight_real_servers"]] == \
        [("10.244.1.10", 0, "default/web")]
    assert [(i["real_address"], i["weight"], i["inactive_connections"]) for i in doc["draining_real_servers"]] == \
        [("10.244.2.99", 0, 3)]
    assert [(i["address"], i["persistent_timeout"], i["live_persistent_timeout"])
            for i in doc["mismatched_virtual_servers"]] == [("10.96.3.3", 600, None)]

    text = run("diff", "--objects", FIXTURE, "--ipvs", live_file(workdir, table), "--node-name", "node-a")
    assert text.returncode == 1
    stale_rs = 1 + sum(rs.weight > 0 for rs in table[web_copy].real_servers.values())
    assert "missing virtual servers: 1" in text.stdout and f"stale real servers: {stale_rs}" in text.stdout
    assert "-> 10.244.9.9:53" in text.stdout and text.stdout.rstrip().endswith("drift found")


def test_diff_with_only_draining_real_servers_is_exit_0(workdir):
    from exporter.dataplane import RealServer, VirtualServerKey

    table = dict(desired_of(FIXTURE))
    web = VirtualServerKey("TCP", "10.96.1.1", 80)
    rs = dict(table[web].real_servers)
    rs[("10.244.2.99", 8080)] = RealServer("10.244.2.99", 8080, 0, "Masq")
    table[web] = table[web]._replace(real_servers=rs)
    connections = {(web, ("10.244.2.99", 8080)): (1, 0)}
    proc = run("diff", "--objects", FIXTURE, "--ipvs", live_file(workdir, table, connections),
               "--node-name", "node-a", "--output", "json")
    assert proc.returncode == 0, proc.stdout
    assert len(json.loads(proc.stdout)["draining_real_servers"]) == 1


def test_diff_reads_the_live_table_without_ipvs(workdir):
    # The live path reads <procfs>/net/ip_vs through the IPVS reader, as on a node.
    (workdir / "proc" / "net").mkdir(parents=True)
    table = dict(desired_of(FIXTURE))
    table.pop(next(iter(table)))
    (workdir / "proc" / "net" / "ip_vs").write_text(format_ip_vs(table, kernel_hz()))
    proc = run("diff", "--objects", FIXTURE, "--node-name", "node-a", "--path.procfs", str(workdir / "proc"),
               "--output", "json")
    assert proc.returncode == 1, proc.stderr
    assert len(json.loads(proc.stdout)["missing_virtual_servers"]) == 1


def test_diff_without_ip_vs_module_is_exit_2(workdir):
    (workdir / "proc" / "net").mkdir(parents=True)
    assert_bad_input(run("diff", "--objects", FIXTURE, "--path.procfs", str(workdir / "proc")), "ip_vs")


def test_diff_bad_ipvs_file_is_exit_2(workdir):
    assert_bad_input(run("diff", "--objects", FIXTURE, "--ipvs", str(workdir / "absent")), "cannot read")
    garbage = write(workdir / "garbage", "hello\nworld\n")
    assert_bad_input(run("diff", "--objects", FIXTURE, "--ipvs", garbage), "/proc/net/ip_vs")


def test_diff_header_only_ipvs_is_an_empty_table(workdir):
    proc = run("diff", "--objects", FIXTURE, "--ipvs", write(workdir / "empty", format_ip_vs({}, 250)),
               "--node-name", "node-a", "--output", "json")
    assert proc.returncode == 1
    assert len(json.loads(proc.stdout)["missing_virtual_servers"]) == 20


def test_no_objects_with_a_kubeconfig_goes_to_the_cluster_hook(workdir):
    # Listing the live cluster belongs to the Kubernetes client; without it, one clear line.
    proc = run("desired", env={"KUBECONFIG": str(workdir / "kubeconfig")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "cluster" in proc.stderr


def test_diff_of_a_pasted_table_reads_it_whole(workdir):
    """/proc/net/ip_vs as a terminal copy or a chat paste holds it (trailing blanks
    stripped, no final newline) is the same table: exit 0, no drift."""
    text = format_ip_vs(desired_of(FIXTURE), kernel_hz())
    pasted = "\n".join(line.rstrip() for line in text.splitlines())
    assert pasted != text.rstrip("\n")
    proc = run("diff", "--objects", FIXTURE, "--ipvs", write(workdir / "pasted", pasted), "--node-name", "node-a",
               "--output", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(v == [] for v in json.loads(proc.stdout).values())


@pytest.mark.parametrize("where", ["a line of junk", "a cut counter", "the live table"])
def test_diff_of_a_table_not_read_whole_is_exit_2_naming_the_line(workdir, where):
    lines = format_ip_vs(desired_of(FIXTURE), kernel_hz()).splitlines(keepends=True)
    row = next(i for i, line in enumerate(lines) if line.startswith("  -> ") and i > 3)
    bad = {"a line of junk": "Masq 1 0 0 <- pasted from a chat\n",
           "a cut counter": lines[row][:-15] + "\n",
           "the live table": "hello\n"}[where]
    broken = "".join(lines[:row] + [bad] + lines[row + 1:])
    if where == "the live table":
        (workdir / "proc" / "net").mkdir(parents=True)
        (workdir / "proc" / "net" / "ip_vs").write_text(broken)
        args = ["--path.procfs", str(workdir / "proc")]
        source = str(workdir / "proc" / "net" / "ip_vs")
    else:
        args = ["--ipvs", write(workdir / "ip_vs", broken)]
        source = args[1]
    proc = run("diff", "--objects", FIXTURE, "--node-name", "node-a", *args)
    assert_bad_input(proc, f"line {row + 1} is not IPVS text", source, repr(bad.rstrip("\n")))


# --- hostile objects files ----------------------------------------------------------------------

SERVICE_FLOW = "{kind: Service, metadata: {name: s, namespace: n}, spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}}"


def alias_bomb(levels: int = 8, width: int = 9) -> str:
    """A List whose items expand to width**levels Services through nested aliases (about 700 bytes)."""
    lines = [f"base: &s0 {SERVICE_FLOW}"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &s{i} [{', '.join([f'*s{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\napiVersion: v1\nkind: List\nitems: [*s{levels}]\n"


@pytest.mark.parametrize("content, words", [
    ("apiVersion: v1\nkind: List\nitems: &a [*a]\n", ["cycle", "line 3"]),
    ("kind: List\nitems:\n- &s {kind: Service, metadata: {name: a, namespace: b, labels: *s}}\n", ["cycle"]),
    (alias_bomb(), ["more than 10000 nodes"]),
    ("kind: List\nitems: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper than 100"]),
    ('{"kind": "List", "items": ' + "[" * 100000 + "]" * 100000 + "}", ["nested too deep"]),
])
def test_hostile_objects_file_is_exit_2_with_one_line(workdir, content, words):
    assert len(alias_bomb()) < 800
    path = workdir / "hostile.yaml"
    path.write_text(content)
    for command in ("desired", "diff"):
        extra = ["--ipvs", write(workdir / "empty_ipvs", format_ip_vs({}, 250))] if command == "diff" else []
        assert_bad_input(run(command, "--objects", str(path), *extra), str(path), *words)


def test_yaml_objects_read_as_safe_load_reads_them(workdir):
    # The event-built loader gives what yaml.safe_load gives, anchors and merge keys included.
    import yaml

    from exporter.yamlload import load_all

    text = Path(FIXTURE).read_text() + "---\n" + (
        "defaults: &d {protocol: TCP, port: 80}\nkind: List\nitems:\n"
        "- kind: Service\n  metadata: {name: m, namespace: n}\n"
        "  spec: {clusterIP: 10.0.0.9, ports: [{<<: *d, name: http}, {<<: *d, port: 8080, name: alt}]}\n"
        "- {kind: Service, metadata: {name: v, namespace: n}, spec: {clusterIP: 10.0.0.8, ports: [*d]}}\n"
        "numbers: [0x1f, 1:30, 0o17, 1_000, .inf, ~, yes, 2026-01-01, !!str 12, '12', \"\\x41\"]\n")
    assert load_all(text) == list(yaml.safe_load_all(text))
    path = workdir / "anchored.yaml"
    path.write_text(text)
    proc = run("desired", "--objects", str(path), "--output", "json")
    assert proc.returncode == 0, proc.stderr
    vss = {(v["address"], v["port"]) for v in json.loads(proc.stdout)["virtual_servers"]}
    assert {("10.0.0.9", 80), ("10.0.0.9", 8080), ("10.0.0.8", 80)} <= vss
