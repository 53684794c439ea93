"""Collector ``nftables``: the size of kube-proxy's nftables tables, in bounded series.

Counts per family only (`ip`, `ip6`): elements of the service and no-endpoint
maps, chains, rules, and the ruleset generation. The rules are read by the
drift collector's reader (``exporter.readers.dataplanes``), once per scrape for
both. On only where kube-proxy runs in nftables mode (``--proxy-mode``, or found
by ``auto``): elsewhere it is off and silent.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collector import NAMESPACE, Collector, CollectorError, register
from exporter.readers.dataplanes import ReadFailed, shared_nftables


MAP_COUNTS = (("service_ips", "service-ips"), ("service_nodeports", "service-nodeports"),
              ("no_endpoint_services", "no-endpoint-services"), ("no_endpoint_nodeports", "no-endpoint-nodeports"))


def size_metrics(read) -> list[Metric]:
    """Shape one ``NftablesRead`` (pure)."""
    elements = GaugeMetricFamily(f"{NAMESPACE}_nftables_map_elements",
                                 "Elements of a kube-proxy nftables verdict map, by family and map.",
                                 labels=["family", "map"])
    chains = GaugeMetricFamily(f"{NAMESPACE}_nftables_chains", "Chains in the kube-proxy nftables table.",
                               labels=["family"])
    rules = GaugeMetricFamily(f"{NAMESPACE}_nftables_rules", "Rules in the kube-proxy nftables table.",
                              labels=["family"])
    for family in sorted(read.sizes):
        sizes = read.sizes[family]
        for field, map_name in MAP_COUNTS:
            elements.add_metric([family, map_name], getattr(sizes, field))
        chains.add_metric([family], sizes.chains)
        rules.add_metric([family], sizes.rules)
    tables = GaugeMetricFamily(f"{NAMESPACE}_nftables_tables",
                               "kube-proxy nftables tables present (ip, ip6): 0 when deleted behind its back.",
                               value=len(read.sizes))
    out = [tables, elements, chains, rules]
    if read.generation is not None:
        out.append(GaugeMetricFamily(f"{NAMESPACE}_nftables_generation",
                                     "The nf_tables ruleset generation the rules were read at (every change "
                                     "bumps it).", value=read.generation))
    out.append(GaugeMetricFamily(f"{NAMESPACE}_nftables_unread",
                                 "Things in the kube-proxy tables the last read could not follow (drift is not "
                                 "reported while any).", value=len(read.unread)))
    return out


@register
class NftablesCollector(Collector):
    name = "nftables"
    help = "size of kube-proxy's nftables tables (nftables nodes only)"
    proxy_modes = ("nftables",)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.dataplane = shared_nftables(ctx)

    def collect(self) -> Iterable[Metric]:
        try:
            read = self.dataplane.read_rules()
        except ReadFailed as err:
            raise CollectorError(str(err)) from None
        yield from size_metrics(read)
