"""`desired` and `diff` in kube-proxy's nftables mode, end to end, on real `nft -j` output.

The rules are loaded with `nft -f` into a network namespace of the test's own
(kube-proxy's TestOverallNFTablesRules fixture, tests/fixtures/nftables/overall-v1.31.nft,
and tests/nft_rulesets.py's generated rulesets in both families), then printed there by
`nft -j list ruleset` (or `nft -j list table ip kube-proxy` and `... ip6 kube-proxy`):
what an on-call engineer would copy off a node. The JSON reader must read exactly
what the netlink reader reads in the same namespace.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

from exporter.dataplane import VirtualServerKey
from exporter.readers.nftables import NftablesReader
from exporter.readers.nftables_json import read_rules_json
from tests.nft_rulesets import (NftNS, ServicePort, endpoints_changed, generated_services, generated_services_v6,
                                kube_objects, ruleset)
from tests.ipt_ns import BACKENDS, IptNS
from tests.test_offline import assert_bad_input, run, workdir  # noqa: F401 - workdir: the fixture

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "nftables"
NODE_NAME = "node-a"


@pytest.fixture
def ns():
    with NftNS() as namespace:
        yield namespace


def nft_json(ns: NftNS, *what: str) -> bytes:
    """`nft -j list ...` inside the namespace, as a user would save it."""
    done = subprocess.run(["nsenter", f"--net={ns.path}", "nft", "-j", "list", *(what or ("ruleset",))],
                          capture_output=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def objects_list(ports: list[ServicePort]) -> dict:
    """kubectl's List of the objects ``ports`` stand for, local endpoints on NODE_NAME."""
    return {"apiVersion": "v1", "kind": "List", "items": kube_objects(ports, NODE_NAME)}


@pytest.fixture
def cluster(ns, workdir):
    """The generated rules of both families loaded in ``ns``; the objects file they stand for."""
    v4, v6 = generated_services(), generated_services_v6()
    objects = workdir / "objects.json"
    objects.write_text(json.dumps(objects_list(v4 + v6)))
    ns.nft(ruleset(copy.deepcopy(v4), "ip"))
    ns.nft(ruleset(copy.deepcopy(v6), "ip6"))
    return str(objects), v4, v6


def diff(objects: str, *rules: bytes, workdir: Path, extra=()) -> subprocess.CompletedProcess:
    args = ["diff", "--objects", objects, "--node-name", NODE_NAME, "--output", "json", *extra]
    for i, raw in enumerate(rules):
        path = workdir / f"rules-{i}.json"
        path.write_bytes(raw)
        args += ["--rules", str(path)]
    return run(*args)


def nonempty(doc: dict) -> dict:
    return {kind: items for kind, items in doc.items() if items}


# --- the JSON reader against the netlink reader, same namespace -----------------------------


def assert_same_read(ns: NftNS, *json_outputs: bytes) -> None:
    live = ns.run(NftablesReader().read)
    read = read_rules_json([(f"rules-{i}.json", raw) for i, raw in enumerate(json_outputs)])
    assert live.unread == () and read.unread == ()
    assert read.table == live.table
    assert read.rejected == live.rejected
    assert read.firewalled == live.firewalled
    assert read.sizes == live.sizes


def test_json_reader_equals_netlink_on_kube_proxys_overall_rules(ns):
    ns.nft((FIXTURES / "overall-v1.31.nft").read_text())
    assert_same_read(ns, nft_json(ns))
    assert_same_read(ns, nft_json(ns, "table", "ip", "kube-proxy"))


@pytest.mark.parametrize("layout", ["newest", "v1.31"])
def test_json_reader_equals_netlink_on_generated_rules_both_families(ns, layout):
    ns.nft(ruleset(generated_services(), "ip", layout))
    ns.nft(ruleset(generated_services_v6(), "ip6", layout))
    # Another agent's table beside kube-proxy's changes nothing.
    ns.nft("add table inet other-agent\nadd chain inet other-agent c\nadd rule inet other-agent c drop\n")
    assert_same_read(ns, nft_json(ns))
    assert_same_read(ns, nft_json(ns, "table", "ip", "kube-proxy"), nft_json(ns, "table", "ip6", "kube-proxy"))
    read = read_rules_json([("r", nft_json(ns))])
    assert len(read.table) == 14 and set(read.sizes) == {"ip", "ip6"}


def test_json_not_kube_proxys_shape_is_unread_not_dropped(ns):
    ns.nft(ruleset(generated_services(), "ip"))
    doc = json.loads(nft_json(ns))
    svc1 = generated_services()[0].chain("service")
    for obj in doc["nftables"]:
        rule = obj.get("rule")
        if rule and rule["chain"] == svc1:
            for expr in rule["expr"]:
                if "dnat" in expr:
                    expr["dnat"] = {"addr": {"something": "new"}}
        elem_map = obj.get("map")
        if elem_map and elem_map["name"] == "service-nodeports":
            elem_map["elem"].append([{"concat": ["tcp", "not-a-port"]}, {"goto": {"target": "x"}}])
    read = read_rules_json([("r", json.dumps(doc).encode())])
    assert any("172.30.0.41:80" in line and "dnat" in line for line in read.unread), read.unread
    assert any("cannot decode" in line for line in read.unread)
    assert read.table and VirtualServerKey("TCP", "172.30.0.41", 80) not in read.table
    assert VirtualServerKey("TCP", "172.30.0.42", 80) in read.table


# --- desired in nftables mode -------------------------------------------------------------


def test_desired_nftables_json_shape(workdir):
    objects = workdir / "objects.json"
    objects.write_text(json.dumps(objects_list(generated_services() + generated_services_v6())))
    proc = run("desired", "--objects", str(objects), "--node-name", NODE_NAME, "--proxy-mode", "nftables",
               "--output", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_key = {(v["protocol"], v["address"], v["port"]): v for v in doc["virtual_servers"]}
    node_port = by_key[("TCP", None, 3002)]  # matched on every node-port address
    assert node_port["scheduler"] == "random" and node_port["persistent_timeout"] == 10800
    assert node_port["service"] == "ns5/svc5" and node_port["fwmark"] is None
    assert node_port["real_servers"] == [{"address": "10.180.0.3", "port": 80, "weight": 1},
                                         {"address": "10.180.0.4", "port": 80, "weight": 1}]
    assert by_key[("TCP", "fd00:10:96::41", 80)]["real_servers"][0] == {"address": "fd00:10::1", "port": 80,
                                                                         "weight": 1}
    assert ("TCP", "172.30.0.46", 80) not in by_key  # no endpoints: rejected, not mapped
    assert doc["rejected_virtual_servers"] == [
        {"protocol": "TCP", "address": None, "port": 3001, "fwmark": None, "service": "ns2/svc2", "verdict": "drop"},
        {"protocol": "TCP", "address": "1.2.3.4", "port": 80, "fwmark": None, "service": "ns2/svc2",
         "verdict": "drop"},
        {"protocol": "TCP", "address": "172.30.0.46", "port": 80, "fwmark": None, "service": "ns6/svc6",
         "verdict": "reject"},
        {"protocol": "TCP", "address": "192.168.99.22", "port": 80, "fwmark": None, "service": "ns2/svc2",
         "verdict": "drop"},
    ]
    text = run("desired", "--objects", str(objects), "--node-name", NODE_NAME, "--proxy-mode", "nftables")
    assert text.returncode == 0 and "TCP 172.30.0.46:80" in text.stdout and "reject" in text.stdout


# --- diff --rules: drift cases ---------------------------------------------------------------


def test_diff_rules_in_sync_is_exit_0(ns, cluster, workdir):
    objects, _, _ = cluster
    proc = diff(objects, nft_json(ns), workdir=workdir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout)
    assert "rejected_virtual_servers" in doc and nonempty(doc) == {}
    # One file per family, as `nft -j list table ip kube-proxy` and `... ip6` print them.
    proc = diff(objects, nft_json(ns, "table", "ip", "kube-proxy"), nft_json(ns, "table", "ip6", "kube-proxy"),
                workdir=workdir)
    assert proc.returncode == 0 and nonempty(json.loads(proc.stdout)) == {}
    text = run("diff", "--objects", objects, "--node-name", NODE_NAME, "--rules", str(workdir / "rules-0.json"),
               "--rules", str(workdir / "rules-1.json"))
    assert text.returncode == 0 and "rejected virtual servers: 0" in text.stdout and "no drift" in text.stdout


def test_diff_rules_element_removed_from_a_service_map(ns, cluster, workdir):
    objects, _, _ = cluster
    ns.nft("delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }\n"
           "delete element ip6 kube-proxy service-ips { fd00:10:96::41 . tcp . 80 }\n")
    proc = diff(objects, nft_json(ns), workdir=workdir)
    assert proc.returncode == 1, proc.stderr
    doc = nonempty(json.loads(proc.stdout))
    assert set(doc) == {"missing_virtual_servers"}
    assert [(i["address"], i["port"], i["service"]) for i in doc["missing_virtual_servers"]] == [
        ("172.30.0.41", 80, "ns1/svc1"), ("fd00:10:96::41", 80, "ns11/svc11")]


def test_diff_rules_endpoint_removed_from_a_service_chain(ns, cluster, workdir):
    objects, v4, _ = cluster
    svc1 = copy.deepcopy(v4[0])
    ns.nft(endpoints_changed(svc1, [("10.180.0.1", 80)]))  # 10.180.0.9 is still ready in its slice
    proc = diff(objects, nft_json(ns), workdir=workdir)
    assert proc.returncode == 1, proc.stderr
    doc = nonempty(json.loads(proc.stdout))
    assert set(doc) == {"missing_real_servers"}
    (item,) = doc["missing_real_servers"]
    assert (item["address"], item["real_address"], item["real_port"], item["weight"], item["service"]) == (
        "172.30.0.41", "10.180.0.9", 80, 1, "ns1/svc1")


def test_diff_rules_stale_endpoint_still_in_a_service_chain(ns, cluster, workdir):
    objects, v4, _ = cluster
    svc1 = copy.deepcopy(v4[0])
    ns.nft(endpoints_changed(svc1, [("10.180.0.1", 80), ("10.180.0.9", 80), ("10.180.0.66", 80)]))
    proc = diff(objects, nft_json(ns), workdir=workdir)
    assert proc.returncode == 1
    (item,) = json.loads(proc.stdout)["stale_real_servers"]
    assert (item["address"], item["real_address"]) == ("172.30.0.41", "10.180.0.66")


def test_diff_rules_service_left_in_the_no_endpoint_map_with_ready_endpoints(ns, cluster, workdir):
    objects, _, _ = cluster
    ns.nft('add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" '
           ': goto reject-chain }\n'
           'add element ip6 kube-proxy no-endpoint-services { fd00:10:96::41 . tcp . 80 : drop }\n')
    proc = diff(objects, nft_json(ns), workdir=workdir)
    assert proc.returncode == 1, proc.stderr
    doc = nonempty(json.loads(proc.stdout))
    assert set(doc) == {"rejected_virtual_servers"}
    assert [(i["address"], i["port"], i["service"], i["verdict"], i["real_servers"])
            for i in doc["rejected_virtual_servers"]] == [
        ("172.30.0.41", 80, "ns1/svc1", "reject", 2), ("fd00:10:96::41", 80, "ns11/svc11", "drop", 2)]
    text = run("diff", "--objects", objects, "--node-name", NODE_NAME, "--rules", str(workdir / "rules-0.json"))
    assert text.returncode == 1
    assert "rejected virtual servers: 2" in text.stdout and "TCP 172.30.0.41:80" in text.stdout


def test_diff_rules_a_service_without_endpoints_that_rejects_is_not_drift(ns, cluster, workdir):
    """ns6/svc6 has no endpoints and ns2/svc2 none on this node (Local): their verdicts are kube-proxy's own."""
    objects, _, _ = cluster
    read = read_rules_json([("r", nft_json(ns))])
    assert read.rejected[VirtualServerKey("TCP", "172.30.0.46", 80)] == "reject"
    assert read.rejected[VirtualServerKey("TCP", "1.2.3.4", 80)] == "drop"
    assert diff(objects, nft_json(ns), workdir=workdir).returncode == 0


def test_diff_rules_flushed_table_is_drift(ns, cluster, workdir):
    objects, _, _ = cluster
    ns.nft("flush table ip kube-proxy\n")  # the firewalld case: chains emptied, the maps' elements stay
    proc = diff(objects, nft_json(ns), workdir=workdir)
    assert proc.returncode == 1, proc.stderr
    doc = nonempty(json.loads(proc.stdout))
    assert set(doc) == {"missing_real_servers", "mismatched_virtual_servers", "missing_virtual_servers"}
    # The frontends kube-proxy rejects or drops (no usable endpoint) lost their verdict
    # with the chains: absent from the rules, so missing, each with the verdict it wants.
    assert doc["missing_virtual_servers"] and all(
        i["verdict"] in ("reject", "drop") and i["real_servers"] == 0 and ":" not in i["address"]
        for i in doc["missing_virtual_servers"])
    # svc5's affinity rules went with its chains: stickiness lost on each of its frontends.
    assert {i["service"] for i in doc["mismatched_virtual_servers"]} == {"ns5/svc5"}
    missing = {(i["address"], i["port"], i["real_address"]) for i in doc["missing_real_servers"]}
    assert {("172.30.0.41", 80, "10.180.0.1"), ("172.30.0.41", 80, "10.180.0.9")} <= missing
    assert not any(":" in real for _, _, real in missing)  # the ip6 table is whole


def test_diff_live_in_the_namespace_finds_nftables_mode(ns, cluster, workdir):
    """No --ipvs, no --rules: the host's own rules, mode found by the tables present."""
    objects, _, _ = cluster
    args = ("diff", "--objects", objects, "--node-name", NODE_NAME, "--output", "json")
    proc = run(*args, netns=ns)
    assert proc.returncode == 0, proc.stderr
    assert nonempty(json.loads(proc.stdout)) == {}
    assert "found the kube-proxy nftables table)" in proc.stderr
    ns.nft("delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }\n")
    proc = run(*args, netns=ns)
    assert proc.returncode == 1 and len(json.loads(proc.stdout)["missing_virtual_servers"]) == 1


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture
def objects_file(workdir):
    path = workdir / "objects.json"
    path.write_text(json.dumps(objects_list(generated_services())))
    return str(path)


@pytest.mark.parametrize("content,words", [
    (b"hello, world\n", ["not JSON"]),
    (b'{"apiVersion": "v1", "kind": "List", "items": []}', ["not `nft -j` output"]),
    (b"[1, 2, 3]", ["not `nft -j` output"]),
    (b"", ["not JSON"]),
])
def test_diff_rules_not_nft_json_is_exit_2(workdir, objects_file, content, words):
    assert_bad_input(diff(objects_file, content, workdir=workdir), *words)


def test_diff_rules_truncated_and_without_kube_proxys_tables_are_exit_2(ns, workdir, objects_file):
    ns.nft(ruleset(generated_services(), "ip"))
    whole = nft_json(ns)
    assert_bad_input(diff(objects_file, whole[:len(whole) // 2], workdir=workdir), "not JSON", "cut short")
    ns.nft("delete table ip kube-proxy\nadd table inet other-agent\n")
    assert_bad_input(diff(objects_file, nft_json(ns), workdir=workdir), "no kube-proxy table")


def test_diff_rules_same_family_twice_is_exit_2(ns, workdir, objects_file):
    ns.nft(ruleset(generated_services(), "ip"))
    whole = nft_json(ns)
    assert_bad_input(diff(objects_file, whole, whole, workdir=workdir), "table ip kube-proxy is in both")


def test_diff_rules_half_programmed_table_is_exit_2(ns, workdir, objects_file):
    ns.nft('add table ip kube-proxy { comment "rules for kube-proxy" ; }\n'
           "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n")
    assert_bad_input(diff(objects_file, nft_json(ns), workdir=workdir), "ip kube-proxy", "service-nodeports",
                     "missing")
    # The other family whole beside it: still not the node's whole rules.
    ns.nft(ruleset(generated_services_v6(), "ip6"))
    assert_bad_input(diff(objects_file, nft_json(ns), workdir=workdir), "not read whole", "service-nodeports",
                     "nothing compared")


def test_diff_rules_not_read_whole_is_exit_2(ns, workdir, objects_file):
    ns.nft(ruleset(generated_services(), "ip"))
    doc = json.loads(nft_json(ns))
    for obj in doc["nftables"]:
        if obj.get("map", {}).get("name") == "service-ips":
            obj["map"]["elem"][0][1] = {"queue": {"num": 1}}
    assert_bad_input(diff(objects_file, json.dumps(doc).encode(), workdir=workdir), "not read whole",
                     "nothing compared")


def test_iptables_rules_and_mode_conflicts_are_exit_2(workdir, objects_file):
    saved = (b"# Generated by iptables-save v1.8.9 on Sun Dec  6 10:00:00 2026\n*nat\n:KUBE-SERVICES - [0:0]\n"
             b"COMMIT\n")
    assert_bad_input(diff(objects_file, b"{}", workdir=workdir, extra=("--proxy-mode", "iptables")),
                     "not iptables-save output")
    with IptNS() as empty:  # no kube-proxy rules in either backend: said, not every frontend missing
        assert_bad_input(run("diff", "--objects", objects_file, "--proxy-mode", "iptables", netns=empty),
                         "no kube-proxy iptables rules")
    assert_bad_input(diff(objects_file, saved, workdir=workdir, extra=("--proxy-mode", "nftables")), "not JSON")
    assert_bad_input(diff(objects_file, b"{}", workdir=workdir, extra=("--proxy-mode", "ipvs")), "--ipvs")
    ipvs = workdir / "ip_vs"
    ipvs.write_text("IP Virtual Server version 1.2.1 (size=4096)\n")
    assert_bad_input(run("diff", "--objects", objects_file, "--ipvs", str(ipvs), "--proxy-mode", "nftables"),
                     "--rules")
    assert_bad_input(run("desired", "--objects", objects_file, "--proxy", "kube-router", "--proxy-mode",
                         "nftables"), "kube-router")


# --- iptables mode: `iptables-save` / `ip6tables-save` text of either backend ----------------

IPT_FIXTURES = ROOT / "tests" / "fixtures" / "iptables"
OVERALL_OBJECTS = str(IPT_FIXTURES / "overall-objects.yaml")
DUAL_STACK_OBJECTS = str(IPT_FIXTURES / "dual-stack-objects.yaml")


@pytest.fixture(params=BACKENDS)
def ipt(request):
    """kube-proxy's TestOverallIPTablesRules rules loaded by one backend in a namespace of the test's own."""
    with IptNS(request.param) as namespace:
        namespace.restore((IPT_FIXTURES / "overall.rules").read_text())
        yield namespace


def ipt_diff(objects: str, *saves: str, workdir: Path, node: str = "test-node") -> subprocess.CompletedProcess:
    args = ["diff", "--objects", objects, "--node-name", node, "--output", "json"]
    for i, text in enumerate(saves):
        path = workdir / f"save-{i}.rules"
        path.write_text(text)
        args += ["--rules", str(path)]
    return run(*args)


def drift_of(proc: subprocess.CompletedProcess) -> dict:
    """{kind: ['PROTO address:port[ -> real:port]']} of a diff's JSON, empty kinds left out."""
    out = {}
    for kind, items in json.loads(proc.stdout).items():
        for item in items:
            text = f"{item['protocol']} {item['address']}:{item['port']}"
            if "real_address" in item:
                text += f" -> {item['real_address']}:{item['real_port']}"
            out.setdefault(kind, []).append(text)
    return {kind: sorted(items) for kind, items in out.items()}


def test_diff_iptables_save_in_sync_is_exit_0(ipt, workdir):
    done = ipt_diff(OVERALL_OBJECTS, ipt.save(), workdir=workdir)
    assert (done.returncode, drift_of(done)) == (0, {}), done.stderr


def test_diff_live_reads_this_hosts_iptables_rules_in_either_backend(ipt):
    """No --rules: the rules of the backend that holds kube-proxy's, read as the exporter reads
    them (nf_tables netlink, or the x_tables blob), the mode found by the tables present."""
    args = ("diff", "--objects", OVERALL_OBJECTS, "--node-name", "test-node", "--output", "json")
    done = run(*args, netns=ipt)
    assert (done.returncode, drift_of(done)) == (0, {}), done.stderr
    assert "iptables" in done.stderr
    ipt.iptables("-t", "nat", "-D", "KUBE-SERVICES", "1")
    done = run(*args, netns=ipt)
    assert (done.returncode, drift_of(done)) == (1, {"missing_virtual_servers": ["TCP 172.30.0.41:80"]}), done.stderr


def test_diff_iptables_kube_sep_jump_deleted(ipt, workdir):
    ipt.iptables("-t", "nat", "-D", "KUBE-SVC-4SW47YFZTEDKD3PK", "3")
    done = ipt_diff(OVERALL_OBJECTS, ipt.save(), workdir=workdir)
    assert done.returncode == 1
    assert drift_of(done) == {"missing_real_servers": ["TCP 172.30.0.44:80 -> 10.180.0.5:80",
                                                       "TCP 192.168.99.33:80 -> 10.180.0.5:80"]}
    assert {i["service"] for i in json.loads(done.stdout)["missing_real_servers"]} == {"ns4/svc4"}


def test_diff_iptables_kube_services_rule_deleted(ipt, workdir):
    ipt.iptables("-t", "nat", "-D", "KUBE-SERVICES", "1")
    done = ipt_diff(OVERALL_OBJECTS, ipt.save(), workdir=workdir)
    assert (done.returncode, drift_of(done)) == (1, {"missing_virtual_servers": ["TCP 172.30.0.41:80"]})


def test_diff_iptables_stale_kube_sep_still_jumped_to(ipt, workdir):
    ipt.iptables("-t", "nat", "-N", "KUBE-SEP-STALESTALESTALE1")
    ipt.iptables("-t", "nat", "-A", "KUBE-SEP-STALESTALESTALE1", "-p", "tcp", "-j", "DNAT",
                 "--to-destination", "10.180.0.99:80")
    ipt.iptables("-t", "nat", "-I", "KUBE-SVC-XPGD46QRK7WJZT7O", "2", "-m", "statistic", "--mode", "random",
                 "--probability", "0.5", "-j", "KUBE-SEP-STALESTALESTALE1")
    done = ipt_diff(OVERALL_OBJECTS, ipt.save(), workdir=workdir)
    assert (done.returncode, drift_of(done)) == (1, {"stale_real_servers": ["TCP 172.30.0.41:80 -> 10.180.0.99:80"]})


def test_diff_iptables_reject_left_for_a_service_with_ready_endpoints(ipt, workdir):
    ipt.iptables("-t", "filter", "-I", "KUBE-SERVICES", "-p", "tcp", "-d", "172.30.0.41", "--dport", "80",
                 "-j", "REJECT")
    done = ipt_diff(OVERALL_OBJECTS, ipt.save(), workdir=workdir)
    assert (done.returncode, drift_of(done)) == (1, {"rejected_virtual_servers": ["TCP 172.30.0.41:80"]})
    assert json.loads(done.stdout)["rejected_virtual_servers"][0]["service"] == "ns1/svc1"


def test_diff_iptables_nat_table_flushed_is_every_frontend_missing(ipt, workdir):
    ipt.iptables("-t", "nat", "-F")
    done = ipt_diff(OVERALL_OBJECTS, ipt.save(), workdir=workdir)
    assert done.returncode == 1
    assert drift_of(done) == {"missing_virtual_servers": [
        "TCP 1.2.3.4:80", "TCP 172.30.0.41:80", "TCP 172.30.0.42:80", "TCP 172.30.0.43:80", "TCP 172.30.0.44:80",
        "TCP 172.30.0.45:80", "TCP 192.168.99.22:80", "TCP 192.168.99.33:80", "TCP 5.6.7.8:80", "TCP None:3001",
        "TCP None:3002", "TCP None:3003"]}


def test_diff_iptables_both_families_one_file_each(workdir):
    with IptNS() as ns:
        ns.restore((IPT_FIXTURES / "nodeport-addresses.rules").read_text())
        ns.restore((IPT_FIXTURES / "localhost-nodeports-ipv6.rules").read_text().replace("30001", "3001"), family=6)
        v4, v6 = ns.save(4), ns.save(6)
        done = ipt_diff(DUAL_STACK_OBJECTS, v4, v6, workdir=workdir, node="test-hostname")
        assert (done.returncode, drift_of(done)) == (0, {}), done.stderr
        # Both saves in one file read the same.
        assert ipt_diff(DUAL_STACK_OBJECTS, v4 + v6, workdir=workdir, node="test-hostname").returncode == 0
        ns.iptables("-t", "nat", "-D", "KUBE-SVL-XPGD46QRK7WJZT7O", "1", family=6)  # ff06::c2, the local one
        done = ipt_diff(DUAL_STACK_OBJECTS, v4, ns.save(6), workdir=workdir, node="test-hostname")
        assert (done.returncode, drift_of(done)) == (1, {"missing_real_servers": ["TCP None:3001 -> ff06::c2:80"]})
        # One family's file alone: the other family's frontends are missing, not an error.
        done = ipt_diff(DUAL_STACK_OBJECTS, v4, workdir=workdir, node="test-hostname")
        assert done.returncode == 1 and drift_of(done)["missing_virtual_servers"] == ["TCP fd00:ab34::20:80"]
        assert_bad_input(ipt_diff(DUAL_STACK_OBJECTS, v4, v4, workdir=workdir), "IPv4 rules are in both")


@pytest.mark.parametrize("text, words", [
    ("# Generated by iptables-save v1.8.9\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\n",
     ["not iptables-save output", "has no COMMIT"]),
    ("# Generated by iptables-save v1.8.9\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n"
     "COMMIT\n", ["no kube-proxy iptables rules"]),
    ("# Generated by iptables-save v1.8.9\n*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n",
     ["the IPv4 rules have no filter table", "not `-t TABLE`"]),
    ("# Generated by iptables-save v1.8.9\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n"
     "-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA\n"
     "-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-GONE\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
     ["not read whole", "TCP 172.30.0.41:80", "chain KUBE-SEP-GONE is missing"]),
    ("# Generated by iptables-save v1.8.9\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n"
     ":KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]\n"
     "-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA\n"
     "-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-AAAAAAAAAAAAAAAA\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
     ["not read whole", "KUBE-SEP-AAAAAAAAAAAAAAAA has no DNAT", "nothing compared"]),
])
def test_diff_iptables_save_not_whole_is_exit_2(workdir, text, words):
    assert_bad_input(ipt_diff(OVERALL_OBJECTS, text, workdir=workdir), *words)
