"""A network namespace of a test's own for iptables rules, either backend.

`iptables-nft-restore` / `iptables-legacy-restore` (and the ip6tables ones) load
rules inside it and the matching `-save` reads them back, so tests see the text
the node's own tools print; nothing reaches the host's tables.

kube-proxy's rules name nfacct objects (`-m nfacct --nfacct-name ...`) that it
creates over netlink at start; a restore fails without them. ``nfacct_add``
creates them the same way (NFNL_SUBSYS_ACCT, NFNL_MSG_ACCT_NEW), so no `nfacct`
tool is needed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import struct
import subprocess

from tests import ipset_ns

_counter = itertools.count()
BACKENDS = ("nft", "legacy")
# kube-proxy's nfacct objects (pkg/proxy/metrics, created in NewProxier).
KUBE_PROXY_NFACCT = ("ct_state_invalid_dropped_pkts", "localhost_nps_accepted_pkts")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ACCT = 7
NFNL_MSG_ACCT_NEW = 0
NFACCT_NAME = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2


def _tool(backend: str, family: int, what: str) -> str:
    return f"{'ip6' if family == 6 else 'ip'}tables-{backend}-{what}"


class IptNS(ipset_ns.NetNS):
    """`kn-ipt-<pid>-<n>`: a namespace whose iptables rules the test programs."""

    def __init__(self, backend: str = "nft") -> None:
        if backend not in BACKENDS:
            raise ValueError(backend)
        tools = ["ip", "nsenter"] + [_tool(backend, f, w) for f in (4, 6) for w in ("save", "restore")]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise RuntimeError(f"missing tool(s) for the iptables tests: {', '.join(missing)} "
                               "(the iptables package; scripts/setup.sh installs it)")
        self.backend = backend
        self.name = f"kn-ipt-{os.getpid()}-{next(_counter)}"
        self.path = f"/run/netns/{self.name}"

    def _exec(self, argv: list[str], input: str | None = None) -> str:
        done = subprocess.run(["nsenter", f"--net={self.path}", *argv], input=input,
                              capture_output=True, encoding="utf-8")
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return done.stdout

    def restore(self, rules: str, family: int = 4, noflush: bool = False) -> None:
        """`iptables-<backend>-restore` of ``rules`` (iptables-restore input) in the namespace."""
        if not rules.endswith("\n"):
            rules += "\n"  # iptables-legacy-restore reads nothing past a last line without one
        self._exec([_tool(self.backend, family, "restore"), *(["--noflush"] if noflush else [])], rules)

    def save(self, family: int = 4, table: str | None = None) -> str:
        return self._exec([_tool(self.backend, family, "save"), *(["-t", table] if table else [])])

    def iptables(self, *args: str, family: int = 4) -> str:
        """`iptables-<backend> ARGS` (e.g. ``"-t", "nat", "-F"``)."""
        prefix = "ip6tables" if family == 6 else "iptables"
        return self._exec([f"{prefix}-{self.backend}", *args])

    def nfacct_add(self, *names: str) -> None:
        """Create nfacct objects in the namespace, over netlink as kube-proxy does."""
        self.run(lambda: [_nfacct_new(name) for name in names])

    def __enter__(self) -> "IptNS":
        super().__enter__()
        self.nfacct_add(*KUBE_PROXY_NFACCT)
        return self


def _nfacct_new(name: str) -> None:
    raw = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(raw), NFACCT_NAME) + raw
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0) + attr
    msg_type = (NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    header = struct.pack("=IHHII", 16 + len(body), msg_type, flags, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.send(header + body)
        reply = sock.recv(4096)
    _length, kind = struct.unpack_from("=IH", reply)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, 16)
        if error:
            raise OSError(-error, f"nfacct {name}: {os.strerror(-error)}")
