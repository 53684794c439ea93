"""nf_tables' change feed (exporter/readers/nftables_monitor.py) and the iptables-nft
source's re-reads that follow it, on real rules in a network namespace of the test's own.

Every re-read is checked against a fresh full read of a source without the feed, chain
by chain, rule by rule; and that it came from the feed (``full_reads`` did not move)
where the feed can say what changed, or from a counted full read where it cannot.
"""

from __future__ import annotations

import subprocess

import pytest

from exporter.readers.iptables_netlink import IptablesNftSource, NftReadError
from exporter.readers.iptables_rules import IptablesRule
from exporter.readers.nftables_monitor import ChainOrder, NftMonitor, Unordered, newer
from tests import ipt_rulesets
from tests.ipt_rulesets import IptNS


@pytest.fixture
def ns():
    with IptNS() as namespace:
        yield namespace


def fresh(ns: IptNS):
    return ns.run(IptablesNftSource(feed=False).read)


def assert_same(read, expected) -> None:
    """Rule by rule, so a failure names the chain."""
    assert [r.family for r in read] == [r.family for r in expected]
    for got, want in zip(read, expected):
        assert set(got.tables) == set(want.tables), got.family
        for table, chains in want.tables.items():
            assert set(got.tables[table]) == set(chains), table
            for chain, rules in chains.items():
                assert got.tables[table][chain] == rules, f"IPv{got.family} {table} {chain}"


def loaded(ns: IptNS, count: int = 60):
    services = ipt_rulesets.bench_services(count, 5)
    ns.load(services)
    ns.load(ipt_rulesets.generated_services_v6(), family=6)
    source = IptablesNftSource()
    ns.run(source.read)
    assert source.full_reads == 1
    return services, source


def nft(ns: IptNS, command: str) -> None:
    subprocess.run(["nsenter", f"--net={ns.path}", "nft", command], check=True, capture_output=True)


# -- kube-proxy's partial sync --------------------------------------------------------

def test_partial_syncs_are_applied_from_the_feed_and_equal_a_full_read(ns):
    services, source = loaded(ns)
    for i in range(3):
        changed = services[i * 7]
        rewrite = ipt_rulesets.endpoints_changed(services, changed, [(a, p + 1) for a, p in changed.endpoints])
        ns.restore(rewrite)
        read = ns.run(source.read)
        assert_same(read, fresh(ns))
        assert source.full_reads == 1, source.last_resync
        # Every rule the restore wrote is new to nf_tables; only the changed Service's
        # KUBE-SVC rules (their comments and targets name the endpoints) and its KUBE-SEP
        # DNATs differ in their bytes from rules it deleted (the SEP's masquerade rules
        # match the endpoint's address alone: the same bytes as before).
        assert source.announced == sum(line.startswith("-A ") for line in rewrite.splitlines())
        assert source.decoded == 5 + 5
    assert source.last_generation == ns.run(source.generation)
    v6 = ipt_rulesets.generated_services_v6()
    changed = next(sp for sp in v6 if sp.endpoints)
    ns.restore(ipt_rulesets.endpoints_changed(v6, changed, [(a, p + 1) for a, p in changed.endpoints], family=6),
               family=6)
    assert_same(ns.run(source.read), fresh(ns))
    assert source.full_reads == 1, source.last_resync
    assert source.decoded > 0


def test_nothing_changed_serves_the_same_rulesets(ns):
    _, source = loaded(ns)
    first = ns.run(source.read)
    assert ns.run(source.read) is first and source.decoded == source.announced == 0
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    again = ns.run(source.read)
    assert again is not first and source.announced == source.decoded == 1
    assert again[0].tables["nat"]["KUBE-MARK-MASQ"][-1] == IptablesRule("RETURN")
    assert source.full_reads == 1


# -- other writers ----------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    ("-t", "nat", "-D", "KUBE-MARK-MASQ", "1"),
    ("-t", "nat", "-D", "KUBE-SERVICES", "5"),
    ("-t", "nat", "-I", "KUBE-SERVICES", "1", "-j", "RETURN"),
    ("-t", "nat", "-I", "KUBE-SERVICES", "4", "-j", "RETURN"),
    ("-t", "nat", "-R", "KUBE-SERVICES", "3", "-j", "ACCEPT"),
    ("-t", "filter", "-A", "KUBE-SERVICES", "-j", "RETURN"),
    ("-t", "nat", "-N", "KUBE-NEW"),
    ("-t", "nat", "-F", "KUBE-NODEPORTS"),
    ("-t", "nat", "-F"),
], ids=["delete", "delete-middle", "insert-head", "insert-middle", "replace", "filter", "new-chain",
        "flush-chain", "flush-nat"])
def test_a_change_by_iptables_is_applied_from_the_feed(ns, change):
    _, source = loaded(ns)
    ns.iptables(*change)
    assert_same(ns.run(source.read), fresh(ns))
    assert source.full_reads == 1, source.last_resync


def test_a_chain_deleted_and_one_renamed(ns):
    _, source = loaded(ns)
    ns.iptables("-t", "nat", "-N", "KUBE-GONE")
    ns.iptables("-t", "nat", "-A", "KUBE-GONE", "-j", "RETURN")
    ns.run(source.read)
    ns.iptables("-t", "nat", "-F", "KUBE-GONE")
    ns.iptables("-t", "nat", "-X", "KUBE-GONE")
    assert_same(ns.run(source.read), fresh(ns))
    assert source.full_reads == 1, source.last_resync
    ns.iptables("-t", "nat", "-E", "KUBE-MARK-MASQ", "KUBE-RENAMED")  # same handle, new name: read whole
    assert_same(ns.run(source.read), fresh(ns))
    assert source.full_reads == 2


def test_a_built_in_chain_flushed_and_deleted_reads_empty(ns):
    _, source = loaded(ns)
    nft(ns, "flush chain ip nat PREROUTING; delete chain ip nat PREROUTING")
    read = ns.run(source.read)
    assert read[0].tables["nat"]["PREROUTING"] == ()
    assert_same(read, fresh(ns))
    assert source.full_reads == 1, source.last_resync


def test_a_replaced_first_rule_keeps_its_handle_and_is_read_anew(ns):
    # nf_tables keeps a replaced rule's handle (iptables -R): no decode kept by handle may
    # be served for it, whether the feed places it or a full read follows.
    _, source = loaded(ns)
    ns.iptables("-t", "nat", "-R", "KUBE-SERVICES", "1", "-j", "ACCEPT")
    read = ns.run(source.read)
    assert_same(read, fresh(ns))
    assert read[0].tables["nat"]["KUBE-SERVICES"][0] == IptablesRule("ACCEPT")


def test_the_nat_table_deleted_and_created_again_is_a_full_read(ns):
    services, source = loaded(ns)
    nft(ns, "delete table ip nat")
    read = ns.run(source.read)
    assert "nat" not in read[0].tables and source.full_reads == 2
    assert_same(read, fresh(ns))
    ns.load(services)
    assert_same(ns.run(source.read), fresh(ns))
    assert source.full_reads == 3


def test_rules_of_tables_the_source_does_not_keep_are_ignored(ns):
    _, source = loaded(ns)
    first = ns.run(source.read)
    nft(ns, "add table ip kube-proxy")
    nft(ns, "add chain ip kube-proxy services")
    nft(ns, "add rule ip kube-proxy services counter accept")
    assert ns.run(source.read) is first and source.full_reads == 1


# -- what the feed cannot tell ------------------------------------------------------------

def test_an_overflowed_feed_is_a_counted_full_read(ns):
    services = ipt_rulesets.bench_services(60, 5)
    ns.load(services)
    source = IptablesNftSource(feed_buffer=4096)  # the kernel's floor: a few messages
    ns.run(source.read)
    for i in range(3):
        changed = services[i]
        ns.restore(ipt_rulesets.endpoints_changed(services, changed, [(a, p + 1) for a, p in changed.endpoints]))
    read = ns.run(source.read)
    assert source.full_reads == 2 and "ENOBUFS" in source.last_resync
    assert_same(read, fresh(ns))
    # After the full read the feed serves again.
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    assert_same(ns.run(source.read), fresh(ns))
    assert source.full_reads == 2


def test_a_generation_the_feed_did_not_reach_is_a_full_read(ns):
    _, source = loaded(ns)
    drain = source._feed.drain

    def losing_the_last_transaction():
        drained = drain()
        return drained._replace(batches=drained.batches[:-1])

    source._feed.drain = losing_the_last_transaction
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    ns.iptables("-t", "nat", "-D", "KUBE-SERVICES", "1")
    read = ns.run(source.read)
    assert source.full_reads == 2 and "generation" in source.last_resync
    assert_same(read, fresh(ns))


def test_a_re_read_that_failed_after_draining_is_followed_by_a_full_read(ns):
    _, source = loaded(ns)
    generation = source._requests.generation

    def failing():
        raise NftReadError("no answer from nf_tables within 5 s (the ruleset generation)")

    source._requests.generation = failing
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
    with pytest.raises(NftReadError):
        ns.run(source.read)  # the transaction it drained is not kept
    source._requests.generation = generation
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "ACCEPT")
    read = ns.run(source.read)
    assert source.full_reads == 2
    assert_same(read, fresh(ns))


def test_the_feed_sees_what_was_committed_between_subscribing_and_dumping(ns):
    services = ipt_rulesets.bench_services(10, 2)
    ns.load(services)

    def subscribe_then_change():
        monitor = NftMonitor()
        try:
            ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
            drained = monitor.drain()
        finally:
            monitor.close()
        return drained

    drained = ns.run(subscribe_then_change)
    assert drained.resync is None and len(drained.batches) == 1
    [(key, events)] = drained.batches[0].tables.items()
    assert key == (2, "nat") and [(e.kind, e.chain) for e in events] == [("newrule", "KUBE-MARK-MASQ")]


# -- ChainOrder on its own ----------------------------------------------------------------

def test_chain_order_places_rules_as_the_kernel_announces_them():
    order = ChainOrder([10, 11, 12])
    order.add(20, 11, append=False)  # after 11
    order.add(21, None, append=False)  # iptables -I: first
    order.add(22, None, append=True)  # iptables -A: last
    order.new_transaction()
    order.delete(12)
    assert order.handles() == [21, 10, 11, 20, 22]
    # Two rules inserted at the head in one transaction: the first announced names the
    # second (already linked) as the rule before it.
    order = ChainOrder([10])
    order.add(31, 30, append=False)
    order.add(30, None, append=False)
    assert order.handles() == [30, 31, 10]


def test_chain_order_refuses_what_it_cannot_place():
    order = ChainOrder([10, 11])
    order.add(20, 99, append=True)
    with pytest.raises(Unordered):
        order.handles()  # placed after a rule never announced
    order = ChainOrder([10, 11])
    order.delete(10)
    with pytest.raises(Unordered):
        order.add(12, None, append=True)  # iptables -R of a first rule looks like this
    with pytest.raises(Unordered):
        ChainOrder([10]).delete(11)
    with pytest.raises(Unordered):
        ChainOrder([10]).add(10, None, append=True)


def test_generations_wrap():
    assert newer(5, 4) and not newer(4, 5) and not newer(4, 4)
    assert newer(1, 0xFFFFFFFF)


def test_chain_order_links_its_first_rules_only_when_asked_and_places_alike():
    """A chain starts with its kept rules unlinked (a chain flushed whole never links them):
    every sequence of events places as on a chain whose rules were linked first."""
    import random

    rng = random.Random(14)
    for _ in range(300):
        kept = rng.sample(range(1, 40), rng.randrange(0, 6))
        lazy, eager = ChainOrder(kept), ChainOrder(kept)
        if eager._kept is not None:
            eager._link_kept()
        fresh_handles = iter(range(100, 200))
        script = []
        for _ in range(rng.randrange(1, 9)):
            what = rng.random()
            if what < 0.45:
                script.append(("delete", rng.choice(kept + [99]) if kept else 99))
            elif what < 0.9:
                handle = next(fresh_handles)
                script.append(("add", handle, rng.choice([None, *kept, handle - 1]), rng.random() < 0.5))
            else:
                script.append(("new_transaction",))
        results = []
        for order in (lazy, eager):
            try:
                for step in script:
                    getattr(order, step[0])(*step[1:])
                results.append(order.handles())
            except Unordered as why:
                results.append(f"unordered: {why}")
        assert results[0] == results[1], (kept, script, results)
    order = ChainOrder([10, 11, 12])
    for handle in (11, 10, 12):
        order.delete(handle)
    order.add(20, None, append=True)
    order.add(21, 20, append=True)
    assert order.handles() == [20, 21]
    with pytest.raises(Unordered):
        order = ChainOrder([10, 11])
        order.delete(10)
        order.delete(10)  # deleted twice: never seen the second time


def test_a_rule_message_in_another_attribute_order_reads_alike():
    """The kernel's layout (table, chain, handle, position first) is read straight; any
    other order by the walk, to the same event and the same body."""
    import struct

    from exporter.readers import nftables_monitor as monitor

    def attr(kind: int, payload: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)

    table, chain = attr(monitor.NFTA_RULE_TABLE, b"nat\0"), attr(monitor.NFTA_RULE_CHAIN, b"KUBE-SERVICES\0")
    handle = attr(monitor.NFTA_RULE_HANDLE, struct.pack(">Q", 77))
    position = attr(monitor.NFTA_RULE_POSITION, struct.pack(">Q", 76))
    body = attr(monitor.NFTA_RULE_EXPRESSIONS, b"\x08\x00\x01\x00abcd") + attr(monitor.NFTA_RULE_USERDATA, b"xyz")
    kernel = table + chain + handle + position + body
    other = chain + handle + table + position + body
    read = [monitor._rule_message(msg, 0, len(msg), monitor.NFT_MSG_NEWRULE, monitor.NLM_F_APPEND, 2, {})
            for msg in (kernel, other)]
    assert [(p, t, e) for p, t, e in read] == [(2, "nat", monitor.Event("newrule", "KUBE-SERVICES", 77, 76, True, body))] * 2
    for _, _, event in read:
        exprs, udata = monitor.rule_parts(event)
        assert event.body[exprs[0]:exprs[1]] == b"\x08\x00\x01\x00abcd" and event.body[udata[0]:udata[1]] == b"xyz"
    deleted = monitor._rule_message(kernel, 0, len(kernel), monitor.NFT_MSG_DELRULE, 0, 2, {})[2]
    assert deleted.kind == "delrule" and deleted.position is None and deleted.body == body
