"""NodePort addresses read from a real network namespace with pyroute2."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from exporter.readers.netaddrs import InterfaceAddress, kube_proxy_nodeport_addresses, read_interface_addresses


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns():
    if shutil.which("ip") is None:
        pytest.fail("the `ip` tool (iproute2) is needed for the network namespace tests")
    name = f"kube-netaddrs-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        # The host kernel has no dummy driver: a bridge stands in for kube-ipvs0 (only its name matters).
        _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        _ip("-n", name, "link", "add", "kube-ipvs0", "type", "bridge")
        _ip("-n", name, "link", "add", "docker0", "type", "bridge")
        for dev in ("lo", "eth0", "eth1", "docker0"):
            _ip("-n", name, "link", "set", dev, "up")
        _ip("-n", name, "addr", "add", "192.0.2.5/24", "dev", "eth0")
        _ip("-n", name, "addr", "add", "169.254.3.3/16", "dev", "eth1")
        _ip("-n", name, "addr", "add", "2001:db8::5/64", "dev", "eth0", "nodad")
        _ip("-n", name, "addr", "add", "10.96.0.1/32", "dev", "kube-ipvs0")
        _ip("-n", name, "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0")
        _ip("-n", name, "addr", "add", "10.96.0.10/32", "dev", "eth1")  # also on a real interface
        _ip("-n", name, "addr", "add", "172.17.0.1/16", "dev", "docker0")
        time.sleep(0.2)  # IPv6 link-local addresses appear once links are up
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_reads_every_address_with_its_interface(netns):
    addrs = read_interface_addresses(netns)
    pairs = {(a.interface, a.address) for a in addrs}
    assert {("lo", "127.0.0.1"), ("lo", "::1"), ("eth0", "192.0.2.5"), ("eth0", "2001:db8::5"),
            ("kube-ipvs0", "10.96.0.1"), ("eth1", "10.96.0.10")} <= pairs
    assert any(a.interface == "eth0" and a.address.startswith("fe80::") for a in addrs)
    assert next(a for a in addrs if a.address == "192.0.2.5").prefixlen == 24


def test_kube_proxy_excludes_its_dummy_device_loopback_and_ipv6_link_local(netns):
    got = kube_proxy_nodeport_addresses(read_interface_addresses(netns))
    assert got == ("10.96.0.10", "169.254.3.3", "172.17.0.1", "192.0.2.5", "2001:db8::5")
    assert "10.96.0.1" not in got  # only on kube-ipvs0
    assert not any(a.startswith("fe80") or a in ("127.0.0.1", "::1") for a in got)


def test_both_dummy_devices_are_excluded():
    addrs = [InterfaceAddress("kube-dummy-if", "10.96.0.1", 32), InterfaceAddress("kube-ipvs0", "10.96.0.2", 32),
             InterfaceAddress("eth0", "192.0.2.5", 24), InterfaceAddress("eth0", "fe80::1", 64),
             InterfaceAddress("eth0", "169.254.1.1", 16)]
    assert kube_proxy_nodeport_addresses(addrs) == ("169.254.1.1", "192.0.2.5")


def test_missing_namespace_is_a_clear_error():
    from exporter.readers.netaddrs import AddressReadError

    name = f"kube-no-such-ns-{os.getpid()}"
    with pytest.raises(AddressReadError, match="cannot list"):
        read_interface_addresses(name)
    assert not os.path.exists(f"/run/netns/{name}")  # and none was created
