"""nf_tables' change feed (exporter/readers/nftables_monitor.py) and the iptables-nft
source's re-reads that follow it (exporter/readers/iptables_nft.py), on real rules in a
network namespace of the test's own.

Every re-read is resolved as the exporter resolves it (with the resolver's cache kept
from the reads before) and must equal a whole resolve of a fresh source's read (no feed,
no cache); what it read must equal `iptables-nft-save`, chain by chain, rule by rule; and
it came from the feed (``full_reads`` did not move) where the feed can say what changed,
or from a counted full read where it cannot.
"""

from __future__ import annotations

import socket
import struct
import subprocess

import pytest

from exporter.readers import nftables_monitor as monitor
from exporter.readers.iptables import NoKubeProxyRules, resolve_rulesets
from exporter.readers.iptables_nft import IptablesNftSource, NftReadError
from exporter.readers.iptables_rules import IptablesRule
from exporter.readers.ipset import _NLMSGHDR
from exporter.readers.nftables_monitor import NftMonitor, newer
from tests import ipt_rulesets
from tests.ipt_rulesets import IptNS
from tests.test_iptables_netlink import assert_reads_as_saved


@pytest.fixture
def ns():
    with IptNS() as namespace:
        yield namespace


def _resolved(rulesets, cache: dict | None = None):
    try:
        return resolve_rulesets(rulesets, None, cache)
    except NoKubeProxyRules:
        return "no kube-proxy rules"


class Reader:
    """The source as the exporter keeps it: one source, the resolver's cache beside it."""

    def __init__(self, ns: IptNS, **options) -> None:
        self.ns, self.source, self.cache = ns, IptablesNftSource(**options), {}

    def check(self, full_reads: int):
        """A re-read + resolve: equal to a fresh source's whole resolve, read as
        `iptables-nft-save` prints, with ``full_reads`` full reads so far."""
        ns, source = self.ns, self.source
        read = ns.run(source.read)
        resolved = _resolved(read, self.cache)
        assert ns.run(source.verify), "the kernel moved during the check"
        fresh = IptablesNftSource(feed=False)
        try:
            assert resolved == _resolved(ns.run(fresh.read))
        finally:
            fresh.close()
        for ruleset in read:
            if ruleset.tables or ns.save(ruleset.family).strip():
                assert_reads_as_saved(ns, ruleset.family, ruleset)
        assert source.full_reads == full_reads, source.last_resync
        return read

    def close(self) -> None:
        self.source.close()


@pytest.fixture
def loaded(ns):
    services = ipt_rulesets.bench_services(60, 5)
    ns.load(services)
    ns.load(ipt_rulesets.generated_services_v6(), family=6)
    reader = Reader(ns)
    try:
        reader.check(full_reads=1)
        reader.services = services
        yield reader
    finally:
        reader.close()


def nft(ns: IptNS, command: str) -> None:
    subprocess.run(["nsenter", f"--net={ns.path}", "nft", command], check=True, capture_output=True)


def nat(read, family: int = 4):
    return next(r for r in read if r.family == family).tables["nat"]


# -- kube-proxy's partial sync --------------------------------------------------------

def test_partial_syncs_are_read_from_the_feed_and_resolve_as_a_whole_read(ns, loaded):
    services, source = loaded.services, loaded.source
    for i in range(3):
        changed = services[i * 7]
        ns.restore(ipt_rulesets.endpoints_changed(services, changed, [(a, p + 1) for a, p in changed.endpoints]))
        read = loaded.check(full_reads=1)
        # Every top-level chain was flushed and written again the same: not changed; the
        # Service's own chains are (its KUBE-SVC-, its endpoints' KUBE-SEP-, old and new).
        assert source.from_feed > 0
        assert nat(read).changed and all(name.startswith(("KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-"))
                                         for name in nat(read).changed), nat(read).changed
    assert source.last_generation == ns.run(source.generation)
    v6 = ipt_rulesets.generated_services_v6()
    changed = next(sp for sp in v6 if sp.endpoints)
    ns.restore(ipt_rulesets.endpoints_changed(v6, changed, [(a, p + 1) for a, p in changed.endpoints], family=6),
               family=6)
    read = loaded.check(full_reads=1)
    assert nat(read, 6).changed and not nat(read, 4).changed


def test_nothing_changed_serves_the_same_rulesets(ns, loaded):
    source = loaded.source
    first = ns.run(source.read)
    assert ns.run(source.read) is first and source.dumped == source.decoded == 0
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    again = loaded.check(full_reads=1)
    assert again is not first and nat(again).changed == {"KUBE-MARK-MASQ"}
    assert nat(again)["KUBE-MARK-MASQ"][-1] == IptablesRule("RETURN")


# -- other writers ----------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    ("-t", "nat", "-D", "KUBE-MARK-MASQ", "1"),
    ("-t", "nat", "-D", "KUBE-SERVICES", "5"),
    ("-t", "nat", "-I", "KUBE-SERVICES", "1", "-j", "RETURN"),
    ("-t", "nat", "-I", "KUBE-SERVICES", "4", "-j", "RETURN"),
    ("-t", "nat", "-R", "KUBE-SERVICES", "3", "-j", "ACCEPT"),
    ("-t", "nat", "-R", "KUBE-SERVICES", "1", "-j", "ACCEPT"),
    ("-t", "filter", "-A", "KUBE-SERVICES", "-j", "RETURN"),
    ("-t", "nat", "-N", "KUBE-NEW"),
    ("-t", "nat", "-F", "KUBE-NODEPORTS"),
    ("-t", "nat", "-F"),
], ids=["delete", "delete-middle", "insert-head", "insert-middle", "replace", "replace-first", "filter",
        "new-chain", "flush-chain", "flush-nat"])
def test_a_change_by_iptables_is_read_from_the_feed(loaded, change):
    loaded.ns.iptables(*change)
    loaded.check(full_reads=1)


def test_a_chain_deleted_and_one_renamed(ns, loaded):
    ns.iptables("-t", "nat", "-N", "KUBE-GONE")
    ns.iptables("-t", "nat", "-A", "KUBE-GONE", "-j", "RETURN")
    loaded.check(full_reads=1)
    ns.iptables("-t", "nat", "-F", "KUBE-GONE")
    ns.iptables("-t", "nat", "-X", "KUBE-GONE")
    assert "KUBE-GONE" not in nat(loaded.check(full_reads=1))
    # Same handle, new name: every jump to it changed with no rule event: read whole.
    ns.iptables("-t", "nat", "-E", "KUBE-MARK-MASQ", "KUBE-RENAMED")
    loaded.check(full_reads=2)
    assert "renamed" in loaded.source.last_resync


def test_a_built_in_chain_flushed_and_deleted_reads_empty(ns, loaded):
    nft(ns, "flush chain ip nat PREROUTING; delete chain ip nat PREROUTING")
    read = loaded.check(full_reads=1)
    assert nat(read)["PREROUTING"] == ()


def test_the_nat_table_deleted_and_created_again_is_a_full_read(ns, loaded):
    nft(ns, "delete table ip nat")
    read = loaded.check(full_reads=2)
    assert "nat" not in read[0].tables
    ns.load(loaded.services)
    loaded.check(full_reads=3)


def test_rules_of_tables_the_source_does_not_keep_are_ignored(ns, loaded):
    first = ns.run(loaded.source.read)
    assert loaded.source.dumped == 0
    nft(ns, "add table ip kube-proxy")
    nft(ns, "add chain ip kube-proxy services")
    nft(ns, "add rule ip kube-proxy services counter accept")
    again = loaded.check(full_reads=1)
    # Nothing of its own moved: no chain changed.
    assert [chains.changed for ruleset in again for chains in ruleset.tables.values()] == [set()] * 4
    assert first[0].tables["nat"].read_id == again[0].tables["nat"].since


# -- what the feed cannot tell ------------------------------------------------------------

def test_an_overflowed_feed_is_a_counted_full_read(ns):
    services = ipt_rulesets.bench_services(60, 5)
    ns.load(services)
    reader = Reader(ns, feed_buffer=4096)  # the kernel's floor: a few messages
    try:
        reader.check(full_reads=1)
        for i in range(3):
            changed = services[i]
            ns.restore(ipt_rulesets.endpoints_changed(services, changed, [(a, p + 1) for a, p in changed.endpoints]))
        reader.check(full_reads=2)
        assert "ENOBUFS" in reader.source.last_resync
        # After the full read the feed serves again.
        ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
        reader.check(full_reads=2)
    finally:
        reader.close()


def test_a_generation_the_feed_did_not_reach_is_a_full_read(ns, loaded):
    feed = loaded.source._feed
    drain = feed.drain

    def losing_the_last_transaction(keep=None):
        drained = drain(keep)
        return drained._replace(batches=drained.batches[:-1])

    feed.drain = losing_the_last_transaction
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    ns.iptables("-t", "nat", "-D", "KUBE-SERVICES", "1")
    loaded.check(full_reads=2)
    assert "generation" in loaded.source.last_resync


def test_a_re_read_that_failed_after_draining_is_followed_by_a_full_read(ns, loaded):
    requests = loaded.source._requests()
    generation = requests.generation

    def failing():
        raise NftReadError("no answer from nf_tables within 5 s (the ruleset generation)")

    requests.generation = failing
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    with pytest.raises(NftReadError):
        ns.run(loaded.source.read)  # the transaction it drained is not kept
    requests.generation = generation
    ns.iptables("-t", "nat", "-D", "KUBE-SERVICES", "1")  # another chain than the lost change's
    loaded.check(full_reads=2)


# -- the feed on its own ------------------------------------------------------------------

def test_the_feed_sees_what_was_committed_between_subscribing_and_dumping(ns):
    services = ipt_rulesets.bench_services(10, 2)
    ns.load(services)

    def subscribe_then_change():
        feed = NftMonitor()
        try:
            ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
            ns.iptables("-t", "nat", "-A", "KUBE-SERVICES", "-j", "RETURN")
            return feed.drain(lambda chain: chain == "KUBE-SERVICES")
        finally:
            feed.close()

    drained = ns.run(subscribe_then_change)
    assert drained.resync is None and len(drained.batches) == 2
    [(key, events)] = drained.batches[0].tables.items()
    assert key == (2, "nat") and [(e.kind, e.chain) for e in events] == [("rules", "KUBE-MARK-MASQ")]
    # A chain the caller keeps: its rule messages too, with their bytes.
    [(key, events)] = drained.batches[1].tables.items()
    assert [(e.kind, e.chain) for e in events] == [("newrule", "KUBE-SERVICES"), ("rules", "KUBE-SERVICES")]
    assert events[0].append and events[0].body
    assert newer(drained.batches[1].generation, drained.batches[0].generation)


def test_generations_wrap():
    assert newer(5, 4) and not newer(4, 5) and not newer(4, 4)
    assert newer(1, 0xFFFFFFFF)


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def test_a_rule_message_in_another_attribute_order_names_the_same_chain():
    """The kernel's layout (table, chain first) is read straight; any other order by a walk
    of the attributes, to the same table, chain and handle."""
    table, chain = _attr(monitor.NFTA_RULE_TABLE, b"nat\0"), _attr(monitor.NFTA_RULE_CHAIN, b"KUBE-SERVICES\0")
    handle = _attr(monitor.NFTA_RULE_HANDLE, struct.pack(">Q", 77))
    position = _attr(monitor.NFTA_RULE_POSITION, struct.pack(">Q", 76))
    body = _attr(monitor.NFTA_RULE_EXPRESSIONS, b"\x08\x00\x01\x00abcd") + _attr(monitor.NFTA_RULE_USERDATA, b"xyz")
    kernel = table + chain + handle + position + body
    found = monitor._touched_rule(kernel, 0, len(kernel), {})
    assert found[:2] == ("nat", "KUBE-SERVICES")
    assert monitor._rule_rest(kernel, found[2], len(kernel), monitor.NFT_MSG_NEWRULE, monitor.NLM_F_APPEND,
                              "KUBE-SERVICES") == monitor.Event("newrule", "KUBE-SERVICES", 77, 76, True, body)
    other = struct.pack("=BBH", 2, 0, 0) + chain + handle + table + position + body
    assert monitor._touched_rule(other, 4, len(other), {}) is None
    msg_type = (monitor.NFNL_SUBSYS_NFTABLES << 8) | monitor.NFT_MSG_NEWRULE
    assert monitor.parse_message(other, 0, len(other), msg_type) == (
        2, "nat", monitor.Event("newrule", "KUBE-SERVICES", 77))


def test_a_top_level_rule_in_another_layout_makes_its_chain_dumped_not_digested():
    """A rule message the quick path cannot take keeps no bytes: the drain says so with an
    "unkept" event for a chain whose digest the reader takes from the feed, and the reader
    then dumps that chain rather than digest what it did not keep."""
    import socket

    from exporter.readers import iptables_nft

    table, chain = _attr(monitor.NFTA_RULE_TABLE, b"nat\0"), _attr(monitor.NFTA_RULE_CHAIN, b"KUBE-SERVICES\0")
    handle = _attr(monitor.NFTA_RULE_HANDLE, struct.pack(">Q", 77))
    body = _attr(monitor.NFTA_RULE_EXPRESSIONS, b"\x08\x00\x01\x00abcd")
    rule = struct.pack("=BBH", 2, 0, 0) + chain + handle + table + body  # not the kernel's order
    generation = struct.pack("=BBH", 0, 0, 0) + _attr(monitor.NFTA_GEN_ID, struct.pack(">I", 5))

    def message(kind: int, payload: bytes) -> bytes:
        return _NLMSGHDR.pack(16 + len(payload), (monitor.NFNL_SUBSYS_NFTABLES << 8) | kind, 0, 0, 0) + payload

    feed = NftMonitor.__new__(NftMonitor)  # its socket stands in for the netlink one
    feed.sock, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    feed.buf, feed._open = bytearray(1 << 16), {}
    try:
        writer.send(message(monitor.NFT_MSG_NEWRULE, rule) + message(monitor.NFT_MSG_NEWGEN, generation))
        [batch] = feed.drain(keep=lambda name: name == "KUBE-SERVICES").batches
    finally:
        feed.sock.close()
        writer.close()
    events = batch.tables[(2, "nat")]
    assert [e.kind for e in events] == ["unkept", "rules"]
    state = iptables_nft._Table()
    state.set_count("KUBE-SERVICES", 0)
    state.digests["KUBE-SERVICES"] = b"x"
    assert iptables_nft._rewritten(state, "KUBE-SERVICES", [e for e in events if e.kind != "rules"]) is None


def _messages(datagram: bytes) -> list[int]:
    """The nf_tables commands of a netlink datagram's messages, in order."""
    out, offset = [], 0
    while offset + 16 <= len(datagram):
        length, msg_type, _, _, _ = _NLMSGHDR.unpack_from(datagram, offset)
        out.append(msg_type & 0xFF)
        offset += (length + 3) & ~3
    return out


def _datagrams(sock) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 16, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


def test_the_newgen_filter_keeps_announcements_and_drops_the_rest():
    """The filter itself, run by the kernel on datagrams of our own making (an AF_UNIX
    pair takes socket filters as a netlink socket does): a datagram whose first message
    is NEWGEN is kept, one of element messages is dropped, and so is one whose NEWGEN
    comes second (the filter reads the first message only) or that is too short to say."""
    def message(command: int) -> bytes:
        return _NLMSGHDR.pack(20, (10 << 8) | command, 0, 0, 0) + bytes(4)

    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender, receiver:
        monitor.attach_filter(receiver, monitor.newgen_filter())
        newelem, newgen = 12, monitor.NFT_MSG_NEWGEN
        for datagram in (message(newelem) * 3, message(newgen), message(newelem) + message(newgen), b"\x0f\x0a"):
            sender.send(datagram)
        assert [_messages(d) for d in _datagrams(receiver)] == [[newgen]]


def test_the_kernel_announces_each_commit_in_a_datagram_of_its_own():
    """What the announcements-only socket relies on, on this kernel: every NEWGEN comes
    in a datagram of its own (an unfiltered subscriber sees the other notifications
    coalesced, thousands of element messages among them), so a socket filtered on its
    datagrams' first message gets one NEWGEN per commit and nothing else."""
    from tests.nft_rulesets import NftNS, bench_services, endpoints_changed, ruleset

    services = bench_services(300, 5)
    commits = [ruleset(services)] + [endpoints_changed(services[k], [("10.250.0.1", 8080)]) for k in range(5)]
    with NftNS() as ns:
        def subscribe_then_commit():
            everything = NftMonitor()
            announcements = NftMonitor(monitor.ANNOUNCEMENT_BUFFER, announcements_only=True)
            try:
                for text in commits:
                    ns.nft(text)
                return _datagrams(everything.sock), _datagrams(announcements.sock)
            finally:
                everything.close()
                announcements.close()

        every, announced = ns.run(subscribe_then_commit)
    every = [_messages(d) for d in every]
    with_newgen = [commands for commands in every if monitor.NFT_MSG_NEWGEN in commands]
    assert with_newgen == [[monitor.NFT_MSG_NEWGEN]] * len(commits)
    assert sum(commands.count(12) for commands in every) >= 300  # NEWSETELEM: the maps' elements
    assert max(map(len, every)) > 1  # the others coalesced
    assert [_messages(d) for d in announced] == [[monitor.NFT_MSG_NEWGEN]] * len(commits)


def test_elements_of_the_followed_sets_come_one_by_one_decodable_as_a_dump_decodes_them():
    """``elements_of``: each element added or deleted in a followed set is its own "newelem" /
    "delelem" event, in order, whose body decodes (``element_of``, the dumps' decoder) to the
    key and verdict written; a flushed map is one "delelem" per element (as this kernel
    announces it); a set not followed still gives one "elements" event."""
    from exporter.readers.nftables_netlink import NFT_GOTO, Verdict, element_of
    from tests.nft_rulesets import NftNS, bench_services, ruleset

    with NftNS() as ns:
        ns.nft(ruleset(bench_services(3)))

        def events():
            feed = NftMonitor(monitor.ANNOUNCEMENT_BUFFER, sets=True, elements_of=frozenset({"service-ips"}))
            try:
                ns.nft("add element ip kube-proxy service-ips { 172.30.9.9 . tcp . 80 : goto reject-chain }\n"
                       "add element ip kube-proxy cluster-ips { 172.30.9.9 }\n")
                ns.nft("delete element ip kube-proxy service-ips { 172.30.9.9 . tcp . 80 }\n")
                ns.nft("flush map ip kube-proxy service-ips\n")
                drained = feed.drain()
            finally:
                feed.close()
            assert drained.resync is None
            return [[e for e in batch.tables[(socket.AF_INET, "kube-proxy")]] for batch in drained.batches]

        added, deleted, flushed = ns.run(events)
    key = bytes([172, 30, 9, 9, 6, 0, 0, 0, 0, 80, 0, 0])
    assert [(e.kind, e.chain) for e in added] == [("newelem", "service-ips"), ("elements", "cluster-ips")]
    assert element_of(added[0].body)[:2] == (key, Verdict(NFT_GOTO, "reject-chain"))
    assert [(e.kind, element_of(e.body).key) for e in deleted] == [("delelem", key)]
    assert sorted(element_of(e.body).key[:4] for e in flushed) == [bytes([172, 30, 0, i]) for i in (1, 2, 3)]
    assert {e.kind for e in flushed} == {"delelem"}
