"""The iptables-legacy source on the real kernel: x_tables in a network namespace of the test's own.

Rules (kube-proxy's own fixtures in tests/fixtures/iptables/, tests/ipt_rulesets.py's
newest iptables layout, tests/test_iptables_netlink.py's every option) are loaded with
`iptables-legacy-restore` inside the namespace; the source runs in a thread that joined
it (``IptNS.run``), so its getsockopt socket and /proc/thread-self/net are the
namespace's. What it decodes from the kernel's blob must equal ``parse_save`` of
`iptables-legacy-save` on the same tables, rule by rule; a blob cut short or with bytes
changed must come out as one line, never a traceback or a part of the table.
"""

from __future__ import annotations

import ipaddress
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exporter.paths import Paths
from exporter.readers import iptables_legacy
from exporter.readers.iptables_blob import BlobError, LazyChains, decode_table
from exporter.readers.iptables_legacy import IptablesLegacySource, LegacyReadError
from exporter.readers.iptables_rules import IptablesRule, chain_lengths
from exporter.readers.iptables_save import parse_save
from tests.ipt_rulesets import IptNS, bench_services, chain_name, generated_services, generated_services_v6, ruleset
from tests.test_iptables_netlink import EVERY_OPTION

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "iptables"


@pytest.fixture
def ns():
    with IptNS() as namespace:
        yield namespace


def legacy_tables(ns: IptNS) -> list[str]:
    """The legacy tables the namespace's kernel lists, both families."""
    return ns.run(lambda: [open(f"/proc/thread-self/net/{name}").read().split()
                           for name in ("ip_tables_names", "ip6_tables_names")])


def test_no_legacy_tables_is_no_signal_and_asking_creates_none(ns):
    source = IptablesLegacySource(Paths())
    assert ns.run(source.change_signal) == ()
    assert ns.run(source.present) is False
    assert ns.run(source.read) == []
    # Asking the table info getsockopt for a table that is not there would create it
    # (and make iptables-nft warn "iptables-legacy tables present" ever after).
    assert legacy_tables(ns) == [[], []]


def test_signal_and_presence_come_from_the_kernel(ns):
    source = IptablesLegacySource(Paths())
    ns.load(generated_services(), 4, backend="legacy")
    signal = ns.run(source.change_signal)
    assert [(i.family, i.table) for i in signal] == [(4, "nat"), (4, "filter")]
    assert all(i.entries > 5 and i.size > 0 for i in signal)
    assert ns.run(source.present) is True
    # One more rule: the entry count and size move.
    ns.iptables("-t", "nat", "-A", "KUBE-SERVICES", "-d", "10.0.0.99/32", "-j", "RETURN", backend="legacy")
    moved = ns.run(source.change_signal)
    nat_before, nat_after = signal[0], moved[0]
    assert nat_after.entries == nat_before.entries + 1 and nat_after.size > nat_before.size
    ns.load(generated_services_v6(), 6, backend="legacy")
    assert {(i.family, i.table) for i in ns.run(source.change_signal)} == {(4, "nat"), (4, "filter"),
                                                                        (6, "nat"), (6, "filter")}


def test_rules_of_the_nft_backend_or_other_chains_are_not_legacy_presence(ns):
    source = IptablesLegacySource(Paths())
    ns.load(generated_services(), 4, backend="nft")
    assert ns.run(source.present) is False
    assert legacy_tables(ns) == [[], []]
    # A legacy nat table of someone else's (a CNI's chain) is there, but not kube-proxy's.
    ns.iptables("-t", "nat", "-N", "CNI-HOSTPORT-DNAT", backend="legacy")
    # Four built-in chains, the table's end, and a user chain's head and return: 7 entries.
    (nat,) = [i for i in ns.run(source.change_signal) if i.table == "nat"]
    assert (nat.family, nat.entries) == (4, 7)
    assert ns.run(source.present) is False
    ns.iptables("-t", "nat", "-N", "KUBE-SERVICES", backend="legacy")
    assert ns.run(source.present) is True


def _read_error(ns: IptNS, source: IptablesLegacySource) -> str:
    def attempt():
        try:
            source.read()
        except LegacyReadError as err:
            return str(err)
        return None

    said = ns.run(attempt)
    assert said is not None, "the read did not fail"
    assert "\n" not in said and "Traceback" not in said
    return said


@pytest.fixture
def legacy_ns(ns):
    ns.load(generated_services(), 4, backend="legacy")
    return ns


def test_without_cap_net_admin_the_signal_says_so(legacy_ns):
    """As the DaemonSet runs (uid 0, capabilities dropped): the getsockopts are refused with
    EPERM, and the reason names the capability; NET_ADMIN alone reads the rules (no raw
    socket, so no NET_RAW)."""
    code = textwrap.dedent("""
        from exporter.paths import Paths
        from exporter.readers.iptables_legacy import IptablesLegacySource, LegacyReadError
        source = IptablesLegacySource(Paths())
        try:
            source.change_signal()
            print("SIGNAL")
            print("READ", len(source.read()))
        except LegacyReadError as err:
            print("ERROR", err)
    """)

    def run(*caps: str) -> str:
        keep = ",".join(["-all", *(f"+{c}" for c in caps)])
        done = subprocess.run(["nsenter", f"--net={legacy_ns.path}", "setpriv", f"--inh-caps={keep}",
                               f"--ambient-caps={keep}", f"--bounding-set={keep}", sys.executable, "-c", code],
                              capture_output=True, text=True, cwd=REPO, check=True)
        return done.stdout.strip()

    assert run() == ("ERROR ip_tables table nat: permission denied (the x_tables getsockopts need "
                     "CAP_NET_ADMIN)")
    assert run("net_raw") == run()
    assert run("net_admin") == "SIGNAL\nREAD 1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_read_parses_both_families_and_reuses_them_until_the_signal_moves(ns):
    ns.load(generated_services(), 4, backend="legacy")
    ns.load(generated_services_v6(), 6, backend="legacy")
    clock = Clock()
    source = IptablesLegacySource(Paths(), clock=clock)
    first = ns.run(source.read)
    assert source.reread and [r.family for r in first] == [4, 6]
    assert [set(r.tables) for r in first] == [{"nat", "filter"}, {"nat", "filter"}]
    nat = first[0].tables["nat"]
    assert "KUBE-SERVICES" in nat and any(name.startswith("KUBE-SEP-") for name in nat)
    # Nothing moved: the same rulesets, no table fetched.
    assert ns.run(source.read) is first and not source.reread
    # A rule added: the signal moved, the tables are read again.
    ns.iptables("-t", "nat", "-A", "KUBE-SERVICES", "-d", "10.0.0.99/32", "-j", "RETURN", backend="legacy")
    second = ns.run(source.read)
    assert source.reread and second is not first
    assert second[0].tables["nat"]["KUBE-SERVICES"][-1].destination == "10.0.0.99/32"


def test_a_change_that_keeps_count_and_size_is_read_at_the_bounded_rate(ns):
    """An endpoint's address replaced by another: the table info does not move, so the
    source reads again only once ``reread_interval`` has passed."""
    ns.load(generated_services(), 4, backend="legacy")
    clock = Clock()
    source = IptablesLegacySource(Paths(), clock=clock, reread_interval=60.0)
    first = ns.run(source.read)
    signal = ns.run(source.change_signal)
    sep = next(name for name in first[0].tables["nat"] if name.startswith("KUBE-SEP-")
               and first[0].tables["nat"][name][-1].to_destination == "10.180.0.1:80")
    rules = ns.save(4, "legacy", "nat")
    ns.iptables(backend="legacy", tool="-restore", input=rules.replace("10.180.0.1:80", "10.180.0.5:80"))
    assert ns.run(source.change_signal) == signal, "the swap moved the signal: this test proves nothing"
    clock.now += 60 * (1 - iptables_legacy.REREAD_SLACK) - 1
    assert ns.run(source.read) is first and not source.reread
    clock.now += 2
    again = ns.run(source.read)
    assert source.reread and again[0].tables["nat"][sep][-1].to_destination == "10.180.0.5:80"


# --- the kernel's blob, decoded ----------------------------------------------------------------

def assert_decodes_as_saved(ns: IptNS, families=(4, 6), lazy: bool = False) -> dict:
    """The source's read equals ``parse_save`` of `ip(6)tables-legacy-save`, chain by chain,
    rule by rule (``lazy``: each chain decoded when asked for, its length told without
    decoding); returns the read by family."""
    read = {ruleset.family: ruleset for ruleset in ns.run(IptablesLegacySource(Paths(), lazy=lazy).read)}
    assert sorted(read) == sorted(families)
    for family in families:
        [saved] = parse_save(ns.save(family, "legacy"), family)
        assert set(read[family].tables) == set(saved.tables)
        for table, chains in saved.tables.items():
            assert set(read[family].tables[table]) == set(chains), table
            if lazy:
                assert dict(chain_lengths(read[family].tables[table])) == {c: len(r) for c, r in chains.items()}
            for chain, rules in chains.items():
                assert read[family].tables[table][chain] == rules, f"IPv{family} {table} {chain}"
    return read


def test_generated_rules_decode_as_iptables_legacy_save_prints_them(ns):
    ns.load(generated_services(), 4, backend="legacy")
    ns.load(generated_services_v6(), 6, backend="legacy")
    read = assert_decodes_as_saved(ns)
    svc5 = generated_services()[2]
    sep = chain_name(svc5, "SEP", svc5.endpoints[0])
    assert read[4].tables["nat"][sep][1] == IptablesRule(
        "DNAT", protocol="tcp", recent_name=sep, recent_mode="set", comment="ns5/svc5:p80",
        to_destination="10.180.0.3:80")
    v6 = generated_services_v6()[0]
    assert read[6].tables["nat"][chain_name(v6, "SEP", v6.endpoints[0])][1].to_destination == "[fd00:10::1]:80"


def test_kube_proxys_fixtures_decode_as_saved(ns):
    ns.restore((FIXTURES / "overall.rules").read_text(), 4, "legacy")
    ns.restore((FIXTURES / "localhost-nodeports-ipv6.rules").read_text(), 6, "legacy")
    read = assert_decodes_as_saved(ns)
    assert len(read[4].tables["nat"]) > 20 and "KUBE-NODEPORTS" in read[6].tables["nat"]


def test_lazy_chains_decode_as_saved_one_chain_when_asked(ns):
    ns.restore((FIXTURES / "overall.rules").read_text(), 4, "legacy")
    ns.restore((FIXTURES / "localhost-nodeports-ipv6.rules").read_text(), 6, "legacy")
    for family in (4, 6):
        [saved] = parse_save(ns.save(family, "legacy"), family)
        for table, chains in saved.tables.items():
            blob = _fetch(ns, table, family)
            lazy = LazyChains(bytearray(blob.buffer), iptables_legacy._GET_ENTRIES_HEAD.size, blob.info.size,
                              family, blob.hooks, blob.underflows)
            assert lazy.decoded_chains == 0 and list(lazy) == list(chains)  # the table's order, nothing decoded
            assert dict(lazy.lengths()) == {c: len(r) for c, r in chains.items()} and lazy.decoded_chains == 0
            assert lazy == chains and lazy.decoded_chains == len(chains)
            lazy.release()
            with pytest.raises(BlobError):
                lazy[next(iter(chains))]
    assert_decodes_as_saved(ns, lazy=True)


def test_nodeport_addresses_fixture_decodes_as_saved(ns):
    ns.restore((FIXTURES / "nodeport-addresses.rules").read_text(), 4, "legacy")
    assert_decodes_as_saved(ns, families=(4,))


def test_every_option_decodes_as_saved(ns):
    for family, text in EVERY_OPTION.items():
        ns.restore(text, family, "legacy")
    read = assert_decodes_as_saved(ns)
    test = read[4].tables["nat"]["KUBE-TEST"]
    assert test[1].goto and test[1].source_negated and test[1].source == "10.0.0.0/8"
    assert test[17].unknown == ("-i eth0",) and test[24].unknown == ("! -i eth+", "-o lo")
    assert read[4].tables["filter"]["KUBE-F"][1].reject_with == "icmp-host-unreachable"


def test_large_cluster_rules_without_comments_decode_as_saved(ns):
    ns.load(bench_services(220, 5), 4, backend="legacy")  # 1,100 endpoints: kube-proxy drops the comments
    assert_decodes_as_saved(ns, families=(4,))


# Rules alike but for their addresses (hosts, prefixes, IPv4-mapped IPv6 hosts) or their DNAT's address and port: the decoder keeps one shape for each kind
# and sets every rule's own parts on it.
SAME_SHAPES = {4: """\
*nat
:KUBE-SHAPES - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-SHAPES -s 10.1.0.0/16 -j RETURN
-A KUBE-SHAPES -s 10.2.0.0/16 -j RETURN
-A KUBE-SHAPES ! -s 10.3.0.0/16 -d 10.96.0.1/32 -j RETURN
-A KUBE-SHAPES ! -s 10.4.0.0/16 -d 10.96.0.2/32 -j RETURN
-A KUBE-SHAPES -s 10.0.0.5/32 -j KUBE-MARK-MASQ
-A KUBE-SHAPES -s 10.0.0.6/32 -j KUBE-MARK-MASQ
-A KUBE-SHAPES -p tcp -m tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SHAPES -p tcp -m tcp -j DNAT --to-destination 10.180.0.2:81
-A KUBE-SHAPES -p tcp -m tcp -j DNAT --to-destination 10.180.0.2-10.180.0.3:81
-A KUBE-SHAPES -p tcp -m tcp -j DNAT --to-destination 10.180.0.4:81-82
-A KUBE-SHAPES -p tcp -m comment --comment "a DNAT with a comment" -m tcp -j DNAT --to-destination 10.180.0.5:80
COMMIT
""", 6: """\
*nat
:KUBE-SHAPES - [0:0]
-A KUBE-SHAPES -s ::ffff:1.2.3.4/128 -j RETURN
-A KUBE-SHAPES -s ::ffff:1.2.3.5/128 -j RETURN
-A KUBE-SHAPES -s fd00::1/128 -j RETURN
-A KUBE-SHAPES -d fd00::2/128 -j RETURN
-A KUBE-SHAPES -s fd00:1::/64 -j RETURN
-A KUBE-SHAPES -s fd00:2::/64 -j RETURN
-A KUBE-SHAPES -p tcp -m tcp -j DNAT --to-destination [fd00::5]:80
-A KUBE-SHAPES -p tcp -m tcp -j DNAT --to-destination [::ffff:1.2.3.4]:80
COMMIT
"""}


def test_rules_alike_but_for_their_addresses_each_decode_as_saved(ns):
    """Every rule composed from a shared shape has its own addresses and DNAT: read twice by
    one source (the second read takes every shape from the memo), both equal the save."""
    for family, text in SAME_SHAPES.items():
        ns.restore(text, family, "legacy")
    source = IptablesLegacySource(Paths(), reread_interval=0.0)
    for _ in range(2):
        read = {ruleset.family: ruleset for ruleset in ns.run(source.read)}
        for family in (4, 6):
            [saved] = parse_save(ns.save(family, "legacy"), family)
            assert read[family].tables["nat"]["KUBE-SHAPES"] == saved.tables["nat"]["KUBE-SHAPES"], family
    assert source.decoded == 0
    rules = read[4].tables["nat"]["KUBE-SHAPES"]
    assert [r.source for r in rules[:2]] == ["10.1.0.0/16", "10.2.0.0/16"]
    assert [r.to_destination for r in rules[6:8]] == ["10.180.0.1:80", "10.180.0.2:81"]
    assert [r.source for r in read[6].tables["nat"]["KUBE-SHAPES"][:2]] == [
        str(ipaddress.ip_network(f"::ffff:1.2.3.{last}/128")) for last in (4, 5)]  # as ipaddress prints them


# Chains alike but for their own parts: one is learned as a template, the others are read from
# it (their addresses, jumps, DNATs and comments set on its rules), or, where a part is not what
# a template can set (a DNAT to a range of addresses or ports), entry by entry.
ALIKE_CHAINS = "\n".join(["*nat", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-SVC-X - [0:0]", ":KUBE-SVC-Y - [0:0]"]
                         + [f":KUBE-SEP-{i} - [0:0]" for i in range(6)] + [
    "-A KUBE-SVC-X -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-0",
    "-A KUBE-SVC-X -j KUBE-SEP-1",
    "-A KUBE-SVC-Y -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-2",
    "-A KUBE-SVC-Y -j KUBE-SEP-3"] + [
    line for i, (address, dnat) in enumerate((
        ("10.0.0.10", "10.180.0.10:80"), ("10.0.0.11", "10.180.0.11:8080"), ("10.0.0.12", "10.180.0.12-10.180.0.13:80"),
        ("10.0.0.13", "10.180.0.13:80-81"), ("10.0.0.14", "10.180.0.14:80"), ("10.0.0.15", "10.180.0.15:80")))
    for line in (f'-A KUBE-SEP-{i} -m comment --comment "ns/svc{i}:p" -s {address}/32 -j KUBE-MARK-MASQ',
                 f'-A KUBE-SEP-{i} -m comment --comment "ns/svc{i}:p" -p tcp -m tcp -j DNAT --to-destination {dnat}')]
    + [f":KUBE-SEP-{i} - [0:0]" for i in range(6, 10)] + [  # without comments, as past 1,000 endpoints
    line for i, (address, dnat) in enumerate((
        ("10.0.0.16", "10.180.0.16:80"), ("10.0.0.17", "10.180.0.17:8080"), ("10.0.0.18", "10.180.0.18-10.180.0.19:80"),
        ("10.0.0.19", "10.180.0.19:443")), 6)
    for line in (f"-A KUBE-SEP-{i} -s {address}/32 -j KUBE-MARK-MASQ",
                 f"-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {dnat}")]
    + ["COMMIT", ""])


def test_chains_alike_decode_from_a_template_as_saved(ns):
    ns.restore(ALIKE_CHAINS, 4, "legacy")
    source = IptablesLegacySource(Paths(), reread_interval=0.0)
    for _ in range(2):  # the second read takes the first one's templates
        [read] = ns.run(source.read)
        [saved] = parse_save(ns.save(4, "legacy"), 4)
        for chain, rules in saved.tables["nat"].items():
            assert read.tables["nat"][chain] == rules, chain
    templates = source._memos[(4, "nat")].chains
    assert templates and sum(map(len, templates.values())) < 6  # not one per chain
    sep = read.tables["nat"]["KUBE-SEP-5"]
    assert (sep[0].source, sep[0].comment, sep[1].to_destination) == ("10.0.0.15/32", "ns/svc5:p", "10.180.0.15:80")
    sep = read.tables["nat"]["KUBE-SEP-9"]
    assert (sep[0].source, sep[0].target, sep[1].to_destination) == ("10.0.0.19/32", "KUBE-MARK-MASQ",
                                                                      "10.180.0.19:443")
    assert read.tables["nat"]["KUBE-SVC-Y"][1].target == "KUBE-SEP-3"


def test_a_reads_comments_are_not_kept_past_their_chain(ns):
    """Comments are one Service's each: the read's memo of pieces keeps none of them (kept for
    the whole read, they pinned memory among the resolution), and the rules still carry them."""
    ns.load(generated_services(), 4, backend="legacy")
    blob = _fetch(ns)
    lazy = LazyChains(bytearray(blob.buffer), iptables_legacy._GET_ENTRIES_HEAD.size, blob.info.size, 4,
                      blob.hooks, blob.underflows)
    decoded = {name: lazy[name] for name in lazy}
    assert sum(rule.comment is not None for rules in decoded.values() for rule in rules) > 20
    kept = [key for key in lazy._pieces if isinstance(key[0], bytes) and key[0][2:10] == b"comment\0"]
    assert kept == [] and lazy._pieces, f"{len(kept)} comments kept"


def test_the_resolver_keeps_no_endpoint_chain_past_its_service():
    """An endpoint chain's resolution is its Service chain's part and not kept for the rest of
    the read (50,000 of them, kept, pinned memory among the resolution); the frontends are
    the same as when they were kept."""
    from exporter.readers import iptables

    [rules] = parse_save(ruleset(generated_services(), 4, jumps=False), 4)
    family = iptables._Family(rules.family)
    family.read(rules, {})
    assert any(chain.startswith(iptables.SVC) for _, chain, _ in family.frontend_list)
    assert family.resolved and not [chain for chain in family.resolved if chain.startswith(iptables.SEP)]
    assert sum(len(vs.real_servers) for vs in family.table.values()) > 10
    assert family.table == iptables.resolve_rulesets([rules]).table


def test_a_resolution_of_unchanged_rules_keeps_the_last_ones_keys_too():
    """Unchanged frontends are the last read's objects, and so are the table's keys: a re-read
    (every 30 s on the legacy backend) then keeps nothing new of them (new keys, made among the
    read's transients, pinned ~10 MB more with each re-read at 10,000 Services)."""
    from exporter.readers import iptables

    [rules] = parse_save(ruleset(generated_services(), 4, jumps=False), 4)
    cache: dict = {}
    first = iptables.resolve_rulesets([rules], None, cache).table
    again = iptables.resolve_rulesets([rules], None, cache).table
    assert again == first and len(first) > 5
    keys = {key: key for key in first}
    assert all(keys[key] is key and again[key] is first[key] for key in again)


def test_a_whole_resolution_keeps_the_last_frontend_list_entries_where_equal():
    """A source that cannot say what changed (the legacy blob's chains) is resolved whole each
    time; the frontend list it makes anew (each frontend's key, chain name and comment) is
    the last one's entries where equal: new ones, made among the read's decoded rules and
    kept, pinned ~5 MB of the allocator's arenas with every legacy re-read at 10,000 Services."""
    from types import MappingProxyType

    from exporter.readers import iptables
    from exporter.readers.iptables_rules import IptablesRuleset

    def whole(text: str):  # read afresh, as a re-read decodes it: equal, not the same objects
        [rules] = parse_save(text, 4)
        return IptablesRuleset(4, {name: MappingProxyType(chains) for name, chains in rules.tables.items()})

    text = ruleset(generated_services(), 4, jumps=False)
    cache: dict = {}
    iptables.resolve_rulesets([whole(text)], None, cache)
    first = list(cache["families"][4].frontend_list)
    again = iptables.resolve_rulesets([whole(text)], None, cache)
    entries = cache["families"][4].frontend_list
    assert entries == first and len(first) > 5 and again.table
    assert all(entry is before for entry, before in zip(entries, first))
    # A frontend whose rule changed (its comment) is the new entry; the others stay the last ones.
    key, chain, comment = first[0]
    assert comment and f'"{comment}"' in text
    iptables.resolve_rulesets([whole(text.replace(f'"{comment}"', '"renamed"', 1))], None, cache)
    entries = cache["families"][4].frontend_list
    assert entries[0] == (key, chain, "renamed") and entries[0] is not first[0]
    assert all(entry is before for entry, before in zip(entries[1:], first[1:]))


def test_an_unknown_match_lands_in_unknown(ns):
    ns.iptables("-t", "nat", "-N", "KUBE-X", backend="legacy")
    ns.iptables("-t", "nat", "-A", "KUBE-X", "-m", "length", "--length", "100:200", "-j", "RETURN", backend="legacy")
    read = ns.run(IptablesLegacySource(Paths()).read)
    assert read[0].tables["nat"]["KUBE-X"] == (IptablesRule("RETURN", unknown=("-m length",)),)


def _fetch(ns: IptNS, table: str = "nat", family: int = 4) -> iptables_legacy.TableBlob:
    def fetch():
        with iptables_legacy._socket(family) as sock:
            return iptables_legacy.fetch_table(sock, family, table)

    return ns.run(fetch)


def _decode(blob: iptables_legacy.TableBlob, buffer: bytes | bytearray | None = None, size: int | None = None):
    head = iptables_legacy._GET_ENTRIES_HEAD.size
    return decode_table(bytearray(blob.buffer if buffer is None else buffer), head,
                        blob.info.size if size is None else size, blob.info.family, blob.hooks, blob.underflows)


def test_a_cut_blob_is_one_reason_never_a_part_of_the_table(legacy_ns):
    blob = _fetch(legacy_ns)
    whole = _decode(blob)
    assert "KUBE-SERVICES" in whole
    head, size = iptables_legacy._GET_ENTRIES_HEAD.size, blob.info.size
    for cut in (0, 1, 111, 112, size // 3, size // 2, size - 64, size - 1):
        # Fewer bytes than the info says, or the info agreeing with the cut: both refused.
        for buffer, claimed in ((blob.buffer[:head + cut], size), (blob.buffer[:head + cut], cut)):
            with pytest.raises(BlobError) as caught:
                _decode(blob, buffer, claimed)
            assert "\n" not in str(caught.value) and str(caught.value), cut


def test_a_corrupt_blob_is_one_reason_or_a_whole_table(legacy_ns):
    """Bytes changed at random: either the decode says why in one line, or it reads a whole
    table (a changed address or port still makes a table); nothing else escapes."""
    blob = _fetch(legacy_ns)
    rng = random.Random(14)
    refused = 0
    for _ in range(300):
        buffer = bytearray(blob.buffer)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(iptables_legacy._GET_ENTRIES_HEAD.size, len(buffer))
            buffer[at] = rng.randrange(256)
        try:
            chains = _decode(blob, buffer)
        except BlobError as err:
            refused += 1
            assert str(err) and "\n" not in str(err)
        else:
            assert isinstance(chains, dict) and all(isinstance(rules, tuple) for rules in chains.values())
        # Lazily: refused when built (the whole walk's checks) or when a chain is decoded, in one
        # line; a chain that decodes is whole.
        try:
            lazy = LazyChains(buffer, iptables_legacy._GET_ENTRIES_HEAD.size, blob.info.size, blob.info.family,
                              blob.hooks, blob.underflows)
            assert all(isinstance(lazy[name], tuple) for name in lazy)
        except BlobError as err:
            assert str(err) and "\n" not in str(err)
    assert refused > 10  # offsets, sizes and verdicts were hit, and said so


def test_a_jump_to_no_chain_is_refused_when_its_chain_is_decoded(legacy_ns):
    """The up-front walk checks the table's shape (offsets, chain bounds); a rule's verdict is
    checked when its chain is decoded: a jump moved off its chain's first rule is one line
    then, and the chains around it still decode whole."""
    blob = _fetch(legacy_ns)
    head = iptables_legacy._GET_ENTRIES_HEAD.size
    lazy = LazyChains(bytearray(blob.buffer), head, blob.info.size, 4, blob.hooks, blob.underflows)
    chain = next(name for name in lazy if name.startswith("KUBE-SVC-"))
    first = lazy._spans[chain] >> 64
    lazy.release()
    # The chain's first rule jumps (-m statistic ... -j KUBE-SEP-...): its verdict 8 bytes on.
    target_offset = int.from_bytes(blob.buffer[head + first + 88:head + first + 90], sys.byteorder)
    verdict_at = head + first + target_offset + 32
    buffer = bytearray(blob.buffer)
    verdict = int.from_bytes(buffer[verdict_at:verdict_at + 4], sys.byteorder, signed=True)
    assert verdict > 0
    buffer[verdict_at:verdict_at + 4] = (verdict + 8).to_bytes(4, sys.byteorder, signed=True)
    lazy = LazyChains(buffer, head, blob.info.size, 4, blob.hooks, blob.underflows)
    with pytest.raises(BlobError) as caught:
        lazy[chain]
    assert "where no chain starts" in str(caught.value) and "\n" not in str(caught.value)
    assert all(isinstance(lazy[name], tuple) for name in lazy if name != chain)
    with pytest.raises(BlobError):
        _decode(blob, buffer)


def test_the_source_names_a_blob_it_cannot_decode(legacy_ns, monkeypatch):
    real = iptables_legacy.fetch_table

    def cut(sock, family, table, tries=3):
        blob = real(sock, family, table, tries)
        return blob._replace(buffer=blob.buffer[:len(blob.buffer) // 2])

    monkeypatch.setattr(iptables_legacy, "fetch_table", cut)
    said = _read_error(legacy_ns, IptablesLegacySource(Paths()))
    assert said.startswith("ip_tables table nat: the kernel's blob not understood: ")


@pytest.mark.parametrize("lazy", [False, True])
def test_a_reread_decodes_no_repeated_shape_again(ns, lazy):
    """One endpoint's address swapped: the next read takes every repeated shape (the address
    parts without an address, the matches-and-targets without a comment or DNAT) from the
    source's memo, decodes the rest from its pieces, and is the save's again. Lazy chains
    (decoded when asked for, after the read) keep the memo's shapes as well."""
    ns.load(generated_services(), 4, backend="legacy")
    source = IptablesLegacySource(Paths(), reread_interval=0.0, lazy=lazy)

    def read_all():
        return [{table: dict(chains) for table, chains in r.tables.items()} for r in ns.run(source.read)]

    read_all()
    first = source.decoded
    rules = ns.save(4, "legacy", "nat")
    ns.iptables(backend="legacy", tool="-restore", input=rules.replace("10.180.0.1:80", "10.180.0.5:80"))
    read_all()
    assert first > 10 and source.decoded == 0, (first, source.decoded)
    assert_decodes_as_saved(ns, families=(4,), lazy=lazy)
    # A shape not met before (a new kind of rule) is decoded, once.
    ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-p", "udp", "-m", "udp", "--sport", "4242", "-j", "RETURN",
                backend="legacy")
    read_all()
    assert source.decoded == 1  # its body (-m udp --sport 4242, a verdict); -p udp was met before


# --- IptablesDataplane over the legacy backend -------------------------------------------------

def test_the_dataplane_reads_nothing_while_nothing_changed(legacy_ns):
    from exporter.readers.dataplanes import IptablesDataplane

    clock = Clock()
    legacy = IptablesLegacySource(Paths(), clock=clock, keep=False)
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=legacy, nft=None, clock=clock))
    first = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert first.backend == "legacy" and first.reread and legacy.reread
    assert first.read.table and not first.read.unread
    clock.now += 20  # within the re-read interval
    again = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert not again.reread and not legacy_ns.run(legacy.due), "the tables were read with nothing changed"
    assert again.read is first.read and again.tables == first.tables
    assert again.read_seconds < first.read_seconds
    # A change: read and resolved again.
    legacy_ns.iptables("-t", "nat", "-A", "KUBE-SERVICES", "-d", "10.0.0.99/32", "-j", "RETURN", backend="legacy")
    clock.now += 1  # past the scrape window, well within the re-read interval
    moved = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert moved.reread and legacy.reread and moved.read is not first.read


def test_the_dataplane_decodes_only_the_chains_it_resolves(legacy_ns, monkeypatch):
    """The dataplane's own legacy source is lazy: the resolver decodes each chain it walks,
    once (an endpoint chain twice when both a Service's chains reach it: the resolver keeps
    no endpoint chain's resolution), and never the ones no frontend reaches (marks,
    POSTROUTING, INPUT)."""
    from collections import Counter

    from exporter.readers.dataplanes import IptablesDataplane

    dataplane = legacy_ns.run(lambda: IptablesDataplane(nft=None))
    assert dataplane.legacy.lazy and not dataplane.legacy.keep
    seen = []
    real_read = dataplane.legacy.read
    monkeypatch.setattr(dataplane.legacy, "read", lambda known=None, **kw: seen.append(real_read(**kw)) or seen[-1])
    asked = []
    real_chain = LazyChains.__getitem__
    monkeypatch.setattr(LazyChains, "__getitem__", lambda chains, name: asked.append((chains, name))
                        or real_chain(chains, name))
    live = legacy_ns.run(lambda: dataplane.read_rules(0))
    assert live.read.table and not live.read.unread
    [[ruleset]] = seen
    nat = ruleset.tables["nat"]
    assert isinstance(nat, LazyChains)
    times = Counter(name for chains, name in asked if chains is nat)
    assert nat.decoded_chains == sum(times.values())
    assert 0 < len(times) <= len(nat) - 4, (len(times), len(nat))
    assert all(name.startswith("KUBE-SEP-") and count == 2 for name, count in times.items() if count > 1)
    [saved] = parse_save(legacy_ns.save(4, "legacy"), 4)
    assert dict(nat.lengths()) == {c: len(r) for c, r in saved.tables["nat"].items()}
    assert {(t.table, t.rules) for t in live.tables} == {
        (table, sum(len(r) for r in chains.values())) for table, chains in saved.tables.items()}


def test_the_dataplane_hands_freed_pages_back_after_each_whole_legacy_read(legacy_ns, monkeypatch):
    from exporter import allocator
    from exporter.readers.dataplanes import IptablesDataplane

    trims = []
    monkeypatch.setattr(allocator, "trim", lambda: trims.append(1) or True)
    clock = Clock()
    legacy = IptablesLegacySource(Paths(), clock=clock, keep=False, lazy=True)
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=legacy, nft=None, clock=clock))
    assert legacy_ns.run(lambda: dataplane.read_rules(max_age=0)).reread and len(trims) == 1
    clock.now += 20  # nothing changed, within the re-read interval: no read, no trim
    assert not legacy_ns.run(lambda: dataplane.read_rules(max_age=0)).reread and len(trims) == 1
    clock.now += 20  # past it, the same rules: fetched and found the same, nothing decoded
    assert not legacy_ns.run(lambda: dataplane.read_rules(max_age=0)).reread and len(trims) == 1
    _same_size_change(legacy_ns)
    clock.now += 40  # past it, an endpoint swapped (the signal did not move): read whole again
    assert legacy_ns.run(lambda: dataplane.read_rules(max_age=0)).reread and len(trims) == 2


def _same_size_change(ns) -> str:
    """One endpoint's DNAT address swapped for one of the same length: the tables' entry
    count and size stay, so only the clock's re-read can find it. Gives the new address."""
    text = ns.save(4, "legacy", "nat")
    old = next(line.split("--to-destination ")[1].split(":")[0] for line in text.splitlines() if "-j DNAT" in line)
    new = old[:-1] + ("7" if old[-1] != "7" else "8")
    before = iptables_legacy.IptablesLegacySource(Paths()).change_signal
    signal = ns.run(before)
    ns.iptables(backend="legacy", tool="-restore", input=text.replace(f"{old}:", f"{new}:"))
    assert ns.run(before) == signal, "the change moved the tables' count or size"
    return new


def test_a_decoding_reads_digest_is_the_one_the_clocks_re_read_takes(legacy_ns):
    """A read that decodes takes its tables' digests from the chains' walk (which zeroes the
    counters on its way), the clock's re-read from ``rules_digest`` alone: the two must be
    equal on the same rules whatever their counters say, and differ on other rules."""
    from exporter.readers.iptables_blob import rules_digest

    legacy_ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-c", "7", "700", "-j", "RETURN", backend="legacy")
    legacy_ns.iptables("-t", "nat", "-P", "POSTROUTING", "ACCEPT", "-c", "3", "300", backend="legacy")
    head = iptables_legacy._GET_ENTRIES_HEAD.size

    def digests():
        with iptables_legacy._socket(4) as sock:
            blob = iptables_legacy.fetch_table(sock, 4, "nat")
        counted, walked = bytes(blob.buffer), bytearray(blob.buffer)
        digest = LazyChains(walked, head, blob.info.size, 4, blob.hooks, blob.underflows).digest()
        assert walked != counted  # the rules' counters were not all zero: the walk zeroed them
        return digest, rules_digest(bytearray(counted), head, blob.info.size, 4)

    walked, alone = legacy_ns.run(digests)
    assert walked == alone
    legacy_ns.iptables("-t", "nat", "-R", "KUBE-MARK-MASQ", "2", "-c", "9", "900", "-j", "RETURN", backend="legacy")
    assert legacy_ns.run(digests)[0] == walked  # the counters alone moved
    legacy_ns.iptables("-t", "nat", "-R", "KUBE-MARK-MASQ", "2", "-c", "7", "700", "-j", "ACCEPT", backend="legacy")
    changed = legacy_ns.run(digests)
    assert changed[0] == changed[1] != walked


def test_the_clocks_re_read_finds_a_swapped_endpoint_the_signal_does_not_show(legacy_ns):
    """The periodic re-read compares digests of the rules (counters aside): the same rules
    are not decoded or resolved again, an endpoint swapped for one of the same length is."""
    from exporter.readers.dataplanes import IptablesDataplane

    clock = Clock()
    legacy = IptablesLegacySource(Paths(), clock=clock, keep=False, lazy=True)
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=legacy, nft=None, clock=clock))
    first = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    clock.now += 40
    same = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert not same.reread and same.read is first.read
    new = _same_size_change(legacy_ns)
    clock.now += 40
    moved = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert moved.reread and moved.read.table != first.read.table
    assert any(server[0] == new for vs in moved.read.table.values() for server in vs.real_servers)


def _nat_undecodable(fetch_table):
    """``fetch_table`` whose nat blob has KUBE-SERVICES' first rule (it has matches: -m
    comment, -m tcp) cut: the walk over the table passes, the decode of that chain, which
    the resolver asks for, fails."""
    from exporter.readers.iptables_blob import ENTRY_SIZE

    def corrupt(sock, family, table, tries=3):
        blob = fetch_table(sock, family, table, tries)
        if table == "nat":
            head = iptables_legacy._GET_ENTRIES_HEAD.size
            chains = LazyChains(bytearray(blob.buffer), head, blob.info.size, family, blob.hooks, blob.underflows)
            first = chains._spans["KUBE-SERVICES"] >> 64
            blob.buffer[head + first + ENTRY_SIZE[family]:head + first + ENTRY_SIZE[family] + 2] = b"\xf8\xff"
            LazyChains(bytearray(blob.buffer), head, blob.info.size, family, blob.hooks, blob.underflows)  # the walk passes
        return blob

    return corrupt


def test_a_chain_that_does_not_decode_fails_the_dataplanes_read_in_one_line(legacy_ns, monkeypatch):
    """The lazy source walks the whole table up front but decodes a chain's matches only when
    the resolver asks: a match whose size runs past its entry then fails the read, naming
    the table, never a traceback and never a table without that chain's frontends."""
    from exporter.readers.dataplanes import IptablesDataplane, ReadFailed

    monkeypatch.setattr(iptables_legacy, "fetch_table", _nat_undecodable(iptables_legacy.fetch_table))
    dataplane = legacy_ns.run(lambda: IptablesDataplane(nft=None))
    with pytest.raises(ReadFailed) as caught:
        legacy_ns.run(lambda: dataplane.read_rules(0))
    said = str(caught.value)
    assert said.startswith("kube-proxy's iptables-legacy rules not read: ip_tables table nat: the kernel's blob "
                           "not understood: ") and "\n" not in said, said


def test_a_read_that_failed_is_not_followed_by_the_last_good_one(legacy_ns, monkeypatch):
    """The source takes a read's change signal as seen when it hands the tables over, and
    the resolver decodes their chains afterwards: when that decode fails, no later scrape
    may serve the read from before the change as "nothing changed since". The same bytes
    fail the same way: while the signal stays, the failure is said again without fetching
    the tables, until the clock's re-read is due; once the signal moves, they are read."""
    from exporter.readers.dataplanes import IptablesDataplane, ReadFailed

    clock = Clock()
    legacy = IptablesLegacySource(Paths(), clock=clock, keep=False, lazy=True)
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=legacy, nft=None, clock=clock))
    good = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert good.read.table and not good.read.unread
    real = iptables_legacy.fetch_table
    undecodable = _nat_undecodable(real)
    fetched = []

    def counted(*args, **kwargs):
        fetched.append(args[2])
        return undecodable(*args, **kwargs)

    monkeypatch.setattr(iptables_legacy, "fetch_table", counted)
    legacy_ns.iptables("-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "RETURN", backend="legacy")  # the signal moves
    clock.now += 1
    with pytest.raises(ReadFailed) as first:
        legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert "nat" in fetched
    fetched.clear()
    clock.now += 1  # the next scrape: the signal has not moved since the failed read
    with pytest.raises(ReadFailed) as again:
        legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert str(again.value) == str(first.value) and fetched == []
    clock.now += 40  # the clock's re-read is due: fetched again, and failing again
    with pytest.raises(ReadFailed):
        legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert "nat" in fetched
    monkeypatch.setattr(iptables_legacy, "fetch_table", real)
    legacy_ns.iptables("-t", "nat", "-D", "KUBE-MARK-MASQ", "-j", "RETURN", backend="legacy")  # mended: it moves
    clock.now += 1
    mended = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert mended.reread and mended.read.table == good.read.table and not mended.read.unread


def test_no_kube_proxy_rules_anywhere_is_an_empty_table(ns):
    from exporter.readers.dataplanes import IptablesDataplane

    dataplane = ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths()), nft=None))
    live = ns.run(dataplane.read)
    assert (live.table, live.rejected, live.unread) == ({}, {}, ())


def test_a_legacy_nat_table_flushed_before_the_first_read_is_every_frontend_missing(legacy_ns):
    """The exporter starts after firewalld flushed the nat table: kube-proxy's filter chains
    in iptables-legacy say where its rules were, and nothing from iptables-nft hides that."""
    from exporter.readers.dataplanes import IptablesDataplane
    from exporter.readers.iptables_nft import IptablesNftSource

    legacy_ns.iptables("-t", "nat", "-F", backend="legacy")
    legacy_ns.iptables("-t", "nat", "-X", backend="legacy")
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths(), keep=False),
                                                        nft=IptablesNftSource()))
    live = legacy_ns.run(lambda: dataplane.read_rules(0))
    assert live.backend == "legacy"
    assert live.read.table == {} and live.read.rejected, "the filter table's REJECTs are still read"


def test_a_read_that_failed_to_decode_is_not_the_digest_the_clocks_re_read_compares(legacy_ns, monkeypatch):
    """A source that decodes at once (not lazy), for a caller that keeps what it made of
    the last read (``unchanged_ok``): when a re-read's decode fails, the caller has nothing
    of it, so the clock's next re-read must not find the rules "the same as last time" by
    the failed read's digests and hand back None (the read from before the change)."""
    clock = Clock()
    source = IptablesLegacySource(Paths(), clock=clock, keep=False, lazy=False)
    first = legacy_ns.run(lambda: source.read(unchanged_ok=False))
    assert first
    new = _same_size_change(legacy_ns)
    real = iptables_legacy.decode_table

    def fails(*args, **kwargs):
        raise BlobError("an entry's size runs past the table")

    monkeypatch.setattr(iptables_legacy, "decode_table", fails)
    clock.now += 40
    with pytest.raises(LegacyReadError):
        legacy_ns.run(lambda: source.read(unchanged_ok=True))
    monkeypatch.setattr(iptables_legacy, "decode_table", real)
    clock.now += 1
    again = legacy_ns.run(lambda: source.read(unchanged_ok=True))
    assert again is not None, "the failed read's digests were taken as the rules the caller holds"
    nat = again[0].tables["nat"]
    assert any(rule.to_destination and rule.to_destination.startswith(f"{new}:")
               for rules in nat.values() for rule in rules)


def test_the_re_read_clock_counts_from_when_the_tables_were_fetched(legacy_ns):
    """Reads begin at scrape times: a scrape one interval after the last read began (a hair
    early, as scrapes are) must find the re-read due. Counted from the read's end, it was
    not, and a swapped endpoint waited a whole scrape interval more (every 45 s at 15 s
    scrapes: bench soak)."""
    clock = Clock()
    source = IptablesLegacySource(Paths(), clock=clock, keep=False, lazy=True)
    fetch = source._read_all

    def taking_time(*args, **kwargs):
        out = fetch(*args, **kwargs)
        clock.now += 0.4  # what the fetch and decode took
        return out

    source._read_all = taking_time
    legacy_ns.run(source.read)
    started = clock.now - 0.4
    new = _same_size_change(legacy_ns)
    clock.now = started + source.reread_interval - 0.01
    assert legacy_ns.run(source.due), "the re-read was not due one interval after the last read began"
    again = legacy_ns.run(lambda: source.read(unchanged_ok=True))
    assert source.reread and again is not None
    assert any(rule.to_destination and rule.to_destination.startswith(f"{new}:")
               for chain in again[0].tables["nat"].values() for rule in chain)


def test_the_latency_follower_finds_a_swapped_endpoint_sooner_than_the_clock(legacy_ns):
    """A swapped endpoint moves neither the legacy tables' count nor their size: only a fetch
    sees it, every 30 s. Waiting on a change, the latency follower would have measured that
    clock, not the proxy; its reads fetch the tables sooner, no more often than 20 times
    what the last fetch cost."""
    from exporter.readers import dataplanes
    from exporter.readers.dataplanes import IptablesDataplane

    clock = Clock()
    legacy = IptablesLegacySource(Paths(), clock=clock, keep=False, lazy=True)
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=legacy, nft=None, clock=clock))
    first = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    new = _same_size_change(legacy_ns)
    dataplane._legacy_cost = 0.5  # the last fetch took half a second: every 10 s at most
    clock.now += 2
    assert not legacy_ns.run(lambda: dataplane.read_rules(max_age=0)).reread  # the scrape's: the 30 s clock
    assert not legacy_ns.run(lambda: dataplane.read_rules(max_age=0, following=True)).reread
    clock.now += dataplanes.FOLLOW_LEGACY_COST * 0.5 - 2  # the bound passed since the last fetch
    followed = legacy_ns.run(lambda: dataplane.read_following(max_age=0))
    assert followed.table != first.read.table
    assert any(server[0] == new for vs in followed.table.values() for server in vs.real_servers)
