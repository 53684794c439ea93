"""The nftables reader on real nf_tables rules, in a network namespace of the test's own.

Rulesets: tests/fixtures/nftables/overall-v1.31.nft (kube-proxy's
TestOverallNFTablesRules, see its header) and tests/nft_rulesets.py (the newest
layout, both families). Loaded with `nft -f` inside the namespace, read from a
thread that joined it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.dataplane import RealServer, RealServers, VirtualServer, VirtualServerKey
from exporter.readers.nftables import SCHEDULER, NftablesReader
from exporter.readers.nftables_netlink import NftReadError
from tests.nft_rulesets import NftNS, ServicePort, endpoints_changed, generated_services, ruleset

FIXTURES = Path(__file__).parent / "fixtures" / "nftables"


@pytest.fixture
def ns():
    with NftNS() as namespace:
        yield namespace


def vs(protocol, address, port, service, endpoints, timeout=None):
    key = VirtualServerKey(protocol, address, port)
    return key, VirtualServer(key, SCHEDULER, timeout,
                              {(a, p): RealServer(a, p) for a, p in sorted(endpoints)}, service)


def tcp(address, port, service, endpoints, timeout=None):
    return vs("TCP", address, port, service, endpoints, timeout)


def test_kube_proxy_overall_fixture(ns):
    ns.nft((FIXTURES / "overall-v1.31.nft").read_text())
    read = ns.run(NftablesReader().read)
    ep = ("10.180.0.3", 80)
    assert read.table == dict([
        tcp("172.30.0.41", 80, "ns1/svc1", [("10.180.0.1", 80)]),
        tcp("172.30.0.42", 80, "ns2/svc2", [("10.180.0.2", 80)]),
        # externalTrafficPolicy Local, no endpoint on this node: the external chain
        # only short-circuits, and the no-endpoint map drops these frontends.
        tcp("192.168.99.22", 80, "ns2/svc2", []),
        tcp("1.2.3.4", 80, "ns2/svc2", []),
        tcp(None, 3001, "ns2/svc2", []),
        tcp("172.30.0.43", 80, "ns3/svc3", [ep]),
        tcp(None, 3003, "ns3/svc3", [ep]),
        tcp("172.30.0.44", 80, "ns4/svc4", [("10.180.0.4", 80), ("10.180.0.5", 80)]),
        tcp("192.168.99.33", 80, "ns4/svc4", [("10.180.0.4", 80), ("10.180.0.5", 80)]),
        tcp("172.30.0.45", 80, "ns5/svc5", [ep], 10800),
        tcp("5.6.7.8", 80, "ns5/svc5", [ep], 10800),
        tcp(None, 3002, "ns5/svc5", [ep], 10800),
    ])
    assert read.rejected == {
        VirtualServerKey("TCP", "1.2.3.4", 80): "drop",
        VirtualServerKey("TCP", "192.168.99.22", 80): "drop",
        VirtualServerKey("TCP", None, 3001): "drop",
        VirtualServerKey("TCP", "172.30.0.46", 80): "reject",
    }
    assert read.firewalled == {VirtualServerKey("TCP", "5.6.7.8", 80)}
    assert read.unread == ()
    sizes = read.sizes["ip"]
    assert (sizes.service_ips, sizes.service_nodeports, sizes.no_endpoint_services,
            sizes.no_endpoint_nodeports, sizes.chains, sizes.rules) == (9, 3, 3, 1, 32, 57)
    assert set(read.sizes) == {"ip"}


@pytest.mark.parametrize("by_key_from_sets", [0, 10**9], ids=["by-key", "dump"])
def test_newest_layout_both_families(ns, by_key_from_sets):
    ns.nft(ruleset(generated_services(), "ip"))
    ns.nft(ruleset([ServicePort("ns1", "svc1", "fd00:10:96::41", [("fd00:10::1", 80), ("fd00:10::2", 80)],
                                external_ips=["2001:db8::99"], affinity_timeout=60)], "ip6"))
    read = ns.run(NftablesReader(by_key_from_sets=by_key_from_sets).read)
    aff = [("10.180.0.3", 80), ("10.180.0.4", 80)]
    v6 = [("fd00:10::1", 80), ("fd00:10::2", 80)]
    assert read.table == dict([
        tcp("172.30.0.41", 80, "ns1/svc1", [("10.180.0.1", 80), ("10.180.0.9", 80)]),
        tcp("172.30.0.42", 80, "ns2/svc2", [("10.180.0.2", 80)]),
        tcp("192.168.99.22", 80, "ns2/svc2", []),
        tcp("1.2.3.4", 80, "ns2/svc2", []),
        tcp(None, 3001, "ns2/svc2", []),
        tcp("172.30.0.45", 80, "ns5/svc5", aff, 10800),
        tcp("5.6.7.8", 80, "ns5/svc5", aff, 10800),
        tcp(None, 3002, "ns5/svc5", aff, 10800),
        vs("UDP", "172.30.0.47", 53, "ns7/dns", [("10.180.0.7", 53), ("10.180.0.8", 53)]),
        # externalTrafficPolicy Local: the NodePort reaches this node's endpoint only.
        vs("UDP", None, 3007, "ns7/dns", [("10.180.0.7", 53)]),
        tcp("fd00:10:96::41", 80, "ns1/svc1", v6, 60),
        tcp("2001:db8::99", 80, "ns1/svc1", v6, 60),
    ])
    assert read.rejected == {
        VirtualServerKey("TCP", "1.2.3.4", 80): "drop",
        VirtualServerKey("TCP", "192.168.99.22", 80): "drop",
        VirtualServerKey("TCP", None, 3001): "drop",
        VirtualServerKey("TCP", "172.30.0.46", 80): "reject",
    }
    assert read.firewalled == {VirtualServerKey("TCP", "5.6.7.8", 80)}
    assert read.unread == ()
    assert set(read.sizes) == {"ip", "ip6"}


def test_generation_check_skips_work_and_notices_a_change(ns):
    services = generated_services()
    ns.nft(ruleset(services))
    reader = NftablesReader()
    first = ns.run(reader.read)
    assert first.reread and reader.anonymous_sets_read >= 4

    again = ns.run(reader.read)
    assert not again.reread
    assert again.table is first.table and again.generation == first.generation

    ns.nft(endpoints_changed(services[0], [("10.180.0.1", 80), ("10.180.0.10", 80)]))
    changed = ns.run(reader.read)
    assert changed.reread and changed.generation != first.generation
    assert changed.table[VirtualServerKey("TCP", "172.30.0.41", 80)].real_servers.keys() == {
        ("10.180.0.1", 80), ("10.180.0.10", 80)}
    # Only the rewritten service chain's rules are new: the rest is not decoded or fetched again,
    # and the change feed named that chain: it alone was dumped, nothing read whole again.
    assert reader.decoded_rules == 2 and reader.anonymous_sets_read == 1
    assert reader.chains_dumped == 1 and reader.whole_reads == 1
    assert {k: v for k, v in changed.table.items() if k.address != "172.30.0.41"} == {
        k: v for k, v in first.table.items() if k.address != "172.30.0.41"}


def test_a_family_that_failed_to_read_is_read_again_on_the_next_call(ns, monkeypatch):
    """One family's dump failed (a timeout): that read names it unread, and the next call
    reads again at the same generation instead of serving the unread family until the
    generation moves or the safety interval passes."""
    from exporter.readers import nftables
    from exporter.readers.nftables_netlink import NftConversationError

    ns.nft(ruleset(generated_services(), "ip"))
    ns.nft(ruleset([ServicePort("ns1", "svc1", "fd00:10:96::41", [("fd00:10::1", 80)])], "ip6"))
    real = nftables._NetlinkFamily
    failures = ["ip6"]

    def once(nl, family_name, *args):
        if family_name in failures:
            failures.remove(family_name)
            raise NftConversationError("no answer from nf_tables within 5 s (the rules)")  # as _socket_error says
        return real(nl, family_name, *args)

    monkeypatch.setattr(nftables, "_NetlinkFamily", once)
    reader = NftablesReader()
    failed = ns.run(reader.read)
    assert failed.unread == ("ip6 kube-proxy: no answer from nf_tables within 5 s (the rules)",)
    assert set(failed.sizes) == {"ip"}
    again = ns.run(reader.read)
    assert again.reread and again.unread == () and set(again.sizes) == {"ip", "ip6"}
    assert VirtualServerKey("TCP", "fd00:10:96::41", 80) in again.table
    assert not ns.run(reader.read).reread  # whole now: kept until the generation moves


def test_a_family_whose_own_rules_fail_is_said_again_not_read_again_until_the_generation_moves(ns):
    """A family whose table fails by its own content (maps missing: not kube-proxy's
    layout) fails the same way while the generation stays: its line is said again from
    the read that met it, and the other family served, without reading anything again
    (beside 10,000 Services, a re-read per scrape: 0.23 s of CPU, for the same line). Once
    the generation moves, or the safety interval passes, both are read again."""
    ns.nft(ruleset([ServicePort("ns1", "svc1", "fd00:10:96::41", [("fd00:10::1", 80)])], "ip6"))
    ns.nft('add table ip kube-proxy { comment "rules for kube-proxy" ; }\n'
           "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n")
    now = [0.0]
    reader = NftablesReader(safety_interval=60, clock=lambda: now[0])
    first = ns.run(reader.read)
    assert first.reread and len(first.unread) == 1 and first.unread[0].startswith("ip kube-proxy: map service-nodeports")
    again = ns.run(reader.read)
    assert not again.reread and again.unread == first.unread and again.table == first.table
    now[0] = 61
    assert ns.run(reader.read).reread  # the safety interval, as for a whole read
    ns.nft(ruleset(generated_services(), "ip"))  # the generation moves: kube-proxy's layout now
    mended = ns.run(reader.read)
    assert mended.reread and mended.unread == () and set(mended.sizes) == {"ip", "ip6"}


def test_safety_interval_reads_again_without_a_change(ns):
    ns.nft(ruleset(generated_services()))
    now = [0.0]
    reader = NftablesReader(safety_interval=60, clock=lambda: now[0])
    first = ns.run(reader.read)
    now[0] = 59
    assert not ns.run(reader.read).reread
    now[0] = 61
    again = ns.run(reader.read)
    assert again.reread and again.table == first.table


def test_another_agents_tables_beside_it_change_nothing(ns):
    ns.nft(ruleset(generated_services()))
    alone = ns.run(NftablesReader().read)
    ns.nft("""
add table inet firewalld
add chain inet firewalld filter_INPUT { type filter hook input priority 10 ; }
add rule inet firewalld filter_INPUT tcp dport 22 accept
add table ip nat
add chain ip nat PREROUTING { type nat hook prerouting priority -100 ; }
add rule ip nat PREROUTING tcp dport 8080 dnat to 10.9.9.9:80
""")
    beside = ns.run(NftablesReader().read)
    assert beside.table == alone.table and beside.rejected == alone.rejected and beside.unread == ()


def test_no_kube_proxy_table_is_an_error_not_an_empty_table(ns):
    ns.nft("add table ip filter\n")
    with pytest.raises(NftReadError, match="no kube-proxy nftables table"):
        ns.run(NftablesReader().read)


def test_half_programmed_table(ns):
    ns.nft('add table ip kube-proxy { comment "rules for kube-proxy" ; }\n'
           "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n")
    with pytest.raises(NftReadError, match="service-nodeports, no-endpoint-services, no-endpoint-nodeports missing"):
        ns.run(NftablesReader().read)
    # One family whole, the other half there: the whole one is read, the other named as unread.
    ns.nft(ruleset([ServicePort("ns1", "svc1", "fd00:10:96::41", [("fd00:10::1", 80)])], "ip6"))
    read = ns.run(NftablesReader().read)
    assert set(read.sizes) == {"ip6"} and len(read.table) == 1
    assert len(read.unread) == 1 and read.unread[0].startswith("ip kube-proxy: map service-nodeports")


def test_unknown_chain_names_are_unread_not_dropped(ns):
    ns.nft(ruleset(generated_services()))
    ns.nft("add chain ip kube-proxy someone-elses-chain\n"
           "add rule ip kube-proxy someone-elses-chain meta l4proto tcp dnat to 10.9.9.9:80\n"
           "add element ip kube-proxy service-ips { 172.30.9.9 . tcp . 80 : goto someone-elses-chain }\n")
    read = ns.run(NftablesReader().read)
    assert VirtualServerKey("TCP", "172.30.9.9", 80) not in read.table
    assert read.unread == ("ip kube-proxy: TCP 172.30.9.9:80: chain 'someone-elses-chain' is not one of kube-proxy's",)
    assert VirtualServerKey("TCP", "172.30.0.41", 80) in read.table


def test_missing_comments_keep_the_verdict(ns):
    text = ruleset(generated_services()).replace(' comment "ns6/svc6:p80"', "")
    assert "ns6/svc6:p80" not in text
    ns.nft(text)
    read = ns.run(NftablesReader().read)
    assert read.rejected[VirtualServerKey("TCP", "172.30.0.46", 80)] == "reject"
    assert read.unread == ()


def test_a_flushed_service_chain_reads_as_no_endpoints(ns):
    """The frontend still goes to the chain, the chain sends nowhere: empty, not missing."""
    services = generated_services()
    ns.nft(ruleset(services))
    ns.nft(f"flush chain ip kube-proxy {services[0].chain('service')}\n")
    read = ns.run(NftablesReader().read)
    assert read.table[VirtualServerKey("TCP", "172.30.0.41", 80)].real_servers == {}


def test_a_numgen_map_missing_a_key_is_still_read_whole(ns):
    """Keys 0..N-1 are asked for by key; a map without one of them is dumped instead."""
    services = generated_services()
    ns.nft(ruleset(services))
    chain = services[0].chain("service")
    ns.nft(f"flush chain ip kube-proxy {chain}\n"
           f"add rule ip kube-proxy {chain} meta l4proto tcp dnat ip to numgen random mod 3 "
           "map { 0 : 10.180.0.1 . 80, 2 : 10.180.0.5 . 80 }\n")
    for by_key_from_sets in (0, 10**9):  # asked for by key (large tables), dumped (small ones)
        read = ns.run(NftablesReader(by_key_from_sets=by_key_from_sets).read)
        assert read.table[VirtualServerKey("TCP", "172.30.0.41", 80)].real_servers.keys() == {
            ("10.180.0.1", 80), ("10.180.0.5", 80)}
        assert read.unread == ()


def test_a_flushed_table_is_read_as_empty_and_a_deleted_one_is_an_error(ns):
    """firewalld's reload flushes or deletes other tables. `flush table` empties every
    chain but leaves the maps' elements: each frontend is read, and sends nowhere. A
    deleted table cannot be read at all."""
    ns.nft(ruleset(generated_services()))
    reader = NftablesReader()
    before = ns.run(reader.read)
    assert any(vs.real_servers for vs in before.table.values())
    ns.nft("flush table ip kube-proxy\n")
    flushed = ns.run(reader.read)
    assert flushed.reread and flushed.table.keys() == before.table.keys() and flushed.unread == ()
    assert all(vs.real_servers == {} for vs in flushed.table.values())
    # Map verdicts stay; reject-chain is empty now, so what went there is no longer rejected.
    assert flushed.rejected == {k: v for k, v in before.rejected.items() if v == "drop"}
    assert VirtualServerKey("TCP", "172.30.0.46", 80) in before.rejected
    assert flushed.sizes["ip"].rules == 0 and flushed.sizes["ip"].service_ips == before.sizes["ip"].service_ips
    ns.nft("delete table ip kube-proxy\n")
    with pytest.raises(NftReadError, match="no kube-proxy nftables table"):
        ns.run(reader.read)


def test_what_the_reader_keeps_per_chain_is_a_sorted_tuple(ns):
    """A resolved chain is kept between reads (reused while its rules keep their handles):
    its endpoints as one sorted flat RealServers, its frontend's own (a frozenset of five is nine times the
    bytes). Equal endpoints are still recognised: an unchanged frontend is the same object
    on a re-read, and a changed one has its new endpoints."""
    services = generated_services()
    ns.nft(ruleset(services))
    reader = NftablesReader(safety_interval=0.0)  # every read reads the rules again
    first = ns.run(reader.read)
    kept = [resolved for cache in reader._families.values()
            for resolved, _chain, _vs in cache.resolver.frontends.values()]
    kept += [resolved for cache in reader._families.values() for _handles, resolved in cache.resolver.leaves.values()]
    assert kept and any(resolved.real_servers for resolved in kept)
    assert all(type(r.real_servers) is RealServers and list(r.real_servers) == sorted(set(r.real_servers))
               for r in kept)
    # A frontend's virtual server holds its chain's resolved real servers, not a copy.
    assert all(vs.real_servers is resolved.real_servers for cache in reader._families.values()
               for resolved, _chain, vs in cache.resolver.frontends.values())
    again = ns.run(reader.read)
    assert again.reread and all(again.table[k] is v for k, v in first.table.items())
    ns.nft(endpoints_changed(services[0], [("10.180.0.1", 80), ("10.180.0.10", 80)]))
    changed = ns.run(reader.read)
    assert changed.table[VirtualServerKey("TCP", "172.30.0.41", 80)].real_servers.keys() == {
        ("10.180.0.1", 80), ("10.180.0.10", 80)}


def _frontends(services) -> dict:
    """What kube-proxy's rules for ``services`` (bench_services: ClusterIP, every tenth a
    NodePort too; no affinity, no Local policy) read as: frontend -> its endpoints."""
    out = {}
    for svc in services:
        endpoints = frozenset(svc.endpoints)
        out[VirtualServerKey("TCP", svc.cluster_ip, svc.port)] = endpoints
        if svc.node_port:
            out[VirtualServerKey("TCP", None, svc.node_port)] = endpoints
    return out


def race(sync: str, syncs: int, reader: NftablesReader | None = None):
    """``syncs`` kube-proxy syncs of 1,000 Services back to back on a thread (one `nft -f`
    transaction each, one Service's endpoints changed each time; "full": the whole table
    flushed and written again, as kube-proxy's full sync) while this thread reads through
    ``NftablesDataplane.read_rules(max_age=0)`` as fast as it can. Each sync is one commit,
    so a read's generation says how many syncs it must show; none changes the table's
    sizes (a Service's chain keeps one rule, the maps their elements). Returns the reads
    served, the wrong ones ((syncs its generation names, how: "ahead" the next sync's
    rules, "behind" the last but one's, "unread", "sizes" the right frontends but other
    counts, or "mixed"), one per read), the failures' reasons, the quiet read once the
    syncs stopped, a fresh reader's read then, and what the syncs should have left."""
    import copy
    import threading

    from exporter.readers.dataplanes import NftablesDataplane, ReadFailed
    from tests.nft_rulesets import bench_services

    services = bench_services(1000, 5)
    with NftNS() as ns:
        ns.nft(ruleset(services))
        changes, states = [], [_frontends(services)]
        for k in range(1, syncs + 1):
            svc = services[(k * 37) % len(services)]
            endpoints = list(svc.endpoints)
            endpoints[k % len(endpoints)] = (f"10.250.{k // 250}.{k % 250}", 8080)
            text = endpoints_changed(svc, endpoints)
            if sync == "full":
                text = "flush table ip kube-proxy\n" + ruleset(copy.deepcopy(services))
            changes.append(text)
            states.append(_frontends(services))
        dataplane = NftablesDataplane(reader)
        try:
            first = ns.run(lambda: dataplane.read_rules(max_age=0))
            assert not first.unread and _endpoints(first.table) == states[0]
            syncing = threading.Thread(target=lambda: [ns.nft(text) for text in changes])
            syncing.start()
            reads, wrong, failed = 0, [], []
            while syncing.is_alive():
                try:
                    read = ns.run(lambda: dataplane.read_rules(max_age=0))
                except ReadFailed as err:
                    failed.append(str(err))
                    continue
                reads += 1
                synced = (read.generation - first.generation) & 0xFFFFFFFF
                got = _endpoints(read.table)
                if synced >= len(states) or read.unread or got != states[synced] or read.sizes != first.sizes:
                    wrong.append((synced, _how_wrong(read, got, states, synced)))
            syncing.join()
            quiet = ns.run(lambda: dataplane.read_rules(max_age=0))
            fresh = ns.run(NftablesReader(announcements=False).read)
            return reads, wrong, failed, quiet, fresh, states[-1]
        finally:
            dataplane.close()


def _endpoints(table) -> dict:
    return {key: frozenset(vs.real_servers.keys()) for key, vs in table.items()}


def _how_wrong(read, got: dict, states: list, synced: int) -> str:
    if read.unread:
        return "unread"
    if synced < len(states) and got == states[synced]:
        return "sizes"
    if synced + 1 < len(states) and got == states[synced + 1]:
        return "ahead"
    if 0 < synced < len(states) and got == states[synced - 1]:
        return "behind"
    return "mixed"


def test_reads_beside_back_to_back_partial_syncs_are_each_the_kernels():
    """kube-proxy's partial syncs back to back while the exporter reads as fast as it can
    (``race``). Before: a read done again because the generation moved was served
    unchecked (the next sync's rules under the number before it, or a Service's chain
    caught flushed and not yet written: no endpoints), and a rule dump resumed by position
    while a transaction was being prepared held rules twice (the generation moves only
    at its commit): 6-14 of 80-151 reads wrong per run. Every read served must be exactly
    the rules of the generation it names; a read may fail when syncs land during each of
    its tries (kube-proxy spaces them a second apart; these come back to back), with that
    reason; and once the syncs stop, the read equals a fresh reader's."""
    reads, wrong, failed, quiet, fresh, final = race("partial", 60)
    # Back to back, most reads meet a commit on each try (7-66 served, 10-15 failed, per
    # run here): enough tries that a wrong read would have been served, a few served.
    assert reads + len(failed) >= 15 and reads >= 3, f"only {reads} reads and {len(failed)} failures beside the syncs"
    assert not wrong, f"{len(wrong)} of {reads} reads served not the kernel's (syncs, how): {wrong[:5]}"
    assert all("during each of 3 reads in a row" in reason for reason in failed), failed[:2]
    assert not quiet.unread and quiet.table == fresh.table and quiet.generation == fresh.generation
    assert _endpoints(quiet.table) == final


def test_without_announcements_the_generation_alone_fences_said_once(ns, monkeypatch, caplog):
    """A kernel that refuses the subscription (or the filter): reads go on as before the
    announcements, fenced by the generation alone, and the log says so once."""
    import logging

    from exporter.readers import nftables
    from exporter.readers.nftables_monitor import FeedError

    def refused(*args, **kwargs):
        raise FeedError("cannot subscribe to nf_tables changes: Operation not permitted")

    monkeypatch.setattr(nftables, "NftMonitor", refused)
    services = generated_services()
    ns.nft(ruleset(services))
    reader = NftablesReader()
    with caplog.at_level(logging.WARNING, logger="exporter.readers.nftables"):
        first = ns.run(reader.read)
        assert not ns.run(reader.read).reread
        ns.nft(endpoints_changed(services[0], [("10.180.0.1", 80), ("10.180.0.10", 80)]))
        changed = ns.run(reader.read)
    assert changed.reread and changed.generation != first.generation
    assert [r.getMessage() for r in caplog.records] == [
        "nftables reads are fenced by the ruleset generation alone: "
        "cannot subscribe to nf_tables changes: Operation not permitted"]


def _numbered_early(monkeypatch):
    """GETGEN answers the number of the next commit before it is applied, as the kernel
    does while a commit is being applied (the window lasts microseconds to a tenth of a
    second here: held open for the test). Returns the arming function: ``arm(generation)``."""
    from exporter.readers import nftables_netlink
    from exporter.readers.nftables_monitor import newer

    real = nftables_netlink.NftNetlink.generation
    early: list[int] = []

    def generation(self) -> int:
        now = real(self)
        return early[0] if early and newer(early[0], now) else now

    monkeypatch.setattr(nftables_netlink.NftNetlink, "generation", generation)
    return early.append


def _commit_later(ns, text: str, seconds: float):
    import threading

    timer = threading.Timer(seconds, ns.nft, (text,))
    timer.start()
    return timer


def test_a_generation_numbered_before_its_commit_is_applied_is_read_once_announced(ns, monkeypatch):
    """The reader asks for the generation while a commit is numbered and not applied yet:
    it waits for the commit's announcement before dumping, so the read named after the
    commit holds it (before: the rules from before the commit, under its number)."""
    services = generated_services()
    ns.nft(ruleset(services))
    reader = NftablesReader()
    ns.run(reader.read)
    ns.nft(endpoints_changed(services[0], [("10.180.0.1", 80), ("10.180.0.10", 80)]))
    before = ns.run(reader.read)  # the subscription has announced a commit now
    arm = _numbered_early(monkeypatch)
    arm(before.generation + 1)
    commit = _commit_later(ns, endpoints_changed(services[0], [("10.180.0.11", 80)]), 0.3)
    try:
        read = ns.run(reader.read)
    finally:
        commit.join()
    assert read.generation == before.generation + 1
    assert read.table[VirtualServerKey("TCP", "172.30.0.41", 80)].real_servers.keys() == {("10.180.0.11", 80)}


def test_a_read_whose_generation_is_announced_after_it_is_not_kept_as_unchanged(ns, monkeypatch):
    """The commit takes longer than the reader waits for its announcement: that read is
    served as it was dumped, but once the commit is announced the next read reads again,
    though the generation did not move since (before: the read from before the commit was
    kept as "unchanged" under the commit's number, up to safety_interval)."""
    from exporter.readers import nftables

    services = generated_services()
    ns.nft(ruleset(services))
    reader = NftablesReader()
    ns.run(reader.read)
    ns.nft(endpoints_changed(services[0], [("10.180.0.1", 80), ("10.180.0.10", 80)]))
    before = ns.run(reader.read)
    monkeypatch.setattr(nftables, "FEED_WAIT_SECONDS", 0.05)
    arm = _numbered_early(monkeypatch)
    arm(before.generation + 1)
    commit = _commit_later(ns, endpoints_changed(services[0], [("10.180.0.11", 80)]), 0.3)
    early = ns.run(reader.read)
    commit.join()
    assert early.generation == before.generation + 1  # dumped before the commit applied
    again = ns.run(reader.read)
    assert again.reread and again.generation == early.generation
    assert again.table[VirtualServerKey("TCP", "172.30.0.41", 80)].real_servers.keys() == {("10.180.0.11", 80)}
    assert not ns.run(reader.read).reread  # settled now: kept


def test_dumps_and_reads_beside_aborted_transactions_are_each_the_kernels():
    """Transactions that prepare 3,000 rules in the table's first chain and are then
    aborted, beside reads (1,000 Services): nothing ever changes, yet a whole-table rule
    dump resumed while one was prepared counted its rules and repeated or skipped others.
    No generation moves and nothing is announced, so only the dump can say (each rule's
    position, the boundaries between messages dumped again). Before: 12-35 of 49-72
    dumps came back other than the table, and the reader served 1 of 16 reads wrong.
    Every dump returned and every read served must be the table; the tears must have
    been met (else the test proved nothing)."""
    from exporter.readers.nftables_netlink import NftDumpTorn, NftNetlink
    from tests.nft_rulesets import aborted_transactions, bench_services

    services = bench_services(1000, 5)
    with NftNS() as ns:
        ns.nft(ruleset(services))

        def dump():
            with NftNetlink() as nl:
                order = [c.name for c in nl.chains(2, "kube-proxy")]
                rules, _ = nl.each_rule(2, "kube-proxy", lambda buf, chain, handle, e, u: (chain, handle),
                                        order=order)
                return rules

        truth = ns.run(dump)
        aborting = aborted_transactions(ns.path, "ip", "kube-proxy", "cluster-ips-check", 40)
        dumps, other, tears = 0, 0, 0
        while aborting.is_alive():
            try:
                got = ns.run(dump)
            except NftDumpTorn:
                tears += 1
                continue
            dumps += 1
            other += got != truth
        aborting.join()
        assert not aborting.failures, aborting.failures
        assert not other, f"{other} of {dumps} dumps returned not the table's rules"
        assert tears and dumps, f"{tears} tears met, {dumps} dumps returned: the aborts did not overlap the dumps"

        good = ns.run(NftablesReader(announcements=False).read).table
        reader = NftablesReader()
        aborting = aborted_transactions(ns.path, "ip", "kube-proxy", "cluster-ips-check", 40)
        reads, wrong, failed = 0, 0, []
        try:
            while aborting.is_alive():
                reader._last = None  # a read of the kernel each time, not the kept one
                try:
                    read = ns.run(reader.read)
                except NftReadError as err:
                    failed.append(str(err))
                    continue
                reads += 1
                wrong += bool(read.unread) or read.table != good
        finally:
            aborting.join()
            reader.close()
        assert reads and reader.overlapped, f"{reads} reads, {reader.overlapped} read again"
        assert not wrong, f"{wrong} of {reads} reads served not the table"
        # A read torn on each of its tries fails, saying so; never with another reason.
        assert all("during each of 3 reads in a row" in reason for reason in failed), failed[:2]


def _compare(read, whole, what: str) -> None:
    """``read`` (a long-lived reader's) says exactly what ``whole`` (a fresh reader's) says."""
    for field in ("table", "rejected", "firewalled", "unread", "sizes", "generation"):
        assert getattr(read, field) == getattr(whole, field), f"after {what}: {field} differs"


def test_reads_of_what_changed_equal_whole_reads_through_random_changes(monkeypatch):
    """A long random sequence of kube-proxy-like changes in both families (endpoints changed,
    a Local Service's local chain rewritten, a Service added, one deleted and its flushed
    chains aged out, a Service's endpoints gone to zero and back (its map elements moved
    between service-ips / service-nodeports and the no-endpoint maps), a chain flushed,
    renamed or deleted behind kube-proxy's back, the whole table flushed and written again):
    after each, the reader that read the last state (re-reading only what the change feed
    names, map elements included, whole when it cannot say) gives exactly what a fresh
    reader's whole read gives. Only a rename (a frontend unread, then a read after it) and
    reject-chain turned to drop or back (behind kube-proxy's back, or by its next sync) read
    whole; every other kind reads what changed, counted and printed by kind. Now and then
    the next change commits under the read of the last one (its first chain dump): that
    read tries again from what it had read, never whole."""
    import copy
    import random

    from exporter.readers import nftables

    from tests.nft_rulesets import (bench_services, endpoints_synced, generated_services_v6, service_resynced,
                                    service_rules)

    rng = random.Random(20261207)
    bench, bench6 = bench_services(60), bench_services(30, family="ip6")  # NodePorts 30000.. in both
    for svc in bench + bench6:  # beside generated_services' (same names, 172.30.0.4x)
        svc.name = f"b{svc.name}"
        svc.cluster_ip = svc.cluster_ip.replace("172.30.", "172.29.", 1)
    live = {"ip": generated_services() + bench, "ip6": generated_services_v6() + bench6}
    stale: list[tuple[str, ServicePort]] = []
    zeroed: list[ServicePort] = []  # endpoints gone to zero by a sync (their no-endpoint elements in place)
    added = 0

    def script(family: str, svc: ServicePort, kinds=("sets", "chains", "rules", "elements")) -> str:
        lines = service_rules(svc, family)
        return "\n".join(line for kind in kinds for line in lines[kind]) + "\n"

    # Services only the changes committed under a read touch: one that rewrote a Service
    # the read itself was reading (its anonymous map gone under the read) fails that try,
    # which is then read again whole, as it should be.
    under_read_only = {id(svc) for svc in bench[-8:] + bench6[-4:]}

    def plain(family: str, under_read: bool = False) -> list[ServicePort]:
        return [s for s in live[family] if s.affinity_timeout is None and s not in zeroed
                and (id(s) in under_read_only) == under_read]

    def new_endpoints(family: str) -> list[tuple[str, int]]:
        base = "10.77" if family == "ip" else "fd00:77:"
        return sorted({(f"{base}.{rng.randrange(250)}.{rng.randrange(1, 250)}" if family == "ip"
                        else f"fd00:77::{rng.randrange(1, 65535):x}", 8080) for _ in range(rng.randrange(1, 5))})

    def change(family: str) -> tuple[str, str | tuple[str, ...]]:
        op = rng.choice(["endpoints"] * 8 + ["local", "add", "add", "delete", "delete", "age", "flush-chain",
                                             "delete-chain", "rename", "flush-table", "reject-chain",
                                             "zero", "zero", "revive", "revive"])
        return op, do(op, family)

    def do(op: str, family: str) -> str | tuple[str, ...]:
        nonlocal added
        if op == "endpoints":
            svc = rng.choice(plain(family))
            sync = rng.choice([endpoints_changed, endpoints_synced])
            return sync(svc, new_endpoints(family), family)
        if op == "zero":  # a single-replica Deployment's pod fails readiness: 1 -> 0
            candidates = [s for s in plain(family) if s.endpoints and not s.local]
            if not candidates:
                return ""
            svc = rng.choice(candidates)
            before = service_rules(svc, family)
            svc.endpoints = []
            zeroed.append(svc)
            return service_resynced(svc, before, family)
        if op == "revive":  # and ready again: 0 -> N
            candidates = [s for s in zeroed if s in live[family]]
            if not candidates:
                return ""
            svc = rng.choice(candidates)
            zeroed.remove(svc)
            before = service_rules(svc, family)
            svc.endpoints = new_endpoints(family)
            return service_resynced(svc, before, family)
        if op == "local":
            # (with endpoints: a Local Service without any has an empty local chain already)
            candidates = [s for s in live[family] if s.local and s.local_endpoints and s.endpoints]
            if not candidates:
                return ""
            svc = rng.choice(candidates)
            svc.local_endpoints = svc.endpoints[:1] if len(svc.local_endpoints) > 1 else list(svc.endpoints)
            chain = svc.chain("local")
            rules = [line for line in service_rules(svc, family)["rules"] if f" {chain} " in line]
            return "\n".join([f"flush chain {family} kube-proxy {chain}", *rules]) + "\n"
        if op == "add":
            added += 1
            new = copy.deepcopy(rng.choice(bench_services(5, family=family)))
            new.name = f"added{added}"
            new.cluster_ip = f"172.31.0.{added}" if family == "ip" else f"fd00:10:97::{added:x}"
            new.node_port = 31000 + added if new.node_port else None
            kind = rng.choice(["plain", "plain", "source-ranges", "affinity"])
            if kind == "source-ranges":  # a LoadBalancer: its firewall chain and firewall-ips element
                new.lb_ips = [f"198.18.0.{added}" if family == "ip" else f"2001:db8:18::{added:x}"]
                new.source_ranges = ["203.0.113.0/25" if family == "ip" else "2001:db8:77::/48"]
            elif kind == "affinity":  # new affinity sets beside its chains
                new.affinity_timeout = rng.choice([60, 10800])
            live[family].append(new)
            return script(family, new)
        if op == "delete":
            svc = rng.choice([s for s in live[family] if s.name.startswith(("bsvc", "added")) and s.endpoints
                              and id(s) not in under_read_only
                              and s.affinity_timeout is None and not s.local
                              and (not s.lb_ips or s.name.startswith("added"))])
            live[family].remove(svc)
            stale.append((family, svc))
            lines = service_rules(svc, family)
            out = [line.replace("add element", "delete element", 1).split(" : ")[0].split(" }")[0] + " }"
                   for line in lines["elements"]]
            out += [line.replace("add chain", "flush chain", 1) for line in lines["chains"]]
            return "\n".join(out) + "\n"
        if op == "age":
            if not any(f == family for f, _ in stale):
                return ""
            svc = next(s for f, s in stale if f == family)
            stale.remove((family, svc))
            return "\n".join(line.replace("add chain", "delete chain", 1)
                             for line in service_rules(svc, family)["chains"]) + "\n"
        if op == "flush-chain":  # behind kube-proxy's back: the Service's traffic goes nowhere
            candidates = [s for s in plain(family) if s.endpoints]  # an empty chain flushed commits nothing
            if not candidates:
                return ""
            svc = rng.choice(candidates)
            svc.endpoints = []
            return f"flush chain {family} kube-proxy {svc.chain('service')}\n"
        if op == "delete-chain":  # behind its back: an unreferenced chain of its table
            added += 1
            return (f"add chain {family} kube-proxy orphan-{added}\n",
                    f"delete chain {family} kube-proxy orphan-{added}\n")
        if op == "reject-chain":  # behind its back: the no-endpoint verdicts drop, or reject again
            verdict = rng.choice(["drop", "reject"])
            return f"flush chain {family} kube-proxy reject-chain\nadd rule {family} kube-proxy reject-chain {verdict}\n"
        if op == "rename":  # behind its back, then kube-proxy's name back; jumped to by an external chain too
            svc = rng.choice([s for s in plain(family) if s.has_external and s.endpoints])
            return (f"rename chain {family} kube-proxy {svc.chain('service')} renamed\n",
                    f"rename chain {family} kube-proxy renamed {svc.chain('service')}\n")
        # Written again as modelled: a Service whose chain was flushed behind kube-proxy's back
        # is now without endpoints in its maps too.
        zeroed.extend(s for s in live[family] if not s.endpoints and s not in zeroed and s.affinity_timeout is None
                      and not s.local)
        # nft's `flush table` empties chains, not maps: flushed too, so that what is written
        # again (a verdict moved from drop to reject, say) does not meet the old element.
        maps = "".join(f"flush map {family} kube-proxy {m}\n" for m in (
            "service-ips", "service-nodeports", "no-endpoint-services", "no-endpoint-nodeports", "firewall-ips"))
        return f"flush table {family} kube-proxy\n{maps}" + ruleset(live[family], family)

    with NftNS() as ns:
        for family in live:
            ns.nft(ruleset(live[family], family))
        reader = NftablesReader()
        try:
            _compare(ns.run(reader.read), ns.run(NftablesReader(announcements=False).read), "the first read")
            reads: dict[str, int] = {}  # by kind of change
            whole: dict[str, int] = {}
            reasons: list[tuple[str, str]] = []
            elements = 0  # map element changes applied by reads of changes (no commit under them)
            element_reads = 0  # of them, reads of an add, delete, zero or revive
            # Now and then the next change commits while a read of this one dumps its first
            # chain (kube-proxy's next sync under a read): the read tries again, from what
            # it had read, and reads that change alone.
            under_read: list[str] = []  # the change to commit under the next read's first chain dump
            committed_under_read = 0
            dump = nftables._ChainDumps._rules

            def dump_then_commit(self, chain):
                nonlocal committed_under_read
                rules = dump(self, chain)
                if under_read:
                    ns.nft(under_read.pop())
                    committed_under_read += 1
                return rules

            monkeypatch.setattr(nftables._ChainDumps, "_rules", dump_then_commit)
            # Every whole read's reason, not only a read's last: a whole read that a commit
            # overlapped is read whole again ("no read kept to start from"), as it should be.
            read_all, whole_reasons = nftables.NftablesReader._read_all, []

            def read_all_saying_why(self, *args):
                whole_reasons.append(self.whole_reason)
                return read_all(self, *args)

            monkeypatch.setattr(nftables.NftablesReader, "_read_all", read_all_saying_why)
            for step in range(160):
                family = rng.choice(["ip", "ip", "ip6"])
                op, texts = change(family)
                steps = [(op, text) for text in (texts if isinstance(texts, tuple) else (texts,)) if text]
                next_text = None
                if len(steps) == 1 and rng.random() < 0.3:
                    next_op = rng.choice(["endpoints", "endpoints", "add", "delete", "zero", "revive", "local", "age"])
                    if next_op == "endpoints":  # kube-proxy's partial sync (its full one may rewrite reject-chain)
                        next_text = endpoints_changed(rng.choice(plain(family, under_read=True)), new_endpoints(family),
                                                      family)
                    else:
                        next_text = do(next_op, family)
                    if next_text:
                        under_read.append(next_text)
                        steps.append((next_op, next_text))
                for op, text in steps:
                    if text is next_text:
                        if not under_read:
                            continue  # committed under the last read, and read by its next try
                        under_read.clear()  # that read dumped no chain: committed now, read on its own
                    ns.nft(text)
                    whole_reads = reader.whole_reads
                    whole_reasons.clear()
                    committed_before = committed_under_read
                    read = ns.run(reader.read)
                    assert read.reread, f"step {step}: {op} not read: {steps} {committed_under_read} {under_read}"
                    reads[op] = reads.get(op, 0) + 1
                    whole[op] = whole.get(op, 0) + (reader.whole_reads - whole_reads)
                    reasons += [(op, why) for i, why in enumerate(whole_reasons)
                                if not (i and why == "no read kept to start from")]
                    if committed_under_read == committed_before:  # else the last try's count alone
                        elements += reader.elements_applied
                        element_reads += op in ("add", "delete", "zero", "revive")
                    _compare(read, ns.run(NftablesReader(announcements=False).read),
                             f"step {step} ({family}, {op}): {text[:120]!r} (whole: {reader.whole_reason})")
        finally:
            reader.close()
    print(f"reads by kind of change {reads}, of them whole {whole}; {elements} map elements applied; "
          f"{committed_under_read} changes committed under a read, {reader.overlapped} reads tried again")
    assert committed_under_read >= 15 and reader.overlapped >= committed_under_read
    assert sum(reads.values()) >= 140 and all(reads.get(op, 0) >= 5 for op in ("add", "delete", "zero", "revive"))
    # kube-proxy's own sync (endpoints_synced), or the whole table written again, writes
    # reject-chain back after it was turned to drop.
    assert [(op, why) for op, why in reasons if op not in ("rename", "reject-chain")
            and not (op in ("endpoints", "flush-table") and why.startswith("chain reject-chain"))] == []
    assert not any(whole.get(op) for op in ("add", "delete", "zero", "revive")), whole
    # At least one element each (a ClusterIP's; with a NodePort two, and zero and revive move
    # them between maps: four), about four on average across seeds: half that as the floor.
    assert elements >= 2 * element_reads


def test_a_change_feed_that_overflowed_makes_the_next_read_whole_then_reads_of_changes_resume(ns, monkeypatch):
    """The feed's buffer overflows (a full sync while nobody read): the events no longer
    say what changed, so the next read reads every rule again, saying why, and equals a
    fresh reader's; the read after the next small change is of that change alone."""
    from exporter.readers import nftables
    from tests.nft_rulesets import bench_services

    monkeypatch.setattr(nftables, "ANNOUNCEMENT_BUFFER", 4096)  # the kernel's least, doubled
    services = bench_services(200)
    ns.nft(ruleset(services))
    reader = NftablesReader()
    try:
        ns.run(reader.read)
        ns.nft("".join(endpoints_changed(svc, [(a, p + 1) for a, p in svc.endpoints]) for svc in services))
        read = ns.run(reader.read)
        assert reader.whole_reads == 2 and "overflowed" in reader.whole_reason
        assert read.table == ns.run(NftablesReader(announcements=False).read).table
        ns.nft(endpoints_changed(services[3], [("10.99.0.1", 8080)]))
        read = ns.run(reader.read)
        assert reader.whole_reads == 2 and reader.chains_dumped == 1
        assert read.table[VirtualServerKey("TCP", services[3].cluster_ip, 80)].real_servers.keys() == {
            ("10.99.0.1", 8080)}
        assert read.table == ns.run(NftablesReader(announcements=False).read).table
    finally:
        reader.close()


def test_what_reads_of_changes_keep_stays_the_tables_size(ns):
    """Services with session affinity (their chains follow endpoint chains: the reader keeps
    their numgen maps' elements by rule handle): one of them rewritten 30 times, each read
    of that change alone. Before, each change's old rule kept its elements until a whole
    read (80 kept for 50 chains here); now the table's size."""
    from tests.nft_rulesets import bench_services, service_rules

    services = bench_services(50, 2)
    for svc in services:
        svc.affinity_timeout = 30
    ns.nft(ruleset(services))
    reader = NftablesReader()
    try:
        ns.run(reader.read)
        svc = services[3]
        chain = svc.chain("service")
        for _ in range(30):
            rules = [line for line in service_rules(svc)["rules"] if f" {chain} " in line]
            ns.nft("\n".join([f"flush chain ip kube-proxy {chain}", *rules]) + "\n")
            read = ns.run(reader.read)
        assert reader.whole_reads == 1
        assert len(reader._families["ip"].anonymous) == len(services)
        assert read.table == ns.run(NftablesReader(announcements=False).read).table
    finally:
        reader.close()
