"""Which capability the DaemonSet needs, proved on the real kernel.

Listing ipset headers over NETLINK_NETFILTER is refused without CAP_NET_ADMIN
(nfnetlink checks it for every message, reads included), so the DaemonSet adds
NET_ADMIN and nothing else. Each case runs the exporter's own ipset reader
(``exporter.readers.ipset.read_headers``, a header-only dump) in a network
namespace of this test's own, with an exact capability set made by setpriv:

- uid 65534 with no capability: refused;
- uid 65534 with only NET_ADMIN (ambient): lists the sets;
- uid 65534 with NET_RAW or SYS_ADMIN instead: refused (nothing else stands in);
- uid 0 with every capability dropped but NET_ADMIN (the DaemonSet's setting): lists them;
- uid 0 with every capability dropped: refused (root alone is not enough).

The nftables-mode reads (``exporter.readers.nftables.NftablesReader``: the ruleset
generation, kube-proxy's tables, chains, rules, sets and elements) are the same kind of
NETLINK_NETFILTER dump: the same capability, and only it, lets them through.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

LIST_SETS = textwrap.dedent("""
    from exporter.readers.ipset import IpsetReadError, read_headers
    try:
        print("SETS", ",".join(sorted(h.name for h in read_headers())))
    except IpsetReadError as err:
        print("ERROR", err.errno, err)
""")
READ_KUBE_PROXY_RULES = textwrap.dedent("""
    from exporter.readers.nftables import NftablesReader
    from exporter.readers.nftables_netlink import NftReadError
    try:
        read = NftablesReader().read()
        print("FRONTENDS", len(read.table), "REJECTED", len(read.rejected), "UNREAD", len(read.unread))
    except (NftReadError, OSError) as err:
        print("ERROR", err)
""")
REPO = Path(__file__).resolve().parents[1]
NFT_FIXTURE = REPO / "tests" / "fixtures" / "nftables" / "overall-v1.31.nft"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed (util-linux / iproute2 / ipset); this test needs it")
    return path


@pytest.fixture(scope="module")
def netns_with_sets():
    need("ip"), need("ipset"), need("nsenter"), need("setpriv")
    if os.geteuid() != 0:
        pytest.fail("tests/test_capabilities.py needs root to make a network namespace")
    name = f"deploy-caps-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for set_name in ("KUBE-CLUSTER-IP", "kube-router-svip"):
            subprocess.run(["ip", "netns", "exec", name, "ipset", "create", set_name, "hash:ip,port",
                            "maxelem", "1024"], check=True)
        # kube-proxy's nftables rules too (its TestOverallNFTablesRules), for the nftables-mode reads.
        subprocess.run(["ip", "netns", "exec", name, need("nft"), "-f", str(NFT_FIXTURE)], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _interpreter() -> str:
    # The venv's interpreter may live under /root, which uid 65534 cannot enter: use the
    # system Python of the same minor version with the checkout on the path (the ipset
    # reader needs only the standard library).
    for candidate in ("/usr/bin/python3", sys.executable):
        out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == str(tuple(sys.version_info[:2])):
            return candidate
    pytest.fail("no Python 3.11 interpreter that uid 65534 can run (/usr/bin/python3)")


def list_as(netns: str, uid: int, caps: list[str], script: str = LIST_SETS) -> str:
    cap_args = ["--bounding-set", "-all" + "".join(f",+{c}" for c in caps)]
    if caps and uid != 0:
        wanted = ",".join(f"+{c}" for c in caps)
        cap_args += ["--inh-caps", wanted, "--ambient-caps", wanted]
    cmd = ["nsenter", f"--net=/run/netns/{netns}", "setpriv", "--reuid", str(uid), "--regid", str(uid),
           "--clear-groups", *cap_args, "env", f"PYTHONPATH={REPO}", _interpreter(), "-c", script]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


EXPECTED = "SETS KUBE-CLUSTER-IP,kube-router-svip"


def test_nobody_without_capabilities_cannot_list_ipsets(netns_with_sets):
    assert list_as(netns_with_sets, 65534, []).startswith("ERROR 1 ")  # EPERM


def test_nobody_with_only_net_admin_lists_ipsets(netns_with_sets):
    assert list_as(netns_with_sets, 65534, ["net_admin"]) == EXPECTED


@pytest.mark.parametrize("cap", ["net_raw", "sys_admin"])
def test_no_other_capability_stands_in_for_net_admin(netns_with_sets, cap):
    assert list_as(netns_with_sets, 65534, [cap]).startswith("ERROR 1 ")


def test_root_with_only_net_admin_lists_ipsets(netns_with_sets):
    # The DaemonSet: uid 0, capabilities drop ALL, add NET_ADMIN.
    assert list_as(netns_with_sets, 0, ["net_admin"]) == EXPECTED


def test_root_without_capabilities_cannot_list_ipsets(netns_with_sets):
    assert list_as(netns_with_sets, 0, []).startswith("ERROR 1 ")


def test_reading_kube_proxy_nftables_rules_needs_net_admin_and_nothing_else(netns_with_sets):
    as_daemonset = list_as(netns_with_sets, 0, ["net_admin"], READ_KUBE_PROXY_RULES)
    assert as_daemonset.startswith("FRONTENDS ") and as_daemonset.endswith("UNREAD 0"), as_daemonset
    assert int(as_daemonset.split()[1]) > 0
    assert list_as(netns_with_sets, 65534, ["net_admin"], READ_KUBE_PROXY_RULES) == as_daemonset
    for uid, caps in ((0, []), (65534, []), (65534, ["net_raw"]), (65534, ["sys_admin"])):
        refused = list_as(netns_with_sets, uid, caps, READ_KUBE_PROXY_RULES)
        assert refused.startswith("ERROR permission denied"), (uid, caps, refused)
