"""This host's addresses, and which of them a proxy puts NodePort virtual servers on.

Read with pyroute2 (one RTM_GETADDR and one RTM_GETLINK dump: a few dozen
entries, cheap), then filtered by the proxy's own rules:

kube-proxy, IPVS mode, default ``--nodeport-addresses`` (pkg/proxy/ipvs/proxier.go
and netlink_linux.go): every local address of any interface except the dummy
device ``kube-ipvs0`` (an address also present on another interface stays),
minus loopback addresses and IPv6 link-local ones. IPv4 link-local (169.254/16)
is kept: kube-proxy does not drop it. One proxier runs per IP family, so both
families are returned.

kube-router: by default only the node's primary IP (from the Node object, not
from the interfaces: see ``kube_router_nodeport_addresses``); with
``--nodeport-bindon-all-ip`` every IPv4 address of interfaces whose name does
not contain ``dummy``, ``kube`` or ``docker`` (its getAllLocalIPs lists only
FAMILY_V4 addresses, loopback included).

``--node-ip`` replaces all of this.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Iterable, NamedTuple

KUBE_PROXY_DUMMY_DEVICE = "kube-ipvs0"
KUBE_ROUTER_SKIPPED_NAME_PARTS = ("dummy", "kube", "docker")


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
        if entry.interface == KUBE_PROXY_DUMMY_DEVICE:
            continue
        ip = ipaddress.ip_address(entry.address)
        if ip.is_loopback or (ip.version == 6 and ip.is_link_local):
            continue
        kept.append(entry.address)
    return _unique(kept)


def kube_router_nodeport_addresses(addresses: Iterable[InterfaceAddress],
                                   node_addresses: Iterable[str] = (),
                                   bind_on_all_ip: bool = False) -> tuple[str, ...]:
    """The addresses kube-router creates NodePort virtual servers on.

    ``node_addresses`` are the Node object's addresses in API order; kube-router's
    primary IP is the first of them (InternalIP before ExternalIP), one per family.
    """
    if bind_on_all_ip:
        return _unique(e.address for e in addresses
                       if ipaddress.ip_address(e.address).version == 4
                       and not any(part in e.interface for part in KUBE_ROUTER_SKIPPED_NAME_PARTS))
    primary: dict[int, str] = {}
    for a in node_addresses:
        primary.setdefault(ipaddress.ip_address(a).version, a)
    return _unique(primary.values())


def host_nodeport_addresses(netns: str | None = None) -> tuple[str, ...]:
    """kube-proxy's NodePort addresses read from this host now."""
    return kube_proxy_nodeport_addresses(read_interface_addresses(netns))
