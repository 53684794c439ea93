"""Collector `ipset`: size, capacity and memory of every ipset, from set headers only.

kube-router keeps its service, pod and network-policy state in ipsets; a set
near its maxelem drops traffic silently, and policy sets can number thousands.
The headers come from netlink (exporter/readers/ipset.py), never from the
members and never from running `ipset`.

`ipset.include` / `ipset.exclude` (regexes searched in the set name, as
node_exporter's include/exclude flags: anchor with ^...$ for a whole-name
match) choose which sets get per-set series. The three namespace-wide counts
(`kubenode_ipset_sets`, `_all_entries`, `_unreferenced_sets`) cover every set
regardless, so totals stay visible when the per-set series are trimmed.

Per-set series are kept to the three of the contract: at 2,000 sets the text
serialization (~4 us a sample) is half of a scrape, so a fourth per-set series
(references) would add a third more samples, ~9 ms; its useful signal, sets
nothing refers to, is one count instead.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from exporter.collector import NAMESPACE, Collector, CollectorError, Context, register
from exporter.readers.ipset import IpsetHeader, IpsetReadError, read_headers

READ_TIMEOUT_SECONDS = 5.0


def select(headers: Sequence[IpsetHeader], include: re.Pattern | None,
           exclude: re.Pattern | None) -> list[IpsetHeader]:
    """The sets that get per-set series: name searched by include, not by exclude."""
    if include is None and exclude is None:
        return list(headers)
    return [h for h in headers
            if (include is None or include.search(h.name))
            and (exclude is None or not exclude.search(h.name))]


# Samples are built as plain tuples: GaugeMetricFamily.add_metric's per-call
# label zip and NamedTuple constructor are a measurable share of a
# 2,000-set scrape (bench/bench_ipset.py). Same fields, same defaults.
_new_tuple = tuple.__new__
_SAMPLE_TAIL = tuple(Sample._field_defaults[f] for f in Sample._fields[3:])


def families(headers: Sequence[IpsetHeader], selected: Sequence[IpsetHeader]) -> list[Metric]:
    """Metric families for one scrape: every set's header and the selected ones, fresh families out."""
    sets = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_sets",
        "Number of ipsets in the network namespace: all of them, ipset.include/exclude do not apply.",
        value=len(headers))
    total_entries = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_all_entries",
        "Entries summed over all ipsets of the network namespace; ipset.include/exclude do not apply.",
        value=sum(h.entries for h in headers))
    unreferenced = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_unreferenced_sets",
        "Sets no iptables rule or list:set refers to (References: 0), all of them: "
        "a growing count is sets left behind.",
        value=sum(1 for h in headers if not h.references))
    entries = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_entries",
        "Entries in the set, as `ipset list -t` reports them (Number of entries).",
        labels=["set", "type"])
    max_entries = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_max_entries",
        "Most entries the set can hold: maxelem of hash types, size of list:set, "
        "the slots of a bitmap's range.",
        labels=["set"])
    memory = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_memory_bytes",
        "Kernel memory the set uses (Size in memory of `ipset list -t`).",
        labels=["set"])
    new, tail = _new_tuple, _SAMPLE_TAIL
    entries_name, max_name, memory_name = entries.name, max_entries.name, memory.name
    by_set = [{"set": h.name} for h in selected]  # one labels dict shared by two samples
    entries.samples = [new(Sample, (entries_name, {"set": h.name, "type": h.type}, h.entries) + tail)
                       for h in selected]
    max_entries.samples = [new(Sample, (max_name, labels, h.max_entries) + tail)
                           for h, labels in zip(selected, by_set) if h.max_entries is not None]
    memory.samples = [new(Sample, (memory_name, labels, h.memory_bytes) + tail)
                      for h, labels in zip(selected, by_set)]
    return [sets, total_entries, unreferenced, entries, max_entries, memory]


@register
class IpsetCollector(Collector):
    name = "ipset"
    help = "ipset sizes, capacity and memory from netlink set headers"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        include = ctx.settings["ipset.include"]
        exclude = ctx.settings["ipset.exclude"]
        self.include = re.compile(include) if include else None
        self.exclude = re.compile(exclude) if exclude else None

    def collect(self) -> Iterable[Metric]:
        try:
            headers = read_headers(READ_TIMEOUT_SECONDS)
        except IpsetReadError as err:
            raise CollectorError(str(err)) from None
        return families(headers, select(headers, self.include, self.exclude))
