"""Inside the VM: the IPVS reader against a real kernel, checked field by field with ipvsadm."""

from __future__ import annotations

import random
import subprocess
import threading
import time

import pytest

from exporter.dataplane import VirtualServerKey
from exporter.readers.ipvs import (IPVSNetlink, IPVSReader, dump_service_flags, parse_ip_vs,
                                   read_ip_vs, read_ip_vs_text, read_virtual_server)
from tests.ipvsadm import comparable, parse_list_counters, parse_save
from tests.kernel import ipvs_tables
from tests.helpers import make_runner, samples, value


@pytest.fixture(scope="module")
def ipvs_modules():
    ipvs_tables.load_modules()  # modprobe is slow in an emulated guest: once


@pytest.fixture
def ipvs(ipvs_modules):
    ipvs_tables.clear()
    yield ipvs_tables
    ipvs_tables.clear()


def reference():
    """The table as ipvsadm reads it (netlink), with its counters."""
    table = parse_save(ipvs_tables.ipvsadm("-Sn"))
    return table, parse_list_counters(ipvs_tables.ipvsadm("-Ln", "--exact"))


def assert_same(got, want, **kw):
    a, b = comparable(got, **kw), comparable(want, **kw)
    if a != b:
        missing = [k for k in b if k not in a][:5]
        extra = [k for k in a if k not in b][:5]
        differ = [(k, a[k], b[k]) for k in a if k in b and a[k] != b[k]][:5]
        pytest.fail(f"reader != ipvsadm: {len(a)} vs {len(b)} virtual servers; "
                    f"missing {missing}; extra {extra}; differ {differ}")


def test_random_table_equals_ipvsadm_field_by_field(ipvs):
    rng = random.Random(1)
    rules = ipvs.random_table(rng, 2000)
    ipvs.restore(rules)
    want, counters = reference()
    assert len(want) == 2000
    kinds = {(k.protocol or "FWM", ":" in (k.address or "")) for k in want}
    assert {"TCP", "UDP", "SCTP", "FWM"} <= {p for p, _ in kinds} and (True in {v6 for _, v6 in kinds})
    assert any(vs.persistent_timeout for vs in want.values())
    assert any(vs.flags for vs in want.values())

    # IPVSReader: /proc for the table, HZ learned exactly over netlink; with
    # scheduler_flags, one netlink service dump for what /proc does not print.
    live = IPVSReader(scheduler_flags=True).get()
    assert live.skipped_lines == 0
    assert_same(live, want)
    got = {(key, rkey): c for key in live for rkey, c in live.connections(key).items()}
    assert got == counters

    # Without the netlink dump: everything but the scheduler flags, from /proc alone.
    plain = IPVSReader().get()
    assert_same(plain, want, sched_flags=False)


def test_flags_dump_equals_ipvsadm(ipvs):
    ipvs.restore(ipvs.random_table(random.Random(5), 300))
    want, _ = reference()
    flags = dump_service_flags()
    assert set(flags) == set(want)
    for key, (f, timeout) in flags.items():
        assert (f, timeout) == (want[key].flags, want[key].persistent_timeout), key


def test_single_service_over_netlink_equals_proc(ipvs):
    ipvs.restore(ipvs.random_table(random.Random(7), 400))
    want, _ = reference()
    proc = IPVSReader(scheduler_flags=True).get()
    rng = random.Random(8)
    keys = rng.sample(sorted(proc, key=lambda k: k.sort_key()), 80)
    keys += [k for k in proc if k.fwmark is not None][:5] + [k for k in proc if k.address and ":" in k.address][:5]
    start = time.perf_counter()
    with IPVSNetlink() as nl:
        for key in keys:
            got = nl.read_virtual_server(key)
            assert got == proc[key], key
            assert comparable({key: got}) == comparable({key: want[key]})
    per_call = (time.perf_counter() - start) / len(keys)
    print(f"read_virtual_server: {per_call * 1000:.2f} ms per service (socket reused)")
    assert read_virtual_server(keys[0]) == proc[keys[0]]  # the one-shot helper
    assert read_virtual_server(VirtualServerKey("TCP", "192.0.2.1", 1)) is None
    assert read_virtual_server(VirtualServerKey.for_fwmark(999999)) is None


def test_table_changing_while_read(ipvs):
    """A writer adds and deletes services beside the reader: no exception, no half entry."""
    stable = ipvs.uniform_table(200, reals=5)
    ipvs.restore(stable)
    stable_table = parse_save(ipvs.ipvsadm("-Sn"))
    # The churning services: each added with its 5 real servers, weights 1..5, then deleted.
    churn = ipvs.uniform_table(100, reals=5, first=5000)
    churn = [line.replace("-w 1", f"-w {n % 5 + 1}") for n, line in enumerate(churn)]
    churn_table = parse_save("\n".join(churn))
    adds = "\n".join(churn) + "\n"
    dels = "\n".join(line.replace("-A ", "-D ").replace(" -s rr", "") for line in churn
                     if line.startswith("-A ")) + "\n"
    stop = threading.Event()
    rounds = [0]

    def writer():
        while not stop.is_set():
            for batch in (adds, dels):
                subprocess.run(["ipvsadm", "-R"], input=batch, text=True, check=True,
                               capture_output=True)
            rounds[0] += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    reads = partial = missing_stable = mid_change = 0
    try:
        deadline = time.monotonic() + 60
        while (rounds[0] < 3 or reads < 20) and time.monotonic() < deadline:
            text = read_ip_vs_text()
            table = parse_ip_vs(text)
            reads += 1
            assert table.skipped_lines == 0, "a line of the live file did not parse"
            for key, vs in table.items():
                if key in stable_table:
                    assert comparable({key: vs}) == comparable({key: stable_table[key]})
                    continue
                want = churn_table[key]  # nothing else exists
                assert vs.scheduler == "rr"
                # Real servers are added one by one: a prefix of them may be seen,
                # each exactly as programmed.
                for rkey, rs in vs.real_servers.items():
                    assert (rs.weight, rs.forward) == (want.real_servers[rkey].weight, "Masq")
                partial += len(vs.real_servers) < 5
            missing_stable += len(set(stable_table) - set(table))
            churned = sum(1 for key in table if key in churn_table)
            mid_change += 0 < churned < len(churn_table) or any(
                len(table[k].real_servers) < 5 for k in table if k in churn_table)
    finally:
        stop.set()
        thread.join(timeout=60)
    print(f"{reads} reads during {rounds[0]} add/delete rounds ({mid_change} mid-change); "
          f"services seen mid-programming: "
          f"{partial}; stable services absent from a read (seq_file position shift): {missing_stable}")
    assert reads >= 20 and rounds[0] >= 1
    assert mid_change > 0, "no read overlapped a change: the test proved nothing"


def test_collector_on_the_live_kernel(ipvs):
    ipvs.restore(ipvs.random_table(random.Random(11), 500))
    want, _ = reference()
    runner, ctx = make_runner([])
    s = samples(runner)
    assert value(s, "kubenode_collector_success", collector="ipvs") == 1.0
    assert value(s, "kubenode_ipvs_virtual_servers") == len(want)
    assert value(s, "kubenode_ipvs_real_servers") == sum(len(v.real_servers) for v in want.values())
    zero = sum(1 for v in want.values() for r in v.real_servers.values() if r.weight == 0)
    assert value(s, "kubenode_ipvs_real_servers_zero_weight") == zero
    # The same IPVSReader is what the drift collector gets from the context: one read per scrape.
    assert ctx.services["ipvs-reader"].get() is ctx.services["ipvs-reader"].get()
    runner.close()
    ctx.close()


def test_read_ip_vs_is_plain_proc(ipvs):
    ipvs.restore(ipvs.uniform_table(50))
    table = read_ip_vs()
    assert len(table) == 50 and all(len(vs.real_servers) == 5 for vs in table.values())
