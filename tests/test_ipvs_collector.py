"""Collector `ipvs`: bounded gauges from the live table; a missing module fails only itself."""

import os
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from exporter.collector import Collector, Runner
from exporter.collectors.ipvs import table_metrics
from exporter.readers.ipvs import IncrementalParser, parse_ip_vs
from tests.helpers import make_runner, samples, value

FIXTURES = Path(__file__).parent / "fixtures" / "ipvs"


class AlwaysUp(Collector):
    name = "always_up"

    def __init__(self):
        pass

    def collect(self):
        yield GaugeMetricFamily("kubenode_test_up", "a collector that works", value=1)


def proc_tree(tmp_path, ip_vs_text=None) -> str:
    (tmp_path / "net").mkdir(exist_ok=True)
    if ip_vs_text is not None:
        (tmp_path / "net" / "ip_vs").write_text(ip_vs_text)
    return str(tmp_path)


def ipvs_runner(procfs: str) -> Runner:
    runner, ctx = make_runner(["--path.procfs", procfs, "--proxy-mode", "ipvs"])
    ipvs = [c for c in runner.collectors if c.name == "ipvs"]
    assert ipvs, "collector ipvs is not registered or not enabled by default"
    return Runner(ipvs + [AlwaysUp()])


def test_host_without_ip_vs_fails_only_this_collector(caplog):
    # The build machine's kernel has no IPVS at all: the real "module not loaded" case.
    assert not os.path.exists("/proc/net/ip_vs"), "this host has IPVS; the test needs one without"
    caplog.set_level("INFO")
    s = samples(ipvs_runner("/proc"))
    assert value(s, "kubenode_collector_success", collector="ipvs") == 0.0
    assert value(s, "kubenode_collector_success", collector="always_up") == 1.0
    assert value(s, "kubenode_test_up") == 1.0
    assert value(s, "kubenode_ipvs_virtual_servers") is None
    assert "ip_vs module not loaded (no /proc/net/ip_vs)" in caplog.text
    assert "Traceback" not in caplog.text
    # A feature this node lacks: said at INFO, not as an ERROR.
    assert [r.levelname for r in caplog.records if "ip_vs module not loaded" in r.getMessage()] == ["INFO"]


def test_counts_from_a_kernel_capture(tmp_path):
    text = (FIXTURES / "kube.txt").read_text()
    s = samples(ipvs_runner(proc_tree(tmp_path, text)))
    assert value(s, "kubenode_collector_success", collector="ipvs") == 1.0
    assert value(s, "kubenode_ipvs_virtual_servers") == 8
    assert value(s, "kubenode_ipvs_real_servers") == 8
    assert value(s, "kubenode_ipvs_real_servers_zero_weight") == 1
    assert value(s, "kubenode_ipvs_virtual_servers_without_real_servers") == 2
    assert value(s, "kubenode_ipvs_virtual_servers_unavailable") == 2
    for protocol, count in {"TCP": 4, "UDP": 1, "SCTP": 1, "FWM": 2}.items():
        assert value(s, "kubenode_ipvs_virtual_servers_by_protocol", protocol=protocol) == count
    assert value(s, "kubenode_ipvs_connections", state="active") == 0
    assert value(s, "kubenode_ipvs_unparsed_lines") == 0
    assert value(s, "kubenode_ipvs_read_seconds") >= 0


def test_all_zero_weight_is_unavailable_and_connections_add_up():
    text = (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n"
        "TCP  0A600001:0050 rr  \n"
        "  -> 0AF40105:1F90      Masq    0      3          40        \n"
        "  -> 0AF40106:1F90      Masq    0      1          2         \n"
        "TCP  0A600002:0050 rr  \n"
        "  -> 0AF40107:1F90      Masq    1      5          0         \n"
    )
    s = samples(iter_families(table_metrics(parse_ip_vs(text, hz=250))))
    assert value(s, "kubenode_ipvs_virtual_servers_unavailable") == 1
    assert value(s, "kubenode_ipvs_real_servers_zero_weight") == 2
    assert value(s, "kubenode_ipvs_connections", state="active") == 9
    assert value(s, "kubenode_ipvs_connections", state="inactive") == 42


def test_bad_lines_are_counted_not_fatal(tmp_path):
    text = (FIXTURES / "kube.txt").read_text() + "TCP  garbage\n"
    s = samples(ipvs_runner(proc_tree(tmp_path, text)))
    assert value(s, "kubenode_collector_success", collector="ipvs") == 1.0
    assert value(s, "kubenode_ipvs_unparsed_lines") == 1


def test_no_series_per_backend(tmp_path):
    s = samples(ipvs_runner(proc_tree(tmp_path, (FIXTURES / "kube.txt").read_text())))
    labels = {k for (name, items) in s if name.startswith("kubenode_ipvs") for k, _ in items}
    assert labels <= {"protocol", "state"}


class iter_families:
    """Adapt a list of families to what tests.helpers.samples reads (a .collect())."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


def test_counts_are_walked_once_per_shape(monkeypatch):
    from exporter.collectors import ipvs as ipvs_collector
    from exporter.readers.ipvs import IPVSTable

    walks = []
    walk = ipvs_collector.shape_counts
    monkeypatch.setattr(ipvs_collector, "shape_counts", lambda table: walks.append(1) or walk(table))
    collector = ipvs_collector.IPVSCollector.__new__(ipvs_collector.IPVSCollector)
    collector._counted = None

    text = (FIXTURES / "kube.txt").read_text()
    line = "  -> 0AF40105:0035      Masq    1      0          0 "
    assert line in text
    parse = IncrementalParser().parse  # as the reader parses from scrape to scrape
    first = collector.counts(parse(text, hz=250))
    # Counters moved (a busy node): same shape, the counts of the last walk.
    moved = parse(text.replace(line, "  -> 0AF40105:0035      Masq    1      3          9 ", 1), hz=250)
    assert collector.counts(moved) is first and len(walks) == 1
    s = samples(iter_families(table_metrics(moved, first)))
    assert value(s, "kubenode_ipvs_connections", state="active") == 3  # counters are still today's
    # A weight changed: walked again.
    reweighted = parse(text.replace(line, "  -> 0AF40105:0035      Masq    0      3          9 ", 1), hz=250)
    assert collector.counts(reweighted).zero_weight == first.zero_weight + 1 and len(walks) == 2
    # A table of unknown shape is always walked.
    built = IPVSTable.of(dict(reweighted))
    collector.counts(built)
    collector.counts(built)
    assert len(walks) == 4


def test_connections_sum_what_the_text_says_on_every_scrape(tmp_path):
    """A negative ActiveConn (IPVS accounting bugs) reads the same on the first scrape and
    on the next ones, whose reads take the fast incremental paths."""
    text = (FIXTURES / "kube.txt").read_text()
    line = "  -> 0AF40105:0035      Masq    1      0          0         \n"
    assert line in text
    procfs = proc_tree(tmp_path, text)
    runner = ipvs_runner(procfs)
    for active, inactive in [(4, 7), (-1, 3), (-2, 2147483648), (-1, 3)]:
        (tmp_path / "net" / "ip_vs").write_text(
            text.replace(line, f"  -> 0AF40105:0035      Masq    1      {active:<10} {inactive:<10}\n", 1))
        for collector in runner.collectors:
            if getattr(collector, "live", None) is not None:
                collector.live._table = None  # it reuses a read within a scrape: make it read now
        s = samples(runner)
        assert value(s, "kubenode_ipvs_connections", state="active") == active
        assert value(s, "kubenode_ipvs_connections", state="inactive") == inactive
