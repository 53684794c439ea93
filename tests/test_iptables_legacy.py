"""The iptables-legacy source on the real kernel: x_tables in a network namespace of the test's own.

kube-proxy's rules (tests/ipt_rulesets.py, its newest iptables layout) are loaded with
`iptables-legacy-restore` inside the namespace; the source runs in a thread that joined
it (``IptNS.run``), so its getsockopt socket, /proc/thread-self/net and its children are
the namespace's. Each failure of the `iptables-legacy-save` child (missing, slow, killed,
failing, over its memory limit, printing something else) is a stand-in script given as
the command, and must come out as one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exporter.paths import Paths
from exporter.readers.iptables_legacy import IptablesLegacySource, LegacyReadError
from tests.ipt_rulesets import IptNS, generated_services, generated_services_v6

REPO = Path(__file__).resolve().parents[1]


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


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}-{os.getpid()}"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


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


def test_a_missing_save_binary_is_one_line(legacy_ns):
    source = IptablesLegacySource(Paths(), commands={4: f"no-such-iptables-legacy-save-{os.getpid()}", 6: "x"})
    assert _read_error(legacy_ns, source) == (f"no-such-iptables-legacy-save-{os.getpid()} not found in PATH (the "
                                              "iptables package's legacy tools read kube-proxy's iptables-legacy "
                                              "rules)")


def test_a_slow_save_is_killed_at_the_deadline(legacy_ns, tmp_path):
    slow = _script(tmp_path, "slow-save", "exec sleep 30")
    source = IptablesLegacySource(Paths(), timeout=0.5, commands={4: slow, 6: slow})
    assert _read_error(legacy_ns, source) == f"{slow} timed out after 0.5 s (killed)"


def test_a_crashed_failing_or_babbling_save_is_one_line(legacy_ns, tmp_path):
    crash = _script(tmp_path, "crash-save", "kill -SEGV $$")
    fail = _script(tmp_path, "fail-save", "echo 'iptables-save v1.8.9 (legacy): Cannot initialize: Permission "
                                          "denied (you must be root)' >&2; exit 1")
    said = _read_error(legacy_ns, IptablesLegacySource(Paths(), commands={4: crash, 6: crash}))
    assert said == f"{crash} -t nat died of SIGSEGV (memory limit 512 MiB)"
    said = _read_error(legacy_ns, IptablesLegacySource(Paths(), commands={4: fail, 6: fail}))
    assert said == (f"{fail} -t nat exited 1: iptables-save v1.8.9 (legacy): Cannot initialize: Permission "
                    "denied (you must be root)")


def test_the_child_runs_under_the_memory_limit(legacy_ns, tmp_path):
    # The child asks for 256 MiB under a 128 MiB address-space limit: refused in the child,
    # whose failure is then the read's; the exporter's own memory is untouched.
    greedy = _script(tmp_path, "greedy-save", f"exec {sys.executable} -c 'bytearray(256 << 20)'")
    said = _read_error(legacy_ns, IptablesLegacySource(Paths(), memory_limit=128 << 20,
                                                       commands={4: greedy, 6: greedy}))
    assert said == f"{greedy} -t nat exited 1: MemoryError"


def test_without_cap_net_admin_the_signal_says_so(legacy_ns):
    """As the DaemonSet runs (uid 0, capabilities dropped): the getsockopt is refused with
    EPERM, and the reason names the capability; the save child needs NET_RAW besides."""
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

    assert run() == ("ERROR ip_tables table nat: permission denied (the table info getsockopt needs "
                     "CAP_NET_ADMIN)")
    assert run("net_raw") == run()
    # The signal needs NET_ADMIN alone; iptables-legacy-save's raw socket NET_RAW too.
    assert run("net_admin") == ("SIGNAL\nERROR iptables-legacy-save -t nat exited 1: iptables-save v1.8.9 "
                                "(legacy): Cannot initialize: Permission denied (you must be root)")
    assert run("net_admin", "net_raw") == "SIGNAL\nREAD 1"


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
    assert [run.command for run in source.runs] == ["iptables-legacy-save"] * 2 + ["ip6tables-legacy-save"] * 2
    nat = first[0].tables["nat"]
    assert "KUBE-SERVICES" in nat and any(name.startswith("KUBE-SEP-") for name in nat)
    # Nothing moved: the same rulesets, no child.
    assert ns.run(source.read) is first and not source.reread
    # A rule added: the signal moved, the children run again.
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
    clock.now += 59
    assert ns.run(source.read) is first and not source.reread
    clock.now += 2
    again = ns.run(source.read)
    assert source.reread and again[0].tables["nat"][sep][-1].to_destination == "10.180.0.5:80"


def test_output_that_is_not_iptables_save_is_one_line(legacy_ns, tmp_path):
    babble = _script(tmp_path, "babble-save", "echo 'Usage: something else entirely'")
    said = _read_error(legacy_ns, IptablesLegacySource(Paths(), commands={4: babble, 6: babble}))
    assert said.startswith(f"{babble} -t nat: output not understood: ")


# --- IptablesDataplane over the legacy backend -------------------------------------------------

def test_the_dataplane_runs_no_child_while_nothing_changed(legacy_ns):
    from exporter.readers.dataplanes import IptablesDataplane

    clock = Clock()
    legacy = IptablesLegacySource(Paths(), clock=clock, keep=False)
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=legacy, nft=None, clock=clock))
    first = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert first.backend == "legacy" and first.reread and len(legacy.runs) == 2
    assert first.read.table and not first.read.unread
    legacy.runs = []
    clock.now += 30
    again = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert not again.reread and legacy.runs == [], "a child ran with nothing changed"
    assert again.read is first.read and again.tables == first.tables
    assert again.read_seconds < first.read_seconds
    # A change: read and resolved again.
    legacy_ns.iptables("-t", "nat", "-A", "KUBE-SERVICES", "-d", "10.0.0.99/32", "-j", "RETURN", backend="legacy")
    clock.now += 1  # past the scrape window, well within the re-read interval
    moved = legacy_ns.run(lambda: dataplane.read_rules(max_age=0))
    assert moved.reread and len(legacy.runs) == 2 and moved.read is not first.read


def test_no_kube_proxy_rules_anywhere_is_an_empty_table(ns):
    from exporter.readers.dataplanes import IptablesDataplane

    dataplane = ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths()), nft=None))
    live = ns.run(dataplane.read)
    assert (live.table, live.rejected, live.unread) == ({}, {}, ())


def test_a_legacy_nat_table_flushed_before_the_first_read_is_every_frontend_missing(legacy_ns):
    """The exporter starts after firewalld flushed the nat table: kube-proxy's filter chains
    in iptables-legacy say where its rules were, and nothing from iptables-nft hides that."""
    from exporter.readers.dataplanes import IptablesDataplane
    from exporter.readers.iptables_netlink import IptablesNftSource

    legacy_ns.iptables("-t", "nat", "-F", backend="legacy")
    legacy_ns.iptables("-t", "nat", "-X", backend="legacy")
    dataplane = legacy_ns.run(lambda: IptablesDataplane(legacy=IptablesLegacySource(Paths(), keep=False),
                                                        nft=IptablesNftSource()))
    live = legacy_ns.run(lambda: dataplane.read_rules(0))
    assert live.backend == "legacy"
    assert live.read.table == {} and live.read.rejected, "the filter table's REJECTs are still read"
