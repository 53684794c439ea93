"""Inside the VM: scrapes and every offline command leave the IPVS table byte-for-byte unchanged.

The host half (ipsets, cgroup v1) is tests/test_readonly.py. Here the kernel has IPVS:
a table of every kind kube-proxy and kube-router program (TCP, UDP, SCTP, fwmark, IPv6,
persistent, weight-0 draining real servers) is written with `ipvsadm -R`, then the
exporter serves several scrapes and `desired`/`diff` run against a
file and against the live table. `ipvsadm -Sn` (rules) and `ipvsadm -L --timeout` (the
connection timeouts, also settable over netlink) must be the same bytes before and after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

RULES = """\
-A -t 10.96.0.10:53 -s rr
-a -t 10.96.0.10:53 -r 10.244.1.5:53 -m -w 1
-a -t 10.96.0.10:53 -r 10.244.2.7:53 -m -w 0
-A -u 10.96.0.10:53 -s rr
-a -u 10.96.0.10:53 -r 10.244.1.5:53 -m -w 1
-A -t 10.96.0.20:443 -s wrr -p 10800
-a -t 10.96.0.20:443 -r 10.244.1.9:8443 -m -w 1
-A --sctp-service 10.96.0.30:9000 -s rr
-a --sctp-service 10.96.0.30:9000 -r 10.244.3.3:9000 -m -w 1
-A -f 4097 -s rr
-a -f 4097 -r 10.244.1.5:0 -g -w 1
-A -t [fd00::20]:80 -s rr
-a -t [fd00::20]:80 -r [fd00:244::5]:8080 -m -w 1
"""

OBJECTS = {"apiVersion": "v1", "kind": "List", "items": [
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "kube-dns", "namespace": "kube-system", "uid": "u1", "resourceVersion": "1"},
     "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
              "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "kube-dns-abc", "namespace": "kube-system", "resourceVersion": "2",
                  "labels": {"kubernetes.io/service-name": "kube-dns"}},
     "addressType": "IPv4",
     "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}],
     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]},
]}


def ipvsadm(*args: str, stdin: str | None = None) -> bytes:
    if os.environ.get("KUBENODE_IN_VM") != "1":
        raise RuntimeError("refusing to program IPVS outside the kernel lane's VM")
    out = subprocess.run(["ipvsadm", *args], input=stdin.encode() if stdin else None, capture_output=True)
    assert out.returncode == 0, f"ipvsadm {' '.join(args)}: {out.stderr.decode().strip()}"
    return out.stdout


@pytest.fixture
def table():
    for module in ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh"):
        subprocess.run(["modprobe", module], check=True)
    ipvsadm("-C")
    ipvsadm("-R", stdin=RULES)
    yield
    ipvsadm("-C")


def ipvs_state() -> tuple[bytes, bytes]:
    return ipvsadm("-Sn"), ipvsadm("-L", "--timeout")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_a_few_times(tmp_path, proxy: str) -> str:
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "NODE_NAME": "vm"}
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}",
                             "--proxy", proxy], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import urllib.request

    try:
        body = b""
        deadline = time.monotonic() + 60
        while not body:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                for _ in range(5):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
                        body = resp.read()
            except OSError:
                assert time.monotonic() < deadline, "exporter did not answer in 60 s"
                time.sleep(0.5)
        return body.decode()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_scrapes_and_offline_commands_leave_ipvs_unchanged(table, tmp_path):
    before = ipvs_state()
    assert b"-f 4097" in before[0] and b"fd00::20" in before[0]
    # One exporter (Python starts slowly under emulation); the kube-router model runs offline below.
    bodies = [scrape_a_few_times(tmp_path, "kube-proxy")]
    objects, ip_vs = tmp_path / "objects.json", tmp_path / "ip_vs"
    objects.write_text(json.dumps(OBJECTS))
    with open("/proc/net/ip_vs", "rb") as fh:
        ip_vs.write_bytes(fh.read())
    for args in (["desired", "--objects", str(objects), "--output", "json"],
                 ["diff", "--objects", str(objects), "--ipvs", str(ip_vs), "--output", "json"],
                 ["diff", "--objects", str(objects), "--output", "text"],
                 ["diff", "--objects", str(objects), "--proxy", "kube-router"]):
        out = subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, timeout=120)
        assert b"Traceback" not in out.stderr, out.stderr.decode()[-2000:]
        assert out.returncode in (0, 1, 2), (args, out.returncode)
    assert ipvs_state() == before
    if any("kubenode_ipvs_virtual_servers" in body for body in bodies):
        assert all("kubenode_ipvs_virtual_servers 6.0" in body for body in bodies)


def test_the_comparison_sees_a_change(table):
    before = ipvs_state()
    ipvsadm("-e", "-t", "10.96.0.10:53", "-r", "10.244.2.7:53", "-m", "-w", "1")
    assert ipvs_state()[0] != before[0]
    ipvsadm("--set", "901", "121", "301")
    assert ipvs_state()[1] != before[1]
