"""This host's addresses, and which of them a proxy puts NodePort virtual servers on.

Read with pyroute2 (one RTM_GETADDR and one RTM_GETLINK dump: a few dozen
entries, cheap), then filtered by the proxy's own rules:

kube-proxy, IPVS mode, default ``--nodeport-addresses`` (pkg/proxy/ipvs/proxier.go
and netlink_linux.go): every local address of any interface except the dummy
device ``kube-ipvs0`` (an address also present on another interface stays),
minus loopback addresses and IPv6 link-local ones. IPv4 link-local (169.254/16)
is kept: kube-proxy does not drop it. One proxier runs per IP family, so both
families are returned.

kube-router (default flags) binds NodePorts on the node's primary IP only, which
comes from the Node object, not from the interfaces (``desired.node_facts``), so
nothing here applies to it; its dummy device ``kube-dummy-if`` holds service VIPs
and is excluded here too, should this reader be used for it.

``--node-ip`` replaces all of this.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Iterable, NamedTuple

# The proxies' dummy devices: they hold service VIPs, which are not node addresses.
DUMMY_DEVICES = ("kube-ipvs0", "kube-dummy-if")


class InterfaceAddress(NamedTuple):
    interface: str
    address: str  # compressed text form
    prefixlen: int


class AddressReadError(Exception):
    """The interfaces could not be read (netlink failed); the message says why."""


def read_interface_addresses(netns: str | None = None) -> list[InterfaceAddress]:
    """Every address of every interface, with the interface's name."""
    from pyroute2 import IPRoute  # imported here: only the live path needs netlink

    # pyroute2 creates a named namespace that does not exist; reading must never create one.
    if netns and not os.path.exists(os.path.join("/run/netns", netns)):
        raise AddressReadError(f"cannot list addresses: no network namespace {netns!r}")
    try:
        kwargs = {"netns": netns} if netns else {}
        with IPRoute(**kwargs) as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            out = []
            for msg in ipr.get_addr():
                if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
                    continue
                # IFA_LOCAL is the address itself on point-to-point links, where IFA_ADDRESS is the peer.
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if not text:
                    continue
                address = str(ipaddress.ip_address(text.split("%")[0]))
                out.append(InterfaceAddress(names.get(msg["index"], f"if{msg['index']}"), address,
                                            msg["prefixlen"]))
            return out
    except (OSError, ValueError) as err:
        raise AddressReadError(f"cannot list this host's addresses: {err}") from None


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    seen = {}
    for a in addresses:
        seen.setdefault(a, None)
    return tuple(sorted(seen, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a))))


def kube_proxy_nodeport_addresses(addresses: Iterable[InterfaceAddress]) -> tuple[str, ...]:
    """The addresses kube-proxy (IPVS, default flags) creates NodePort virtual servers on."""
    kept = []
    for entry in addresses:
        if entry.interface in DUMMY_DEVICES:
            continue
        ip = ipaddress.ip_address(entry.address)
        if ip.is_loopback or (ip.version == 6 and ip.is_link_local):
            continue
        kept.append(entry.address)
    return _unique(kept)


def host_nodeport_addresses(netns: str | None = None) -> tuple[str, ...]:
    """kube-proxy's NodePort addresses read from this host now."""
    return kube_proxy_nodeport_addresses(read_interface_addresses(netns))
