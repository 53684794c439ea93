"""Netlink refused: the ipset collector goes down with the reason, the others keep serving.

The kernel checks CAP_NET_ADMIN of the process that opened the netlink socket,
so this runs in a separate process started without it (`setpriv` drops it from
the bounding and inheritable sets, so even root's exec does not regain it),
entered into a test namespace that does have sets. One test builds a Runner
with the real ipset and process collectors in that process and prints its
samples as JSON; the other runs the exporter itself there and scrapes it over
HTTP on the namespace's loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import get, samples, value
from tests.ipset_ns import NetNS, require_tools

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, logging
from exporter.cli import settings_from_args
from exporter.collector import Context, Runner
from exporter.collectors.ipset import IpsetCollector
from exporter.collectors.process import ProcessCollector
from exporter.paths import Paths

logging.basicConfig(level=logging.ERROR)
settings = settings_from_args([])
ctx = Context(settings=settings, paths=Paths())
runner = Runner([IpsetCollector(ctx), ProcessCollector(ctx)])
out = {"samples": [[s.name, s.labels, s.value] for fam in runner.collect() for s in fam.samples],
       "errors": {name: outcome.error for name, outcome in runner.state()}}
print(json.dumps(out))
"""


def test_netlink_refused_marks_only_ipset_down():
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces)", pytrace=False)
    require_tools("nsenter", "setpriv")
    with NetNS("-perm") as ns:
        ns.ipset("create", "present", "hash:ip")
        drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
        proc = subprocess.run(["nsenter", f"--net={ns.path}", *drop, sys.executable, "-c", SCRIPT],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        got = {(name, tuple(sorted(labels.items()))): val for name, labels, val in result["samples"]}
        assert got[("kubenode_collector_success", (("collector", "ipset"),))] == 0.0
        assert got[("kubenode_collector_success", (("collector", "process"),))] == 1.0
        assert ("kubenode_process_up", (("component", "kubelet"),)) in got
        assert "CAP_NET_ADMIN" in result["errors"]["ipset"]
        assert "permission denied" in result["errors"]["ipset"]
        assert "CAP_NET_ADMIN" in proc.stderr  # logged once, one line, no traceback
        assert "Traceback" not in proc.stderr
        assert not [k for k in got if k[0].startswith("kubenode_ipset_")]
        # Same namespace, capability kept: the set is there, so the refusal above was the capability.
        with_cap = subprocess.run(["nsenter", f"--net={ns.path}", sys.executable, "-c", SCRIPT],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60)
        ok = json.loads(with_cap.stdout)
        assert ["kubenode_collector_success", {"collector": "ipset"}, 1.0] in ok["samples"]
        assert ["kubenode_ipset_sets", {}, 1.0] in ok["samples"]


def test_exporter_without_net_admin_serves_with_ipset_down():
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces)", pytrace=False)
    require_tools("nsenter", "setpriv", "ip")
    exporter = Path(sys.executable).parent / "kubenode-exporter"
    with NetNS("-http") as ns:
        ns.ipset("create", "present", "hash:ip")
        subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
        address = "127.0.0.1:9815"  # the namespace is ours alone: no port clash with anyone
        proc = subprocess.Popen(
            ["nsenter", f"--net={ns.path}", "setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
             "--", str(exporter), "--web.listen-address", address, "--no-collector.proxy"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            page = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status, _, body = ns.run(lambda: get(f"http://{address}/metrics", timeout=10))
                    page = body.decode()
                    break
                except OSError:
                    time.sleep(0.1)
            assert page is not None, "the exporter never answered"
            assert status == 200
            got = samples(page)
            assert value(got, "kubenode_collector_success", collector="ipset") == 0.0
            assert value(got, "kubenode_collector_success", collector="process") == 1.0
            assert value(got, "kubenode_ipset_sets") is None
        finally:
            proc.terminate()
            _, stderr = proc.communicate(timeout=20)
        assert "collector ipset failed: permission denied" in stderr
        assert "CAP_NET_ADMIN" in stderr and "Traceback" not in stderr
