"""Collector `ipset`: size, capacity and memory of every ipset, from set headers only.

kube-router keeps its service, pod and network-policy state in ipsets; a set
near its maxelem drops traffic silently, and policy sets can number thousands.
The headers come from netlink (exporter/readers/ipset.py), never from the
members and never from running `ipset`.

`ipset.include` / `ipset.exclude` (regexes searched in the set name, as
node_exporter's include/exclude flags: anchor with ^...$ for a whole-name
match) choose which sets get per-set series. `kubenode_ipset_sets` counts every
set in the namespace regardless, so the total stays visible when the per-set
series are trimmed.
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


def families(all_sets: int, selected: Sequence[IpsetHeader]) -> list[Metric]:
    """Metric families for one scrape: plain data in, fresh families out."""
    sets = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_sets",
        "Number of ipsets in the network namespace, all of them (ipset.include/exclude do not apply).")
    sets.add_metric([], all_sets)
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
    references = GaugeMetricFamily(
        f"{NAMESPACE}_ipset_references",
        "iptables rules and list:set sets referring to the set; 0 means nothing uses it.",
        labels=["set"])
    # Samples built directly: add_metric's per-call label zip is a measurable
    # share of a 2,000-set scrape, and the label names are fixed here.
    entries_name, max_name = entries.name, max_entries.name
    memory_name, references_name = memory.name, references.name
    entries_samples, max_samples = entries.samples, max_entries.samples
    memory_samples, references_samples = memory.samples, references.samples
    for h in selected:
        by_set = {"set": h.name}
        entries_samples.append(Sample(entries_name, {"set": h.name, "type": h.type}, h.entries))
        if h.max_entries is not None:
            max_samples.append(Sample(max_name, by_set, h.max_entries))
        memory_samples.append(Sample(memory_name, by_set, h.memory_bytes))
        references_samples.append(Sample(references_name, by_set, h.references))
    return [sets, entries, max_entries, memory, references]


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
        return families(len(headers), select(headers, self.include, self.exclude))
