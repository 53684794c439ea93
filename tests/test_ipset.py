"""ipset reader and collector against the real kernel, each test in its own network namespace.

Every figure is checked against `ipset list -t` run on the same namespace at
the same moment (nothing changes the sets in between).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest

from exporter.cli import settings_from_args
from exporter.collector import Context, Runner
from exporter.collectors.ipset import IpsetCollector, families, select
from exporter.paths import Paths
from exporter.readers import ipset as reader
from exporter.readers.ipset import IpsetHeader, IpsetReadError, read_headers
from tests.helpers import samples, value
from tests.ipset_ns import NetNS, header_fields, parse_list_terse

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.fail("the ipset tests need root (network namespaces, ipsets)", pytrace=False)


@pytest.fixture
def ns():
    with NetNS() as namespace:
        yield namespace


def terse(ns: NetNS) -> dict[str, dict[str, str]]:
    return parse_list_terse(ns.ipset("list", "-t").stdout)


def capacity_from_terse(set_type: str, header: dict[str, str]) -> int:
    """What the set can hold, from the words `ipset list -t` prints."""
    if "maxelem" in header:
        return int(header["maxelem"])
    if "size" in header:
        return int(header["size"])
    low, high = header["range"].split("-")
    if set_type == "bitmap:port":
        return int(high) - int(low) + 1
    first, last = ipaddress.IPv4Address(low), ipaddress.IPv4Address(high)
    blocks = [net for span in ipaddress.summarize_address_range(first, last)
              for net in span.subnets(new_prefix=max(span.prefixlen, int(header.get("netmask", 32))))]
    return len(blocks)


def assert_same_as_terse(headers: list[IpsetHeader], listed: dict[str, dict[str, str]]) -> None:
    assert sorted(h.name for h in headers) == sorted(listed)
    for h in headers:
        want = listed[h.name]
        header = header_fields(want["Header"])
        got = {"type": h.type, "revision": h.revision, "entries": h.entries,
               "memory": h.memory_bytes, "references": h.references, "max": h.max_entries}
        expected = {"type": want["Type"], "revision": int(want["Revision"]),
                    "entries": int(want["Number of entries"]), "memory": int(want["Size in memory"]),
                    "references": int(want["References"]),
                    "max": capacity_from_terse(want["Type"], header)}
        if "family" in header:
            got["family"], expected["family"] = h.family, header["family"]
        if "hashsize" in header:
            got["hashsize"], expected["hashsize"] = h.hashsize, int(header["hashsize"])
        assert got == expected, h.name


def ipset_runner(*argv: str) -> Runner:
    settings = settings_from_args(list(argv))
    ctx = Context(settings=settings, paths=Paths(settings["path.procfs"], settings["path.sysfs"]))
    return Runner([IpsetCollector(ctx)])


CREATE = [
    "create web hash:ip maxelem 100",
    "add web 10.0.0.1", "add web 10.0.0.2", "add web 10.0.0.3",
    "create svc hash:ip,port hashsize 2048",
    "add svc 10.96.0.10,udp:53", "add svc 10.96.0.10,tcp:53",
    "create nets hash:net",
    "add nets 10.244.0.0/16", "add nets 192.168.0.0/24", "add nets 172.16.1.0/30", "add nets 10.1.0.0/24",
    "create netports hash:net,port counters comment timeout 600",
    "add netports 10.0.0.0/8,tcp:443",
    "create ports bitmap:port range 0-1024",
    "add ports 22", "add ports 80", "add ports 443",
    "create blocks bitmap:ip range 10.9.0.0/24 netmask 26",
    "add blocks 10.9.0.1",
    "create macs bitmap:ip,mac range 10.8.0.0-10.8.0.9",
    "create six hash:ip family inet6 maxelem 2048",
    "add six fd00::1", "add six fd00::2",
    "create pöd-ü hash:ip",  # names are bytes to the kernel; UTF-8 is common enough
    "create all list:set size 4",
    "add all web", "add all six",
]


@pytest.fixture(params=["walk", "layouts"])
def parse_path(request, monkeypatch):
    """Read with the attribute-by-attribute walk only, or with layouts learned from a first read."""
    monkeypatch.setattr(reader, "_LAYOUTS", {})
    if request.param == "walk":
        monkeypatch.setattr(reader, "_MAX_LAYOUTS", 0)
    return request.param


def read_via(ns: NetNS, parse_path: str) -> list[IpsetHeader]:
    if parse_path == "layouts":
        ns.run(read_headers)  # learns the layouts
        assert any(layout is not None for layout in reader._LAYOUTS.values())
    else:
        assert not reader._LAYOUTS
    headers = ns.run(read_headers)
    if parse_path == "walk":
        assert not reader._LAYOUTS
    return headers


def test_reader_matches_ipset_list_terse_for_every_type(ns, parse_path):
    ns.ipset("restore", input="\n".join(CREATE) + "\n")
    headers = read_via(ns, parse_path)
    assert_same_as_terse(headers, terse(ns))
    by_name = {h.name: h for h in headers}
    # Known from how the sets were made, so a shared misreading of the text cannot hide.
    assert (by_name["web"].entries, by_name["web"].max_entries, by_name["web"].references) == (3, 100, 1)
    assert (by_name["svc"].entries, by_name["svc"].hashsize) == (2, 2048)
    assert by_name["nets"].entries == 4 and by_name["nets"].type == "hash:net"
    assert by_name["netports"].type == "hash:net,port" and by_name["netports"].entries == 1
    assert (by_name["ports"].entries, by_name["ports"].max_entries) == (3, 1025)
    assert (by_name["blocks"].entries, by_name["blocks"].max_entries) == (1, 4)
    assert by_name["macs"].max_entries == 10
    assert (by_name["six"].family, by_name["six"].entries, by_name["six"].max_entries) == ("inet6", 2, 2048)
    assert (by_name["all"].type, by_name["all"].entries, by_name["all"].max_entries) == ("list:set", 2, 4)
    assert by_name["pöd-ü"].type == "hash:ip"
    assert all(h.memory_bytes > 0 for h in headers)


def test_collector_serves_what_ipset_list_terse_shows(ns):
    ns.ipset("restore", input="\n".join(CREATE) + "\n")
    runner = ipset_runner()
    got = ns.run(lambda: samples(runner))
    listed = terse(ns)
    assert value(got, "kubenode_collector_success", collector="ipset") == 1.0
    assert value(got, "kubenode_ipset_sets") == len(listed)
    assert value(got, "kubenode_ipset_all_entries") == sum(int(s["Number of entries"]) for s in listed.values())
    assert value(got, "kubenode_ipset_unreferenced_sets") == sum(
        1 for s in listed.values() if s["References"] == "0")
    for name, want in listed.items():
        assert value(got, "kubenode_ipset_entries", set=name, type=want["Type"]) == int(want["Number of entries"])
        assert value(got, "kubenode_ipset_memory_bytes", set=name) == int(want["Size in memory"])
        assert value(got, "kubenode_ipset_max_entries", set=name) == capacity_from_terse(
            want["Type"], header_fields(want["Header"]))


def test_empty_namespace_has_no_sets(ns):
    assert ns.run(read_headers) == []
    got = ns.run(lambda: samples(ipset_runner()))
    assert value(got, "kubenode_collector_success", collector="ipset") == 1.0
    assert value(got, "kubenode_ipset_sets") == 0.0
    assert not [k for k in got if k[0] == "kubenode_ipset_entries"]


def test_set_created_and_destroyed_between_scrapes_leaves_no_series(ns):
    ns.ipset("create", "stays", "hash:ip")
    runner = ipset_runner()

    def set_series(got: dict, name: str) -> list:
        return [k for k in got if ("set", name) in k[1]]

    before = ns.run(lambda: samples(runner))
    assert value(before, "kubenode_ipset_sets") == 1.0 and not set_series(before, "comes-and-goes")

    ns.ipset("create", "comes-and-goes", "hash:net", "maxelem", "512")
    for i in range(5):
        ns.ipset("add", "comes-and-goes", f"10.{i}.0.0/16")
    during = ns.run(lambda: samples(runner))
    assert value(during, "kubenode_ipset_sets") == 2.0
    assert value(during, "kubenode_ipset_entries", set="comes-and-goes", type="hash:net") == 5.0
    assert value(during, "kubenode_ipset_max_entries", set="comes-and-goes") == 512.0

    ns.ipset("destroy", "comes-and-goes")
    after = ns.run(lambda: samples(runner))
    assert value(after, "kubenode_ipset_sets") == 1.0
    assert set_series(after, "comes-and-goes") == []
    assert value(after, "kubenode_ipset_entries", set="stays", type="hash:ip") == 0.0


def test_thousands_of_sets(ns, parse_path):
    count = 3000
    lines = []
    for i in range(count):
        kind = ("hash:ip", "hash:net", "hash:ip,port")[i % 3]
        lines.append(f"create KUBE-SRC-{i:05d} {kind} maxelem {1024 + i}")
        for j in range(i % 7):
            entry = {"hash:ip": f"10.{i % 250}.{j}.1", "hash:net": f"10.{i % 250}.{j}.0/24",
                     "hash:ip,port": f"10.{i % 250}.0.{j},tcp:{80 + j}"}[kind]
            lines.append(f"add KUBE-SRC-{i:05d} {entry}")
    ns.ipset("restore", input="\n".join(lines) + "\n")
    headers = read_via(ns, parse_path)
    assert len(headers) == count
    assert_same_as_terse(headers, terse(ns))
    assert sum(h.entries for h in headers) == sum(i % 7 for i in range(count))
    got = ns.run(lambda: samples(ipset_runner()))
    assert value(got, "kubenode_ipset_sets") == count
    assert value(got, "kubenode_ipset_entries", set="KUBE-SRC-02999", type="hash:ip,port") == 2999 % 7
    assert value(got, "kubenode_ipset_max_entries", set="KUBE-SRC-02999") == 1024 + 2999


def test_full_set_reports_entries_equal_to_max(ns):
    ns.ipset("create", "full", "hash:ip", "maxelem", "8")
    for i in range(8):
        ns.ipset("add", "full", f"10.0.0.{i + 1}")
    refused = ns.ipset("add", "full", "10.0.0.99", check=False)
    assert refused.returncode != 0 and "full" in refused.stderr, refused.stderr
    (header,) = ns.run(read_headers)
    assert (header.entries, header.max_entries) == (8, 8)
    assert_same_as_terse([header], terse(ns))
    got = ns.run(lambda: samples(ipset_runner()))
    assert value(got, "kubenode_ipset_entries", set="full", type="hash:ip") == \
        value(got, "kubenode_ipset_max_entries", set="full") == 8.0


def test_include_and_exclude_choose_per_set_series(ns):
    for name in ("KUBE-SRC-A", "KUBE-DST-B", "KUBE-SRC-DST-C", "other"):
        ns.ipset("create", name, "hash:ip")
    got = ns.run(lambda: samples(ipset_runner("--ipset.include", "^KUBE-", "--ipset.exclude", "DST")))
    per_set = {dict(k[1])["set"] for k in got if k[0] == "kubenode_ipset_memory_bytes"}
    assert per_set == {"KUBE-SRC-A"}
    assert value(got, "kubenode_ipset_entries", set="KUBE-SRC-A", type="hash:ip") == 0.0
    assert value(got, "kubenode_ipset_sets") == 4.0  # the count ignores the filters, as its help says
    only_excluded = ns.run(lambda: samples(ipset_runner("--ipset.exclude", "^KUBE-")))
    assert {dict(k[1])["set"] for k in only_excluded if k[0] == "kubenode_ipset_memory_bytes"} == {"other"}


def test_include_from_config_file(ns, tmp_path):
    ns.ipset("create", "KUBE-ONE", "hash:ip")
    ns.ipset("create", "two", "hash:ip")
    config = tmp_path / "config.yaml"
    config.write_text("ipset:\n  include: '^KUBE-'\n")
    got = ns.run(lambda: samples(ipset_runner("--config.file", str(config))))
    assert {dict(k[1])["set"] for k in got if k[0] == "kubenode_ipset_memory_bytes"} == {"KUBE-ONE"}


def test_scrape_runs_no_external_tool(ns, monkeypatch):
    ns.ipset("create", "s", "hash:ip")

    def no_exec(*args, **kwargs):
        raise AssertionError(f"the scrape path started a process: {args}")

    runner = ipset_runner()
    monkeypatch.setattr(subprocess.Popen, "__init__", no_exec)
    monkeypatch.setattr(os, "execv", no_exec)
    got = ns.run(lambda: samples(runner))
    assert value(got, "kubenode_collector_success", collector="ipset") == 1.0


# Pure parts: selection and shaping, and a malformed kernel message.

def header(name: str, **kw) -> IpsetHeader:
    base = dict(type="hash:ip", revision=6, family="inet", entries=1, memory_bytes=100,
                references=0, max_entries=10, hashsize=1024)
    base.update(kw)
    return IpsetHeader(name, **base)


def test_select_searches_names():
    import re

    hs = [header("KUBE-A"), header("x-KUBE-B"), header("c")]
    assert [h.name for h in select(hs, re.compile("KUBE"), None)] == ["KUBE-A", "x-KUBE-B"]
    assert [h.name for h in select(hs, re.compile("^KUBE"), re.compile("A$"))] == []
    assert [h.name for h in select(hs, None, None)] == ["KUBE-A", "x-KUBE-B", "c"]


def test_families_skip_max_entries_when_unknown():
    hs = [header("a", max_entries=None, entries=3, references=2), header("b", entries=4)]
    got = samples("".join(_text(f) for f in families(hs, hs)))
    assert value(got, "kubenode_ipset_max_entries", set="a") is None
    assert value(got, "kubenode_ipset_max_entries", set="b") == 10.0
    assert value(got, "kubenode_ipset_all_entries") == 7.0
    assert value(got, "kubenode_ipset_unreferenced_sets") == 1.0


def _text(family) -> str:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    class One:
        def collect(self):
            return [family]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return generate_latest(registry).decode()


def test_kernel_errors_read_as_one_clear_line():
    import errno

    assert "CAP_NET_ADMIN" in reader._error_text(errno.EPERM)
    assert "no ipset support" in reader._error_text(errno.EINVAL)
    assert "protocol" in reader._error_text(reader.IPSET_ERR_PROTOCOL)
    assert "\n" not in reader._error_text(errno.EIO)


def test_malformed_message_is_a_read_error_not_a_crash():
    name = b"abc\0"
    attr = lambda t, payload: (len(payload) + 4).to_bytes(2, "little") + t.to_bytes(2, "little") + payload  # noqa: E731
    good = attr(reader.IPSET_ATTR_SETNAME, name) + attr(reader.IPSET_ATTR_TYPENAME, b"hash:ip\0")
    good = bytearray(good)
    assert reader._parse_set(good, 0, len(good), {}).name == "abc"
    truncated = bytearray(good)
    truncated[0] = 200  # attribute longer than the message
    with pytest.raises(IpsetReadError, match="malformed"):
        reader._parse_set(truncated, 0, len(truncated), {})
    zero = bytearray(good)
    zero[0] = 0
    with pytest.raises(IpsetReadError, match="malformed"):
        reader._parse_set(zero, 0, len(zero), {})


def test_message_larger_than_the_buffer_is_a_clear_error(ns, monkeypatch):
    ns.ipset("create", "a-set-with-a-long-enough-name", "hash:ip")
    monkeypatch.setattr(reader, "_RECV_BUFFER", 64)  # fits the protocol answer, not a set header
    with pytest.raises(IpsetReadError, match="does not fit the 64-byte buffer"):
        ns.run(read_headers)
    monkeypatch.undo()
    assert [h.name for h in ns.run(read_headers)] == ["a-set-with-a-long-enough-name"]


def _attr(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return length.to_bytes(2, "little") + attr_type.to_bytes(2, "little") + payload + b"\0" * (-length % 4)


def _set_message(name: bytes, entries: int) -> bytes:
    """A set header message laid out as the kernel writes it (after the nfgenmsg)."""
    be32 = lambda t, v: _attr(t | reader.NLA_F_NET_BYTEORDER, v.to_bytes(4, "big"))  # noqa: E731
    nest = (be32(reader.IPSET_ATTR_HASHSIZE, 1024) + be32(reader.IPSET_ATTR_MAXELEM, 65536)
            + _attr(21, b"\x0c") + be32(17, 0x1234) + be32(reader.IPSET_ATTR_REFERENCES, 1)
            + be32(reader.IPSET_ATTR_MEMSIZE, 400) + be32(reader.IPSET_ATTR_ELEMENTS, entries))
    return (_attr(reader.IPSET_ATTR_PROTOCOL, b"\x07") + _attr(reader.IPSET_ATTR_SETNAME, name + b"\0")
            + _attr(reader.IPSET_ATTR_TYPENAME, b"hash:ip\0") + _attr(reader.IPSET_ATTR_FAMILY, b"\x02")
            + _attr(reader.IPSET_ATTR_REVISION, b"\x06") + _attr(11, b"\x00\x01")
            + _attr(reader.IPSET_ATTR_DATA | reader.NLA_F_NESTED, nest))


def test_layouts_and_walk_agree_and_garbage_never_crashes(monkeypatch):
    import random

    monkeypatch.setattr(reader, "_LAYOUTS", {})
    good = bytearray(_set_message(b"KUBE-A", 5))
    walked = reader._walk_set(good, 0, len(good), {})
    assert walked == IpsetHeader("KUBE-A", "hash:ip", 6, "inet", 5, 400, 1, 65536, 1024)
    assert reader._parse_set(good, 0, len(good), {}) == walked  # learns the layout
    other = bytearray(_set_message(b"KUBE-B", 77))  # same shape: read by the layout
    assert reader._parse_set(other, 0, len(other), {}) == reader._walk_set(other, 0, len(other), {})
    assert reader._parse_set(other, 0, len(other), {}).entries == 77
    no_name = bytearray(other)
    no_name[other.index(b"KUBE-B")] = 0
    assert reader._parse_set(no_name, 0, len(no_name), {}) is None is reader._walk_set(no_name, 0, len(no_name), {})

    rng = random.Random(2)
    outcomes = {"header": 0, "none": 0, "error": 0}
    for _ in range(5000):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.choice([0, 255, rng.randrange(256)])
        cut = rng.choice([len(bad), rng.randrange(len(bad) + 1)])
        try:
            got = reader._parse_set(bad, 0, cut, {})
        except IpsetReadError:
            outcomes["error"] += 1
            continue
        if got is None:
            outcomes["none"] += 1
        else:
            assert isinstance(got, IpsetHeader)
            outcomes["header"] += 1
            # Whatever the layout cache learned from garbage, it reads like the walk.
            assert got == reader._walk_set(bad, 0, cut, {})
    assert all(outcomes.values()), outcomes
