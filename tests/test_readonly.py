"""The exporter never writes to ipsets or cgroups, proved on the real kernel.

In a network namespace of this test's own (ipsets of several types, as kube-proxy and
kube-router make them) and a memory cgroup subtree of its own (live children and dying
ones), the exporter serves several scrapes with every collector enabled and the subtree
named in --memcg.paths, and every offline command runs (desired, diff against a file and
against the live table). Before and after:

- `ipset save` of the namespace, and `ipset list -t` (headers: references, memory), are
  byte-for-byte the same;
- the cgroup subtree has the same directories, and every control file anyone can write
  (limits, cgroup.procs, tasks, flags, resettable counters) has the same bytes. Read-only
  statistics (memory.usage_in_bytes, memory.stat, ...) are left out: the kernel updates them
  on its own (lazy uncharging), and nothing can write them.

The IPVS half runs in the VM lane: tests/kernel/test_readonly_ipvs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

MEMCG_ROOT = Path("/sys/fs/cgroup/memory")

OBJECTS = {
    "apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "default", "uid": "u1", "resourceVersion": "1"},
         "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-abc", "namespace": "default", "resourceVersion": "2",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "nodeName": "node-a"}],
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
    ]}

# /proc/net/ip_vs as the kernel prints it: 10.96.0.20:80 rr -> 10.244.1.5:8080.
IP_VS = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600014:0050 rr
  -> 0AF40105:1F90      Masq    1      0          0
"""

IPSETS = [
    ("KUBE-CLUSTER-IP", "hash:ip,port", ["10.96.0.20,tcp:80", "10.96.0.10,udp:53"]),
    ("KUBE-LOOP-BACK", "hash:ip,port,ip", ["10.244.1.5,tcp:8080,10.244.1.5"]),
    ("KUBE-NODE-PORT-TCP", "bitmap:port range 0-65535", ["30080"]),
    ("KUBE-6-CLUSTER-IP", "hash:ip,port family inet6", ["fd00::20,tcp:80"]),
    ("kube-router-pod-subnets", "hash:net", ["10.244.0.0/16"]),
    ("KUBE-SRC-NEARLYFULL", "hash:ip maxelem 8 counters comment", [f"10.1.0.{i}" for i in range(1, 8)]),
]


def need(*tools: str) -> None:
    for tool in tools:
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed; tests/test_readonly.py needs it")


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, check=check, timeout=120, **kw)


@pytest.fixture(scope="module")
def netns():
    need("ip", "ipset", "nsenter")
    if os.geteuid() != 0:
        pytest.fail("tests/test_readonly.py needs root (network namespace, cgroups)")
    name = f"deploy-ro-{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        for set_name, kind, members in IPSETS:
            sh("ip", "netns", "exec", name, "ipset", "create", set_name, *kind.split())
            for member in members:
                sh("ip", "netns", "exec", name, "ipset", "add", set_name, member)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture(scope="module")
def memcg():
    if not (MEMCG_ROOT / "memory.stat").exists():
        pytest.fail(f"no cgroup v1 memory hierarchy at {MEMCG_ROOT} (cgroup v2 is covered in the VM lane)")
    top = MEMCG_ROOT / f"deploy-ro-{os.getpid()}"
    try:
        for child in ("live-a", "live-b/nested"):
            (top / child).mkdir(parents=True)
        (top / "live-a" / "memory.limit_in_bytes").write_text("268435456")
        # Dying cgroups: a short process charges page cache to each, then the directory goes.
        for i in range(10):
            dying = top / f"dying-{i}"
            dying.mkdir()
            scratch = f"/tmp/deploy-ro-{os.getpid()}-{i}"
            subprocess.run(["sh", "-c", f'echo $$ > {dying}/cgroup.procs && '
                            f'dd if=/dev/zero of={scratch} bs=64k count=8 status=none'], check=True)
            os.unlink(scratch)
            dying.rmdir()
        yield top
    finally:
        for path in sorted(top.rglob("*"), key=lambda p: -len(p.parts)) if top.exists() else []:
            if path.is_dir():
                path.rmdir()
        if top.exists():
            top.rmdir()


def ipset_state(netns: str) -> tuple[bytes, bytes]:
    save = sh("ip", "netns", "exec", netns, "ipset", "save").stdout
    headers = sh("ip", "netns", "exec", netns, "ipset", "list", "-t").stdout
    return save, headers


def cgroup_state(top: Path) -> dict[str, bytes | str]:
    """Directories, and the bytes of every writable control file, under ``top``."""
    state: dict[str, bytes | str] = {}
    for path in sorted([top, *top.rglob("*")]):
        rel = str(path.relative_to(top))
        if path.is_dir():
            state[rel + "/"] = "dir"
            continue
        mode = path.stat().st_mode
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            continue  # kernel statistics: read-only to everyone
        if not mode & stat.S_IRUSR:
            state[rel] = "write-only"
            continue
        try:
            state[rel] = path.read_bytes()
        except OSError as err:  # e.g. memory.force_empty, cgroup.event_control: not readable
            state[rel] = f"unreadable: {err.errno}"
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRAPER = """
import sys, urllib.request
port, count = int(sys.argv[1]), int(sys.argv[2])
for _ in range(count):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        body = resp.read()
sys.stdout.buffer.write(body)
"""


def in_netns(netns: str, *cmd: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", *cmd]


def run_everything(netns: str, top: Path, tmp_path: Path) -> dict[str, subprocess.CompletedProcess]:
    """Several scrapes of the exporter, then every offline command; all inside ``netns``."""
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig"), "NODE_NAME": "node-a"}
    port = free_port()
    relative = str(top.relative_to(MEMCG_ROOT))
    exporter = subprocess.Popen(
        in_netns(netns, sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}",
                 "--memcg.paths", relative, "--memcg.paths", f"{relative}/live-a", "--node-ip", "192.0.2.10"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            assert exporter.poll() is None, f"exporter exited {exporter.returncode}: {exporter.stderr.read()}"
            scrape = subprocess.run(in_netns(netns, sys.executable, "-c", SCRAPER, str(port), "5"),
                                    capture_output=True, timeout=120)
            if scrape.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert scrape.returncode == 0, scrape.stderr.decode()[-2000:]
        results["scrapes"] = scrape
    finally:
        exporter.terminate()
        exporter.wait(timeout=15)
    objects, ipvs = tmp_path / "objects.json", tmp_path / "ip_vs"
    objects.write_text(json.dumps(OBJECTS))
    ipvs.write_text(IP_VS)
    offline = {
        "desired-json": ["desired", "--objects", str(objects), "--node-name", "node-a", "--output", "json"],
        "desired-text": ["desired", "--objects", str(objects), "--node-ip", "192.0.2.10", "--output", "text"],
        "diff-file": ["diff", "--objects", str(objects), "--ipvs", str(ipvs), "--output", "json"],
        "diff-live": ["diff", "--objects", str(objects), "--node-name", "node-a", "--proxy", "kube-router"],
    }
    for name, args in offline.items():
        results[name] = subprocess.run(in_netns(netns, sys.executable, "-m", "exporter", *args),
                                       env=env, capture_output=True, timeout=120)
    return results


def test_scrapes_and_offline_commands_leave_ipsets_and_cgroups_byte_for_byte_unchanged(netns, memcg, tmp_path):
    ipsets_before, cgroups_before = ipset_state(netns), cgroup_state(memcg)
    assert b"KUBE-CLUSTER-IP" in ipsets_before[0] and "live-b/nested/" in cgroups_before
    assert "live-a/memory.limit_in_bytes" in cgroups_before and "live-a/cgroup.procs" in cgroups_before

    results = run_everything(netns, memcg, tmp_path)

    assert ipset_state(netns) == ipsets_before
    assert cgroup_state(memcg) == cgroups_before
    for name, result in results.items():
        assert b"Traceback" not in result.stderr, f"{name}: {result.stderr.decode()[-2000:]}"
        if name != "scrapes":
            assert result.returncode in (0, 1, 2), (name, result.returncode)
    # Where a collector is built in, it really read this test's tables (not an empty view).
    from tests.helpers import samples, value

    scraped = samples(results["scrapes"].stdout.decode())
    names = {name for name, _ in scraped}
    if "kubenode_ipset_sets" in names:
        assert value(scraped, "kubenode_collector_success", collector="ipset") == 1
        assert value(scraped, "kubenode_ipset_sets") == len(IPSETS)
        assert value(scraped, "kubenode_ipset_entries", set="KUBE-SRC-NEARLYFULL", type="hash:ip") == 7
    if "kubenode_memcg_cgroups" in names:
        assert value(scraped, "kubenode_collector_success", collector="memcg") == 1
        assert value(scraped, "kubenode_memcg_cgroups", state="live") >= 3


def test_the_comparison_sees_a_change(netns, memcg):
    # The same snapshots must catch a write: one ipset entry, one cgroup limit, one new cgroup.
    before_sets, before_cgroups = ipset_state(netns), cgroup_state(memcg)
    sh("ip", "netns", "exec", netns, "ipset", "add", "KUBE-CLUSTER-IP", "10.96.0.99,tcp:443")
    try:
        assert ipset_state(netns)[0] != before_sets[0]
    finally:
        sh("ip", "netns", "exec", netns, "ipset", "del", "KUBE-CLUSTER-IP", "10.96.0.99,tcp:443")
    assert ipset_state(netns) == before_sets
    limit = memcg / "live-a" / "memory.limit_in_bytes"
    old = limit.read_text()
    limit.write_text("134217728")
    try:
        assert cgroup_state(memcg) != before_cgroups
    finally:
        limit.write_text(old.strip())
    (memcg / "extra").mkdir()
    try:
        assert cgroup_state(memcg) != before_cgroups
    finally:
        (memcg / "extra").rmdir()
    assert cgroup_state(memcg) == before_cgroups
