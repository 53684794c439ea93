"""Collector ``ipvs``: the size and health of the live IPVS table, in bounded series.

Counts only: no series per virtual or real server (node_exporter's per-backend
series are what users of big clusters complain about, field.md). Drift per
service is the drift collector's job; it shares this table read.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collector import NAMESPACE, Collector, CollectorError, Unavailable, register
from exporter.dataplane import SCRAPE_WINDOW, RealServers
from exporter.readers.ipvs import IPVSReader, IPVSTable, IPVSUnavailable

READER_SERVICE = "ipvs-reader"
PROTOCOLS = ("TCP", "UDP", "SCTP", "FWM")
# How long one read of the table is reused: the collectors of one scrape run side by
# side within milliseconds of each other, and scrapes are further apart than that.
# Decided here, by the reader's owner, for every collector that shares it.


def shared_ipvs_reader(ctx) -> IPVSReader:
    """The one IPVS reader of this exporter, shared with the drift collector: one read per scrape."""
    return ctx.service(READER_SERVICE, lambda: IPVSReader(ctx.paths, max_age=SCRAPE_WINDOW))


class ShapeCounts(NamedTuple):
    """What the metrics count of a table's shape (counters aside)."""

    by_protocol: dict[str, int]
    real_servers: int
    zero_weight: int
    empty: int
    unavailable: int


def shape_counts(table: IPVSTable) -> ShapeCounts:
    by_protocol = dict.fromkeys(PROTOCOLS, 0)
    real_servers = zero_weight = unavailable = empty = 0
    for vs in table.values():
        by_protocol[vs.key.protocol or "FWM"] += 1
        reals = vs.real_servers
        real_servers += len(reals)
        if not reals:
            empty += 1
            unavailable += 1
            continue
        uniform = reals.uniform_weight() if isinstance(reals, RealServers) else None
        if uniform is not None:  # one weight for all (nearly every one): no RealServer made
            serving = len(reals) if uniform > 0 else 0
        else:
            serving = 0
            for rs in reals.values():
                if rs.weight > 0:
                    serving += 1
        zero_weight += len(reals) - serving
        if not serving:
            unavailable += 1
    return ShapeCounts(by_protocol, real_servers, zero_weight, empty, unavailable)


def table_metrics(table: IPVSTable, counts: ShapeCounts | None = None) -> list[Metric]:
    """Shape a parsed table into bounded gauges (pure: tested on fixture texts)."""
    if counts is None:
        counts = shape_counts(table)
    by_protocol, real_servers, zero_weight, empty, unavailable = counts

    def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{NAMESPACE}_ipvs_{name}", help_text, value=value)

    per_protocol = GaugeMetricFamily(
        f"{NAMESPACE}_ipvs_virtual_servers_by_protocol",
        "Virtual servers in the live IPVS table by protocol (FWM: firewall-mark services).",
        labels=["protocol"])
    for protocol, count in by_protocol.items():
        per_protocol.add_metric([protocol], count)
    connections = GaugeMetricFamily(
        f"{NAMESPACE}_ipvs_connections",
        "Connections tracked by IPVS, summed over every real server, by state.",
        labels=["state"])
    active, inactive = table.total_connections()
    connections.add_metric(["active"], active)
    connections.add_metric(["inactive"], inactive)
    return [
        gauge("virtual_servers", "Virtual servers in the live IPVS table.", len(table)),
        gauge("real_servers", "Real servers in the live IPVS table, over all virtual servers.",
              real_servers),
        per_protocol,
        gauge("real_servers_zero_weight",
              "Real servers at weight 0 (draining, or left at 0 by a proxy restart).", zero_weight),
        gauge("virtual_servers_without_real_servers",
              "Virtual servers with no real server at all.", empty),
        gauge("virtual_servers_unavailable",
              "Virtual servers with no real server of weight above 0: traffic to them fails.",
              unavailable),
        connections,
        gauge("unparsed_lines", "Lines of /proc/net/ip_vs the last read could not parse (their virtual "
              "servers are left out, and the drift collector reports no drift while any).", table.skipped_lines),
    ]


@register
class IPVSCollector(Collector):
    name = "ipvs"
    help = "size and health of the live IPVS table, from /proc/net/ip_vs (IPVS nodes only)"
    proxy_modes = ("ipvs",)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.live = shared_ipvs_reader(ctx)
        # Counts of the last shape: a busy node's table changes only its counters from
        # scrape to scrape, so the walk over every real server is done once per shape.
        self._counted: tuple[object, ShapeCounts] | None = None

    def counts(self, table: IPVSTable) -> ShapeCounts:
        if table.shape is not None and self._counted is not None and self._counted[0] is table.shape:
            return self._counted[1]
        counts = shape_counts(table)
        self._counted = (table.shape, counts) if table.shape is not None else None
        return counts

    def collect(self) -> Iterable[Metric]:
        try:
            table = self.live.get()
        except IPVSUnavailable as err:
            raise Unavailable(str(err)) from None
        except OSError as err:
            raise CollectorError(f"reading {self.ctx.paths.proc('net', 'ip_vs')}: {err.strerror}") from None
        yield from table_metrics(table, self.counts(table))
        yield GaugeMetricFamily(f"{NAMESPACE}_ipvs_read_seconds",
                                "How long the last read and parse of the IPVS table took.",
                                value=self.live.read_seconds)
