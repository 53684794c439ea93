"""The benches' fast loader of iptables-nft tables (tests/nft_snapshot.py) makes what
iptables-nft-restore made: both families, both tables, comments, DNATs, nfacct."""

from __future__ import annotations

from tests.ipt_rulesets import IptNS, bench_services, ruleset
from tests.nft_snapshot import cached_table, replay, snapshot


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_a_replayed_snapshot_saves_as_the_restored_table(tmp_path):
    services = bench_services(40, 3)
    with IptNS() as restored, IptNS() as replayed, IptNS() as cached:
        restored.restore(ruleset(services, 4))
        restored.iptables("-t", "nat", "-N", "KUBE-SERVICES", family=6)
        restored.iptables("-t", "nat", "-A", "KUBE-SERVICES", "-d", "fd00::1/128", "-p", "tcp", "-m", "tcp",
                          "--dport", "80", "-j", "DNAT", "--to-destination", "[fd00::2]:8080", family=6)
        messages = restored.run(snapshot)
        replayed.run(lambda: replay(messages))
        for family in (4, 6):
            saved = _rules(restored.save(family))
            assert any("DNAT" in line for line in saved)
            assert family == 6 or any("--comment" in line for line in saved)
            assert _rules(replayed.save(family)) == saved
        # The first load restores and keeps a snapshot; the second replays it.
        text = ruleset(services, 4)
        assert cached_table(cached, text, tmp_path) == "restored"
        with IptNS() as again:
            assert cached_table(again, text, tmp_path) == "replayed"
            assert _rules(again.save(4)) == _rules(restored.save(4))
