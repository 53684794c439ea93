"""Netlink refused: the ipset collector goes down with the reason, the others keep serving.

The kernel checks CAP_NET_ADMIN of the process that opened the netlink socket,
so this runs in a separate process started without it (`setpriv` drops it from
the bounding and inheritable sets, so even root's exec does not regain it),
entered into a test namespace that does have sets. The process builds a Runner
with the real ipset collector next to another collector and prints its
samples as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ipset_ns import NetNS, require_tools

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, logging
from prometheus_client.core import GaugeMetricFamily
from exporter.cli import settings_from_args
from exporter.collector import Collector, Context, Runner
from exporter.collectors.ipset import IpsetCollector
from exporter.paths import Paths

class StillServing(Collector):
    name = "still_serving"
    def collect(self):
        yield GaugeMetricFamily("kubenode_test_still_serving", "a collector that needs no netlink", value=42)

logging.basicConfig(level=logging.ERROR)
settings = settings_from_args([])
ctx = Context(settings=settings, paths=Paths())
runner = Runner([IpsetCollector(ctx), StillServing(ctx)])
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
        assert got[("kubenode_collector_success", (("collector", "still_serving"),))] == 1.0
        assert got[("kubenode_test_still_serving", ())] == 42.0
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
