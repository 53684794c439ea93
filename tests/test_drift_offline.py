"""`desired` and `diff` without --objects: the live cluster listed through a kubeconfig (the API stand-in)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from exporter.dataplane import VirtualServerKey
from exporter.kube.listing import list_objects
from exporter.readers.ipvs import parse_ip_vs
from tests import apiserver as api_objects
from tests.apiserver import FakeApiServer
from tests.drift_rig import NAMESPACE, NODE, NODE_IP, add_service, cluster_ip
from tests.ipvs_text import format_ip_vs
from tests.kube_builders import vs as build_vs
from tests.test_offline import run


@pytest.fixture
def cluster(tmp_path):
    server = FakeApiServer().start()
    try:
        server.create("nodes", api_objects.node(NODE, zone="zone-a", addresses=(NODE_IP,)))
        for i in range(1, 6):
            add_service(server, i, endpoints=i)
        node_port = api_objects.service(NAMESPACE, "np", "10.96.7.7", type="NodePort")
        node_port["spec"]["ports"][0]["nodePort"] = 30080
        server.create("services", node_port)
        server.create("endpointslices", api_objects.endpoint_slice(NAMESPACE, "np-x", "np", ["10.244.7.1"]))
        server.create("endpointslices", {"metadata": {"namespace": NAMESPACE, "name": "broken"},
                                         "addressType": "IPv4", "endpoints": "not a list"})
        yield server, server.write_kubeconfig(str(tmp_path / f"kubeconfig-drift-offline-{os.getpid()}"))
    finally:
        server.stop()


def as_list_file(server, path) -> str:
    """The stand-in's objects as `kubectl get services,endpointslices,nodes -A -o yaml` prints them."""
    items = [obj for resource in ("services", "endpointslices", "nodes")
             for obj in server.objects[resource].values()]
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    return str(path)


def test_list_objects_pages_through_everything_and_skips_the_malformed(cluster):
    server, kubeconfig = cluster
    objects = list_objects(kubeconfig, NODE, page_size=2)
    assert len(objects.services) == 6 and len(objects.slices) == 6 and list(objects.nodes) == [NODE]
    assert len(objects.errors) == 1 and "broken" in objects.errors[0]
    continued = [r for r in server.requests if r.kind == "list" and "continue" in r.params]
    assert continued, "paged with continue tokens"


def test_desired_from_the_cluster_equals_desired_from_the_same_objects_in_a_file(cluster, tmp_path):
    server, kubeconfig = cluster
    common = ("--node-name", NODE, "--node-ip", NODE_IP, "--output", "json")
    live = run("desired", "--kubeconfig", kubeconfig, *common)
    assert live.returncode == 0, live.stderr
    from_file = run("desired", "--objects", as_list_file(server, tmp_path / "objects.yaml"), *common)
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(live.stdout) == json.loads(from_file.stdout)
    servers = json.loads(live.stdout)["virtual_servers"]
    assert {(v["address"], v["port"]) for v in servers} >= {(cluster_ip(1), 80), (NODE_IP, 30080)}


def test_diff_against_the_cluster_exit_status(cluster, tmp_path):
    server, kubeconfig = cluster
    common = ("--kubeconfig", kubeconfig, "--node-name", NODE, "--node-ip", NODE_IP, "--output", "json")
    desired = json.loads(run("desired", *common).stdout)["virtual_servers"]
    # The IPVS table the proxy would have programmed, as /proc prints it.
    table = {}
    for v in desired:
        built = build_vs(v["protocol"], v["address"], v["port"],
                         [(r["address"], r["port"]) for r in v["real_servers"]], scheduler=v["scheduler"])
        table[built.key] = built
    good = tmp_path / "ip_vs"
    good.write_text(format_ip_vs(table, 250))
    assert len(parse_ip_vs(good.read_text(), 250)) == len(desired)
    proc = run("diff", "--ipvs", str(good), *common)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    del table[VirtualServerKey("TCP", cluster_ip(3), 80)]
    good.write_text(format_ip_vs(table, 250))
    proc = run("diff", "--ipvs", str(good), *common)
    assert proc.returncode == 1
    missing = json.loads(proc.stdout)["missing_virtual_servers"]
    assert [(m["address"], m["service"]) for m in missing] == [(cluster_ip(3), f"{NAMESPACE}/svc-3")]


def test_no_access_to_the_cluster_is_one_line_exit_2(tmp_path):
    proc = run("diff", "--kubeconfig", str(tmp_path / "missing"), "--ipvs", "/dev/null")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cluster" in proc.stderr
