"""The iptables-nft source, which keeps no rules (exporter/readers/iptables_nft.py).

Real rules in a namespace of the test's own, changed as kube-proxy changes them. What it
serves must read as `iptables-nft-save` prints the rules; what it says changed must be
exactly what did (its digests of the top-level chains: a chain flushed and written again
the same is unchanged, written again in another order is changed); a read whose chains
the kernel changed before they were walked must be told by ``verify()``.
"""

from __future__ import annotations

import time

import pytest

from exporter.readers.iptables import resolve_rulesets
from exporter.readers.iptables_nft import IptablesNftSource
from exporter.readers.iptables_save import parse_save
from tests.ipt_rulesets import IptNS, bench_services, endpoints_changed, ruleset


def _top_level_swapped(text: str) -> str:
    """``text`` (a partial sync) with KUBE-SERVICES' first two rules in the other order."""
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("-A KUBE-SERVICES ")]
    lines[at[0]], lines[at[1]] = lines[at[1]], lines[at[0]]
    return "\n".join(lines) + "\n"


class World:
    """kube-proxy's rules for 30 Services x 3 in a namespace of the test's own, and the source."""

    def __init__(self, ns: IptNS, services, source: IptablesNftSource) -> None:
        self.ns, self.services, self.source = ns, services, source


@pytest.fixture
def world():
    services = bench_services(30, 3)
    with IptNS() as ns:
        ns.restore(ruleset(services, 4))
        source = IptablesNftSource()
        try:
            yield World(ns, services, source)
        finally:
            source.close()


def test_reads_as_iptables_save_prints_the_rules(world):
    ns, source = world.ns, world.source
    [read] = [r for r in ns.run(source.read) if r.family == 4]
    [saved] = parse_save(ns.save(4), 4)
    for table, chains in saved.tables.items():
        assert {name: tuple(rules) for name, rules in read.tables[table].items()} == \
            {name: tuple(rules) for name, rules in chains.items()}, table
        assert dict(read.tables[table].lengths()) == {n: len(r) for n, r in chains.items()}


def test_a_top_level_chain_written_again_the_same_is_unchanged_and_reordered_is_changed(world):
    ns, services, source = world.ns, world.services, world.source
    resolve_rulesets(ns.run(source.read), None, {})
    assert ns.run(source.verify)  # as the dataplane does: a walk not verified is not trusted to a digest
    ns.restore(endpoints_changed(services, services[5], [(a, p + 1) for a, p in services[5].endpoints]))
    nat = next(r for r in ns.run(source.read) if r.family == 4).tables["nat"]
    assert source.full_reads == 1 and source.from_feed > 0, source.last_resync
    assert "KUBE-SERVICES" not in nat.changed and "KUBE-NODEPORTS" not in nat.changed
    assert any(name.startswith("KUBE-SVC-") for name in nat.changed)
    ns.restore(_top_level_swapped(endpoints_changed(services, services[5], services[5].endpoints)))
    nat = next(r for r in ns.run(source.read) if r.family == 4).tables["nat"]
    assert source.full_reads == 1, source.last_resync
    assert "KUBE-SERVICES" in nat.changed


def test_a_top_level_chain_walked_before_a_commit_it_met_is_changed_even_written_the_same(world):
    """A walk whose read was not verified (the kernel moved during it) may have dumped a
    top-level chain while a commit touching it was half applied: cut short. When the feed
    then says that chain written again the same, its digest must not keep what the walk
    made of it: it is changed, and walked again."""
    ns, services, source = world.ns, world.services, world.source
    resolve_rulesets(ns.run(source.read), None, {})
    ns.restore(endpoints_changed(services, services[5], [(a, p + 1) for a, p in services[5].endpoints]))
    assert not ns.run(source.verify)  # the walk's read is not the kernel's now
    nat = next(r for r in ns.run(source.read) if r.family == 4).tables["nat"]
    assert source.full_reads == 1 and source.from_feed > 0, source.last_resync
    assert "KUBE-SERVICES" in nat.changed


def test_a_chain_written_again_by_inserts_is_read_in_its_new_order(world):
    """Its rules inserted at the head one by one in their old order: the feed announces
    them in the old order, the chain holds them reversed. Only the positions the kernel
    gives tell the two apart: the chain must count as changed."""
    ns, source = world.ns, world.source
    resolve_rulesets(ns.run(source.read), None, {})
    rules = [line[len("-A KUBE-SERVICES "):] for line in ns.save(4, table="nat").splitlines()
             if line.startswith("-A KUBE-SERVICES ")]
    ns.restore("*nat\n-F KUBE-SERVICES\n" + "".join(f"-I KUBE-SERVICES 1 {rule}\n" for rule in rules)
               + "COMMIT\n")
    nat = next(r for r in ns.run(source.read) if r.family == 4).tables["nat"]
    assert source.full_reads == 1, source.last_resync
    assert "KUBE-SERVICES" in nat.changed
    assert [rule.target for rule in nat["KUBE-SERVICES"]][0] == \
        [rule.target for rule in parse_save(ns.save(4), 4)[0].tables["nat"]["KUBE-SERVICES"]][0]


def test_one_rule_edited_in_a_top_level_chain_is_changed_and_counted(world):
    ns, source = world.ns, world.source
    first = resolve_rulesets(ns.run(source.read), None, {})
    ns.iptables("-t", "nat", "-D", "KUBE-SERVICES", "3")
    rulesets = ns.run(source.read)
    nat = next(r for r in rulesets if r.family == 4).tables["nat"]
    assert source.full_reads == 1 and "KUBE-SERVICES" in nat.changed
    read = resolve_rulesets(rulesets, None, {})
    assert read.sizes["ipv4"].rules == first.sizes["ipv4"].rules - 1
    assert len(read.table) == len(first.table) - 1


def test_verify_tells_a_change_made_before_the_chains_were_walked():
    services = bench_services(10, 2)
    with IptNS() as ns:
        ns.restore(ruleset(services, 4))
        source = IptablesNftSource()
        try:
            ns.run(source.read)
            assert ns.run(source.verify)
            ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")
            assert not ns.run(source.verify)  # a resolve now could mix two generations
            resolve_rulesets(ns.run(source.read), None, {})
            assert ns.run(source.verify)
        finally:
            source.close()


def test_a_read_that_failed_midway_is_not_followed_by_the_last_good_one(world, monkeypatch):
    """The resolver dumps chains after the source's read returned its generation: a dump
    that fails then fails the dataplane's read. The next scrape, with nf_tables still at
    that generation, must read the rules again, never serve the read from before the change
    as "the generation did not move"."""
    from exporter.paths import Paths
    from exporter.readers.dataplanes import IptablesDataplane, ReadFailed
    from exporter.readers.iptables_legacy import IptablesLegacySource
    from exporter.readers.iptables_nft import NftReadError

    ns, services, source = world.ns, world.services, world.source
    now = [1000.0]
    dataplane = ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths()), nft=source,
                                                 clock=lambda: now[0]))
    good = ns.run(lambda: dataplane.read_rules(max_age=0))
    assert good.backend == "nft" and good.read.table and not good.read.unread
    moved = services[3]
    new = [(a, p + 1) for a, p in moved.endpoints]
    ns.restore(endpoints_changed(services, moved, new))

    def no_answer(*_):
        raise NftReadError("no answer from nf_tables within 5 s (the rules of a chain)")

    monkeypatch.setattr(source, "_chain", no_answer)
    now[0] += 1
    with pytest.raises(ReadFailed):
        ns.run(lambda: dataplane.read_rules(max_age=0))
    monkeypatch.undo()
    now[0] += 1
    again = ns.run(lambda: dataplane.read_rules(max_age=0))
    assert again.reread and not again.read.unread
    servers = {(server[0], server[1]) for vs in again.read.table.values() for server in vs.real_servers}
    assert set(new) <= servers, "the change was not read"
    assert again.read.table != good.read.table


def test_a_full_read_that_failed_after_the_feed_lost_track_is_not_followed_by_a_feed_read(world, monkeypatch):
    """A chain renamed (iptables -E) is a change the feed cannot follow: the source drops
    what it drained and reads whole. When that whole read fails, the changes drained are
    gone with it: the next read must be a whole one again, never the feed's next
    transactions applied over the tables from before the rename."""
    from exporter.readers import iptables_nft
    from exporter.readers.iptables_nft import NftReadError

    ns, source = world.ns, world.source
    ns.iptables("-t", "nat", "-N", "KUBE-TEST-OLD")
    ns.run(source.read)
    assert source.full_reads == 1
    ns.iptables("-t", "nat", "-E", "KUBE-TEST-OLD", "KUBE-TEST-NEW")
    real = iptables_nft._chains_into

    def no_answer(*_):
        raise NftReadError("no answer from nf_tables within 5 s (the chains)")

    monkeypatch.setattr(iptables_nft, "_chains_into", no_answer)
    with pytest.raises(NftReadError):
        ns.run(source.read)
    assert source.last_resync and "renamed" in source.last_resync
    monkeypatch.setattr(iptables_nft, "_chains_into", real)
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN")  # the feed's next transaction
    nat = next(r for r in ns.run(source.read) if r.family == 4).tables["nat"]
    assert "KUBE-TEST-NEW" in nat and "KUBE-TEST-OLD" not in nat, "the rename was lost with the failed read"
    assert set(nat) == set(parse_save(ns.save(4), 4)[0].tables["nat"])
    assert source.full_reads == 2


def test_a_full_read_that_failed_after_its_dumps_is_not_served_as_unchanged(world, monkeypatch):
    """A full read stores the tables and generation it listed, then drains the change feed.
    When the drain fails, the read failed: a caller that then asks with that generation as
    the one it knows must get a read, never the rulesets from before the change."""
    from exporter.readers.iptables_nft import NftReadError

    ns, source = world.ns, world.source
    ns.run(source.read)
    before = ns.run(source.read)
    ns.iptables("-t", "nat", "-N", "KUBE-TEST-NEW")
    source._resync = "a test's own reason to read whole"  # as after an overflow

    def no_answer(*_):
        raise NftReadError("no answer from the change feed")

    monkeypatch.setattr(source._feed, "drain", no_answer)
    with pytest.raises(NftReadError):
        ns.run(source.read)
    monkeypatch.undo()
    generation = ns.run(lambda: source._requests().generation())
    after = ns.run(lambda: source.read(generation))
    assert after is not before, "the rulesets from before the change came back as unchanged"
    nat = next(r for r in after if r.family == 4).tables["nat"]
    assert "KUBE-TEST-NEW" in nat


def test_a_chain_that_cannot_be_counted_fails_the_read_in_one_line(monkeypatch):
    """No kube-proxy chain in iptables-nft: nothing is resolved, and the table's chains are
    dumped only to be counted. A dump that fails there fails the read with one line, never
    a traceback out of the dataplane."""
    from exporter.paths import Paths
    from exporter.readers.dataplanes import IptablesDataplane, ReadFailed
    from exporter.readers.iptables_legacy import IptablesLegacySource
    from exporter.readers.iptables_nft import NftReadError

    with IptNS() as ns:
        ns.restore("*nat\n:CNI-HOSTPORT-DNAT - [0:0]\n-A PREROUTING -j CNI-HOSTPORT-DNAT\nCOMMIT\n")
        source = IptablesNftSource()
        try:
            def no_answer(*_):
                raise NftReadError("no answer from nf_tables within 5 s (the rules of chain CNI-HOSTPORT-DNAT)")

            monkeypatch.setattr(source, "_recount", no_answer)
            dataplane = ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths()), nft=source))
            with pytest.raises(ReadFailed) as caught:
                ns.run(lambda: dataplane.read_rules(0))
            assert str(caught.value) == ("kube-proxy's iptables-nft rules not read: no answer from nf_tables within "
                                         "5 s (the rules of chain CNI-HOSTPORT-DNAT)")
            monkeypatch.undo()
            live = ns.run(lambda: dataplane.read_rules(0))
            assert live.read.table == {} and any(size.chains for size in live.tables)
        finally:
            source.close()


def _reads_while(thread, ns, dataplane, whole: bool, attempts: list | None = None) -> tuple[list, list[str]]:
    """The dataplane's reads, one after another while ``thread`` runs (each whole, when
    ``whole``): those served, and the reasons of those that failed; ``attempts`` (if
    given) gets an entry as each read ends, for a thread that paces itself on them."""
    from exporter.readers.dataplanes import ReadFailed

    served, failed = [], []
    while thread.is_alive():
        if whole:
            dataplane.nft._resync = "a test's own reason to read whole"
        try:
            served.append(ns.run(lambda: dataplane.read_rules(max_age=0)))
        except ReadFailed as err:
            failed.append(str(err))
        if attempts is not None:
            attempts.append(None)
    return served, failed


@pytest.mark.parametrize("whole", [False, True], ids=["from-the-feed", "whole-reads"])
def test_reads_beside_back_to_back_partial_syncs_are_each_the_kernels(whole):
    """kube-proxy's partial syncs back to back (1,000 Services) while the exporter reads
    as fast as it can: the kernel numbers a commit before it makes its chains live and
    announces it, so a read that took the generation in between listed the chains of
    before under the number of after (and a listing resumed by position across a chain
    unlinked skips one), then said a chain "missing" that the kernel had, and went on
    saying it while nothing moved (bench soak); a top-level chain dumped while a commit
    touching it was half applied came cut short, and when the feed then said it written
    again the same, the frontends it lacked stayed lacking. Every read served must be
    whole (no chain missing: nf_tables never lets a jump name a chain that is not there;
    as many frontends as before: the syncs move endpoints only); from the
    feed, none may fall back to a whole read for want of the announcement; and once the
    syncs stop, the read equals a fresh dataplane's. A read may fail when syncs land during
    each of its tries (kube-proxy spaces them a second apart; these come back to back),
    with that reason."""
    import threading

    from exporter.readers.dataplanes import IptablesDataplane
    from tests.nft_snapshot import cached_table

    services = bench_services(1000, 5)
    with IptNS() as ns:
        cached_table(ns, ruleset(services, 4))
        changes = []
        for k in range(1, 31):
            svc = services[(k * 37) % len(services)]
            endpoints = list(svc.endpoints)
            endpoints[k % len(endpoints)] = (f"10.250.0.{k}", 8080)
            changes.append(endpoints_changed(services, svc, endpoints))
        dataplane = ns.run(IptablesDataplane)
        try:
            frontends = len(ns.run(lambda: dataplane.read_rules(max_age=0)).read.table)
            full_reads = dataplane.nft.full_reads
            attempts: list = []

            def sync() -> None:
                # Every change once, and on round again until ten reads have run beside
                # them: on a loaded machine (whole reads at 1,000 Services take ~0.2 s)
                # thirty restores could end before ten reads did.
                k, until = 0, time.monotonic() + 120
                while k < len(changes) or (len(attempts) < 10 and time.monotonic() < until):
                    ns.restore(changes[k % len(changes)])
                    k += 1

            syncing = threading.Thread(target=sync)
            syncing.start()
            served, failed = _reads_while(syncing, ns, dataplane, whole, attempts)
            syncing.join()
            reads = len(served)
            not_whole = [line for live in served for line in live.read.unread]
            # the syncs move endpoints only: as many frontends
            short = [len(live.read.table) for live in served if len(live.read.table) != frontends]
            assert reads + len(failed) >= 10 and reads >= 3, f"{reads} reads served, {len(failed)} failed beside the syncs"
            assert not not_whole, f"{len(not_whole)} lines of reads served as the kernel's: {not_whole[:2]}"
            assert not short, f"reads served with {short} of {frontends} frontends (a chain dumped mid-commit)"
            # Syncs back to back can land during each of a read's few tries: said, never served.
            assert all("changed during each of" in reason for reason in failed), failed[:2]
            if not whole:
                assert dataplane.nft.full_reads == full_reads, dataplane.nft.last_resync
            quiet = ns.run(lambda: dataplane.read_rules(max_age=0))
            fresh = ns.run(IptablesDataplane)
            try:
                truth = ns.run(lambda: fresh.read_rules(max_age=0))
            finally:
                fresh.close()
            assert not quiet.read.unread and quiet.read.table == truth.read.table
        finally:
            dataplane.close()


def test_reads_beside_aborted_transactions_inserting_first_in_kube_services_are_the_kernels():
    """Transactions that prepare 3,000 rules at the head of KUBE-SERVICES and are then
    aborted (another agent's failing `iptables -I`, say; kube-proxy's own restores append,
    which no resumed dump counts before the rules it has), beside whole reads of 1,000
    Services: nothing ever changes, no generation moves, nothing is announced, yet a
    dump of KUBE-SERVICES resumed while one was prepared repeated or skipped rules. Before:
    5 of 14 reads served wrong. Now the torn dump is met (each rule's position), the walk
    not verified, the chain dumped again: every read served is the table, and the tears
    were met (else the test proved nothing)."""
    from exporter.readers.dataplanes import IptablesDataplane
    from tests.nft_rulesets import aborted_transactions
    from tests.nft_snapshot import cached_table

    services = bench_services(1000, 5)
    with IptNS() as ns:
        cached_table(ns, ruleset(services, 4))
        dataplane = ns.run(IptablesDataplane)
        try:
            truth = ns.run(lambda: dataplane.read_rules(max_age=0)).read.table
            aborting = aborted_transactions(ns.path, "ip", "nat", "KUBE-SERVICES", 60, verb="insert")
            try:
                served, failed = _reads_while(aborting, ns, dataplane, whole=True)
            finally:
                aborting.join()
            reads = len(served)
            wrong = sum(bool(live.read.unread) or live.read.table != truth for live in served)
            assert not aborting.failures, aborting.failures
            assert not wrong, f"{wrong} of {reads} reads served not the table"
            assert reads and dataplane.nft.torn_dumps, f"{reads} reads, {dataplane.nft.torn_dumps} torn dumps met"
            # Torn on each try (or torn twice counting a chain): said, never served.
            assert all("torn by a transaction" in reason or "during each of" in reason for reason in failed), failed[:2]
        finally:
            dataplane.close()
