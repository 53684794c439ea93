"""Collector ``iptables``: the size of kube-proxy's iptables rules, in bounded series.

Counts per family (`ip`, `ip6`) and table (`nat`, `filter`): chains, rules and
KUBE- chains; per family the Service and endpoint chains and whether the built-in
chains jump to KUBE-SERVICES; frontends and endpoints the rules resolve to; which
backend holds them (iptables-nft or iptables-legacy). The rules are read by the drift
collector's reader (``exporter.readers.dataplanes.IptablesDataplane``), once per
scrape for both. On only where kube-proxy runs in iptables mode
(``--proxy-mode``, or found by ``auto``): elsewhere it is off and silent.
"""

from __future__ import annotations

import functools
from typing import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collector import NAMESPACE, Collector, CollectorError, register
from exporter.readers.dataplanes import BACKEND_NAMES, IptablesLive, ReadFailed, shared_iptables

FAMILY_NAMES = {4: "ip", 6: "ip6"}  # as the nftables collector's family label
RESOLVER_FAMILIES = {"ipv4": "ip", "ipv6": "ip6"}  # IptablesRead.sizes' keys


def size_metrics(live: IptablesLive) -> list[Metric]:
    """Shape one ``IptablesLive`` (pure)."""
    backend = GaugeMetricFamily(f"{NAMESPACE}_iptables_backend_info",
                                "The iptables backend whose rules were read: iptables-nft (nf_tables) or "
                                "iptables-legacy (x_tables); always 1.", labels=["backend"])
    backend.add_metric([BACKEND_NAMES.get(live.backend, live.backend)], 1.0)
    labels = ["family", "table"]
    chains = GaugeMetricFamily(f"{NAMESPACE}_iptables_chains", "Chains in an iptables table, built-in ones "
                               "included.", labels=labels)
    rules = GaugeMetricFamily(f"{NAMESPACE}_iptables_rules", "Rules in an iptables table.", labels=labels)
    kube_chains = GaugeMetricFamily(f"{NAMESPACE}_iptables_kube_chains", "Chains named KUBE-* in an iptables "
                                    "table (kube-proxy's, and those of deleted Services not yet aged out).",
                                    labels=labels)
    for size in live.tables:
        label = [FAMILY_NAMES.get(size.family, str(size.family)), size.table]
        chains.add_metric(label, size.chains)
        rules.add_metric(label, size.rules)
        kube_chains.add_metric(label, size.kube_chains)
    read = live.read
    frontends = GaugeMetricFamily(f"{NAMESPACE}_iptables_frontends", "Frontends (ClusterIP, external, "
                                  "LoadBalancer and NodePort rules) the rules send to endpoints.",
                                  value=len(read.table))
    endpoints = GaugeMetricFamily(f"{NAMESPACE}_iptables_endpoints", "Endpoints (KUBE-SEP DNAT targets) over "
                                  "all frontends.", value=sum(len(vs.real_servers) for vs in read.table.values()))
    rejected = GaugeMetricFamily(f"{NAMESPACE}_iptables_rejected_frontends", "Frontends the filter table "
                                 "rejects or drops (kube-proxy's verdicts for Services without usable "
                                 "endpoints).", value=len(read.rejected))
    unread = GaugeMetricFamily(f"{NAMESPACE}_iptables_unread", "Things in kube-proxy's rules the last read "
                               "could not follow (drift is not reported while any).", value=len(read.unread))
    service_chains = GaugeMetricFamily(f"{NAMESPACE}_iptables_service_chains", "KUBE-SVC- and KUBE-SVL- chains "
                                       "(service ports with endpoints), by family.", labels=["family"])
    endpoint_chains = GaugeMetricFamily(f"{NAMESPACE}_iptables_endpoint_chains", "KUBE-SEP- chains, by family.",
                                        labels=["family"])
    hooked = GaugeMetricFamily(f"{NAMESPACE}_iptables_hooked", "1 when the nat table's PREROUTING and OUTPUT "
                               "jump to KUBE-SERVICES (traffic reaches kube-proxy's rules), by family.",
                               labels=["family"])
    for family in sorted(read.sizes):
        sizes = read.sizes[family]
        label = [RESOLVER_FAMILIES.get(family, family)]
        service_chains.add_metric(label, sizes.services)
        endpoint_chains.add_metric(label, sizes.endpoints)
        hooked.add_metric(label, 1.0 if sizes.hooked else 0.0)
    return [backend, chains, rules, kube_chains, frontends, endpoints, rejected, unread, service_chains,
            endpoint_chains, hooked]


@register
class IptablesCollector(Collector):
    name = "iptables"
    help = "size of kube-proxy's iptables rules, either backend (iptables nodes only)"
    proxy_modes = ("iptables",)

    @functools.cached_property
    def dataplane(self):
        # Built on the first scrape, not with the collector: a node of another mode never
        # runs this collector, and would load the x_tables blob decoder for nothing.
        return shared_iptables(self.ctx)

    def collect(self) -> Iterable[Metric]:
        try:
            live = self.dataplane.read_rules()
        except ReadFailed as err:
            raise CollectorError(str(err)) from None
        yield from size_metrics(live)
