"""Inside the VM: what reading IPVS needs, for docs/security.md and the DaemonSet.

- /proc/net/ip_vs is readable by an unprivileged user with no capability;
- the IPVS generic netlink family refuses a service dump without CAP_NET_ADMIN (the
  kernel marks its commands admin-only, reads included) and answers with it alone.
The host half (ipsets over NETLINK_NETFILTER) is tests/test_capabilities.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyroute2
import pytest

DUMP = """
from pyroute2 import IPVS
try:
    with IPVS() as ipvs:
        print("SERVICES", len(list(ipvs.service("dump"))))
except Exception as err:
    print("ERROR", getattr(err, "code", None), err)
"""
READ_PROC = "print('LINES', len(open('/proc/net/ip_vs').read().splitlines()))"


@pytest.fixture
def one_service():
    for module in ("ip_vs", "ip_vs_rr"):
        subprocess.run(["modprobe", module], check=True)
    subprocess.run(["ipvsadm", "-C"], check=True)
    subprocess.run(["ipvsadm", "-A", "-t", "10.96.0.10:53", "-s", "rr"], check=True)
    subprocess.run(["ipvsadm", "-a", "-t", "10.96.0.10:53", "-r", "10.244.1.5:53", "-m"], check=True)
    yield
    subprocess.run(["ipvsadm", "-C"], check=True)


def run_as(uid: int, caps: list[str], code: str) -> str:
    site = str(Path(pyroute2.__file__).resolve().parent.parent)
    cap_args = ["--bounding-set", "-all" + "".join(f",+{c}" for c in caps)]
    if caps and uid != 0:
        wanted = ",".join(f"+{c}" for c in caps)
        cap_args += ["--inh-caps", wanted, "--ambient-caps", wanted]
    out = subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *cap_args,
                          "env", f"PYTHONPATH={site}", "/usr/bin/python3", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_proc_net_ip_vs_needs_no_capability(one_service):
    assert run_as(65534, [], READ_PROC) == "LINES 5"


def test_ipvs_netlink_dump_needs_net_admin(one_service):
    assert run_as(65534, [], DUMP).startswith("ERROR 1 ")
    assert run_as(65534, ["net_admin"], DUMP) == "SERVICES 1"
    assert run_as(0, [], DUMP).startswith("ERROR 1 ")
    assert run_as(0, ["net_admin"], DUMP) == "SERVICES 1"
