"""The resolver's incremental path: with a ``cache`` kept between calls, what it gives after
each kind of change equals a whole resolve of the same rules (table, verdicts, what was
not read, sizes), and it walks fewer chains than a whole resolve does.

Real rules in a namespace of the test's own (kube-proxy's overall.rules, and generated
Services for kube-proxy's partial sync), changed with the backend's own tools, read by
each source the exporter has: iptables-nft over netlink (its change feed names the chains
that changed), the save text (new objects every read: compared by value), and the
iptables-legacy blob (chains decoded afresh on each access: resolved whole).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.paths import Paths
from exporter.readers import iptables
from exporter.readers.iptables import chain_services_for, resolve_rulesets
from exporter.readers.iptables_legacy import IptablesLegacySource
from exporter.readers.iptables_nft import IptablesNftSource
from exporter.readers.iptables_save import parse_save
from tests import ipt_rulesets
from tests.ipt_ns import IptNS
from tests.test_desired_rules import overall_objects

OVERALL = (Path(__file__).parent / "fixtures" / "iptables" / "overall.rules").read_text()
SVC4, EXT4 = "KUBE-SVC-4SW47YFZTEDKD3PK", "KUBE-EXT-4SW47YFZTEDKD3PK"
SEP4 = "KUBE-SEP-C6EBXVWJJZMIWKLZ"  # svc4's second endpoint, reached by its cluster IP and external IP
SVC1 = "KUBE-SVC-XPGD46QRK7WJZT7O"
NEW_SEP = "KUBE-SEP-INCREMENTAL00001"


def _nat(*args: str) -> list[tuple[str, ...]]:
    return [("-t", "nat", *args)]


# Each change: the iptables commands (a tuple of arguments each) made after a first read.
CHANGES = {
    # Only the endpoint chain changes: its readers (the Service chain, and the KUBE-EXT- chain
    # that reads that one) must be resolved again, two levels up.
    "endpoint DNAT replaced in place (-R)": _nat("-R", SEP4, "2", "-p", "tcp", "-m", "tcp", "-j", "DNAT",
                                                 "--to-destination", "10.180.0.9:80"),
    "KUBE-SEP jump deleted": _nat("-D", SVC4, "3"),
    "KUBE-SERVICES rule deleted": _nat("-D", "KUBE-SERVICES", "1"),
    "chain added and jumped to": _nat("-N", NEW_SEP) + _nat("-A", NEW_SEP, "-p", "tcp", "-j", "DNAT",
                                                          "--to-destination", "10.180.0.77:80")
    + _nat("-I", SVC1, "2", "-m", "statistic", "--mode", "random", "--probability", "0.5", "-j", NEW_SEP),
    "chain removed": _nat("-D", SVC4, "3") + _nat("-F", SEP4) + _nat("-X", SEP4),
    "nat table flushed": _nat("-F"),
    "nat table flushed and its chains deleted": _nat("-F") + _nat("-X"),
    "chain renamed (-E)": _nat("-E", SEP4, "KUBE-SEP-RENAMEDRENAMED01"),
    "a reject verdict added": [("-t", "filter", "-I", "KUBE-SERVICES", "-p", "tcp", "-d", "172.30.0.41",
                                "--dport", "80", "-j", "REJECT")],
    "a rule this reader does not understand": _nat("-I", SVC4, "1", "-i", "eth0", "-j", "KUBE-MARK-MASQ"),
}

SOURCES = ("nft", "save-text", "legacy-blob")


class _Reader:
    """One source of the rules in ``ns``, read as the exporter reads it."""

    def __init__(self, ns: IptNS, kind: str) -> None:
        self.ns, self.kind = ns, kind
        if kind == "nft":
            self.source = IptablesNftSource()
        elif kind == "legacy-blob":
            self.source = IptablesLegacySource(Paths(), keep=False, lazy=True)  # as the dataplane reads

    def read(self):
        if self.kind == "save-text":
            return parse_save(self.ns.save(4), 4)
        return self.ns.run(self.source.read)

    def close(self) -> None:
        if self.kind == "nft":
            self.source.close()


def _walks(monkeypatch) -> list[str]:
    """The chains the resolver walks (reads the rules of), in order."""
    walked: list[str] = []
    real_walk, real_endpoint = iptables._Family._walk, iptables._Family._endpoint

    def walk(self, chain, depth):
        walked.append(chain)
        return real_walk(self, chain, depth)

    def endpoint(self, chain):
        walked.append(chain)
        return real_endpoint(self, chain)

    monkeypatch.setattr(iptables._Family, "_walk", walk)
    monkeypatch.setattr(iptables._Family, "_endpoint", endpoint)
    return walked


def _same(cached, whole) -> None:
    assert cached.table == whole.table
    assert cached.rejected == whole.rejected
    assert cached.firewalled == whole.firewalled
    assert cached.unread == whole.unread
    assert cached.sizes == whole.sizes


def _check(rulesets, names, cache: dict, walked: list[str], incremental: bool, strict: bool = True):
    walked.clear()
    cached = resolve_rulesets(rulesets, names, cache)
    cached_walks = len(walked)
    walked.clear()
    whole = resolve_rulesets(rulesets, names)
    _same(cached, whole)
    if incremental and walked:
        # Not a whole resolve in disguise: only what the change reached was walked again.
        assert cached_walks < len(walked) or not strict and cached_walks == len(walked), (cached_walks, len(walked))
    return cached


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("change", CHANGES)
def test_the_incremental_resolve_equals_a_whole_one_after_each_change(source, change, monkeypatch):
    backend = "legacy" if source == "legacy-blob" else "nft"
    services, _ = overall_objects()
    names = chain_services_for(services)
    walked = _walks(monkeypatch)
    with IptNS(backend) as ns:
        ns.restore(OVERALL)
        reader = _Reader(ns, source)
        try:
            cache: dict = {}
            first = resolve_rulesets(reader.read(), names, cache)
            assert first.table and not first.unread
            for args in CHANGES[change]:
                ns.iptables(*args)
            # A rename reaches the nft source as a chain announced again with an old handle:
            # a full read, which keeps nothing to compare with, so a whole resolve (equal all the same).
            whole_again = source == "legacy-blob" or (source == "nft" and change == "chain renamed (-E)")
            _check(reader.read(), names, cache, walked, not whole_again)
            # And back: what was removed appears again, what was added goes.
            ns.restore(OVERALL)
            # (After a flush every chain is new again: as many walks as a whole resolve.)
            back = _check(reader.read(), names, cache, walked, source != "legacy-blob", strict=False)
            _same(back, first)
            if source == "legacy-blob":
                # Resolved whole every time, and the cache does not hold the chains (their
                # mapping holds the kernel's whole blob) until the next call.
                assert all(type(family.nat) is dict and not family.nat for family in cache["families"].values())
        finally:
            reader.close()


def test_kube_proxys_partial_sync_resolves_only_the_changed_service_again(monkeypatch):
    """kube-proxy's partial sync (every top-level chain flushed and written again, the
    changed Service's chains rewritten, its gone endpoint chains deleted), read from the
    change feed: the top-level chains are the same again, so only that Service is walked."""
    services = ipt_rulesets.bench_services(40, 3)
    walked = _walks(monkeypatch)
    with ipt_rulesets.IptNS() as ns:
        ns.restore(ipt_rulesets.ruleset(services, 4))
        source = IptablesNftSource()
        try:
            cache: dict = {}
            resolve_rulesets(ns.run(source.read), None, cache)
            for step, svc in enumerate((services[3], services[17], services[3])):
                ns.restore(ipt_rulesets.endpoints_changed(services, svc,
                                                          [(a, p + step + 1) for a, p in svc.endpoints]))
                rulesets = ns.run(source.read)
                assert source.full_reads == 1, source.last_resync  # from the feed
                walked.clear()
                cached = resolve_rulesets(rulesets, None, cache)
                # The Service's own chains: its KUBE-SVC- (and KUBE-EXT- for a NodePort) and
                # its endpoints' KUBE-SEP-, each once; of the 40 Services, none other.
                assert 3 <= len(walked) <= 5 and len(set(walked)) == len(walked), walked
                _same(cached, resolve_rulesets(rulesets, None))
        finally:
            source.close()


def test_a_family_gone_drops_out_and_one_back_is_read_whole():
    services, _ = overall_objects()
    names = chain_services_for(services)
    [v4] = parse_save(OVERALL, 4)
    cache: dict = {}
    both = resolve_rulesets([v4, v4._replace(family=6)], names, cache)
    assert set(both.sizes) == {"ipv4", "ipv6"}
    alone = resolve_rulesets([v4], names, cache)
    _same(alone, resolve_rulesets([v4], names))
    again = resolve_rulesets([v4, v4._replace(family=6)], names, cache)
    _same(again, resolve_rulesets([v4, v4._replace(family=6)], names))
