"""Collector ``proxy``: the local proxy's own view of its syncs, from its metrics page.

kube-proxy serves its metrics on 127.0.0.1:10249/metrics by default; kube-router
serves them only when run with ``--metrics-port``, so for kube-router the page's
URL must be given (``proxy.metrics-url``).

What is carried over (label ``proxy`` only; the proxy's own ``ip_family`` label,
present in newer kube-proxy releases, is summed or combined away as each help
text says):

kubenode_proxy_up
    1 when the page answered usably *and* carries the proxy's sync histogram:
    a 200 page without it (another program on that port, a proxy build that
    names it otherwise, a kube-proxy that has not synced since it started)
    leaves every sync alert blind, so it is 0 too. A refused connection is 0
    with the collector still successful (that is a fact about the proxy,
    alerted on its own), and so is a page read whole that lacks the histogram;
    an answer that cannot be used (HTTP error, past ``proxy.timeout``, over the
    size cap, not the text format, a broken histogram) is 0 and the collector
    fails with the reason.
kubenode_proxy_expected_metric_missing{metric}
    1 for the proxy's sync histogram when a page read whole lacks it (the
    series exists only then); the log says so once, with the likely cause, and
    once more when it is back.
kubenode_proxy_sync_duration_seconds (histogram)
    kube-proxy: ``kubeproxy_sync_proxy_rules_duration_seconds`` (buckets
    0.001 s .. 16.384 s, doubling); kube-router:
    ``kube_router_controller_ipvs_services_sync_time`` (a histogram in seconds
    with client_golang's default buckets 0.005 s .. 10 s). Buckets as the proxy
    has them. Both proxies observe failed syncs too.
kubenode_proxy_last_sync_timestamp_seconds
    kube-proxy: ``kubeproxy_sync_proxy_rules_last_timestamp_seconds`` (last
    *successful* sync; the oldest over IP families). kube-router publishes no
    such time, so this is the scrape time at which its sync count was last seen
    to grow (a counter reset with a non-zero count counts as growth), an upper
    bound with the resolution of the scrape interval. Until growth has been
    seen since the exporter started there is no series: a healthy kube-router
    grows the count at least every sync period (5 min by default).
kubenode_proxy_sync_pending_seconds (kube-proxy only)
    How long a queued change has waited: now minus
    ``..._last_queued_timestamp_seconds`` when that is later than the last
    sync, else 0 (the largest over IP families). The "hung" sign.
kubenode_proxy_network_programming_duration_seconds (kube-proxy only, histogram)
kubenode_proxy_endpoint_changes_pending, kubenode_proxy_service_changes_pending (kube-proxy only)
kubenode_proxy_ipvs_services (kube-router only)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from exporter.collector import NAMESPACE, Collector, CollectorError, Context, register
from exporter.readers.proxymetrics import (
    Family,
    Histogram,
    PageUnusable,
    ProxyNotListening,
    check_url,
    decode_page,
    fetch_page,
    gauge_values,
    histograms,
    merge_histograms,
    parse_families,
)

log = logging.getLogger("exporter.collectors.proxy")

KUBE_PROXY_DEFAULT_URL = "http://127.0.0.1:10249/metrics"

# kube-proxy (pkg/proxy/metrics/metrics.go)
KP_SYNC = "kubeproxy_sync_proxy_rules_duration_seconds"
KP_LAST = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
KP_QUEUED = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
KP_PROGRAMMING = "kubeproxy_network_programming_duration_seconds"
KP_ENDPOINTS_PENDING = "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
KP_SERVICES_PENDING = "kubeproxy_sync_proxy_rules_service_changes_pending"
KUBE_PROXY_FAMILIES = {
    KP_SYNC: "histogram",
    KP_LAST: "gauge",
    KP_QUEUED: "gauge",
    KP_PROGRAMMING: "histogram",
    KP_ENDPOINTS_PENDING: "gauge",
    KP_SERVICES_PENDING: "gauge",
}

# kube-router (pkg/metrics/metrics_controller.go)
KR_SYNC = "kube_router_controller_ipvs_services_sync_time"
KR_SERVICES = "kube_router_controller_ipvs_services"
KUBE_ROUTER_FAMILIES = {KR_SYNC: "histogram", KR_SERVICES: "gauge"}

# Without this family on the page, nothing tells how the proxy's syncs go: not up.
SYNC_FAMILY = {"kube-proxy": KP_SYNC, "kube-router": KR_SYNC}


@dataclass(frozen=True)
class ProxyReading:
    """What one read of the proxy's page says, in our terms; None = not on the page."""

    sync: Histogram | None = None
    last_sync: float | None = None
    pending_seconds: float | None = None
    network_programming: Histogram | None = None
    endpoint_changes_pending: float | None = None
    service_changes_pending: float | None = None
    ipvs_services: float | None = None


def read_kube_proxy(families: dict[str, Family], now: float) -> ProxyReading:
    """Shape kube-proxy's families. Pure."""
    sync = _merged(families, KP_SYNC)
    last = _by_family(families, KP_LAST)
    queued = _by_family(families, KP_QUEUED)
    pending = None
    if KP_QUEUED in families:
        pending = 0.0
        for ip_family, queued_at in queued.items():
            synced_at = last.get(ip_family, -math.inf)
            if queued_at > synced_at:
                pending = max(pending, now - queued_at)
        pending = max(pending, 0.0)  # a proxy clock ahead of ours is not a wait
    return ProxyReading(
        sync=sync,
        last_sync=min(last.values()) if last else None,
        pending_seconds=pending,
        network_programming=_merged(families, KP_PROGRAMMING),
        endpoint_changes_pending=_gauge_sum(families, KP_ENDPOINTS_PENDING),
        service_changes_pending=_gauge_sum(families, KP_SERVICES_PENDING),
    )


class SyncCountWatch:
    """Remembers when kube-router's sync count was last seen to grow."""

    def __init__(self) -> None:
        self.count: float | None = None
        self.grew_at: float | None = None

    def observe(self, count: float, now: float) -> float | None:
        if self.count is not None:
            restarted_and_synced = count < self.count and count > 0
            if count > self.count or restarted_and_synced:
                self.grew_at = now
        self.count = count
        return self.grew_at


def read_kube_router(families: dict[str, Family], now: float, watch: SyncCountWatch) -> ProxyReading:
    """Shape kube-router's families; ``watch`` carries the sync count across scrapes."""
    sync = _merged(families, KR_SYNC)
    last = watch.observe(sync.count, now) if sync is not None else watch.grew_at
    return ProxyReading(sync=sync, last_sync=last, ipvs_services=_gauge_sum(families, KR_SERVICES))


def missing_sync_reason(proxy: str, families: dict[str, Family]) -> str:
    """Why a page read whole has no sync histogram, from what else of the proxy's it has. Pure."""
    others = sorted(name for name in families if name != SYNC_FAMILY[proxy])
    if proxy == "kube-proxy":
        if others:
            return (f"kube-proxy's other sync metrics are there ({', '.join(others)}): "
                    "it has not synced since it started")
        return ("none of kube-proxy's sync metrics are on it: another program at that address (a wrong port?), "
                "or a kube-proxy too old to publish them (old releases named the histogram "
                "kubeproxy_sync_proxy_rules_latency_microseconds)")
    if others:
        return f"kube-router's {', '.join(others)} is there but not its sync histogram: a build that does not publish it"
    return ("none of kube-router's service proxy metrics are on it: another program at that address "
            "(a wrong port?), or kube-router running without --run-service-proxy")


def _merged(families: dict[str, Family], name: str) -> Histogram | None:
    family = families.get(name)
    if family is None:
        return None
    return merge_histograms(name, histograms(family).values())


def _by_family(families: dict[str, Family], name: str) -> dict[str, float]:
    family = families.get(name)
    if family is None:
        return {}
    out = {}
    for labels, value in gauge_values(family).items():
        if math.isnan(value):
            raise PageUnusable(f"{name} is NaN")
        out[dict(labels).get("ip_family", "")] = value
    return out


def _gauge_sum(families: dict[str, Family], name: str) -> float | None:
    family = families.get(name)
    if family is None:
        return None
    values = gauge_values(family)
    return sum(values.values()) if values else None


def shape(proxy: str, up: bool, reading: ProxyReading | None, missing: str | None = None) -> list[Metric]:
    """The kubenode_proxy_* families for one reading; ``missing`` names an expected family not on the page. Pure."""
    p = f"{NAMESPACE}_proxy"
    labels = ["proxy"]
    out: list[Metric] = []
    up_family = GaugeMetricFamily(f"{p}_up", "1 when the proxy's own metrics page answered usably with its sync "
                                  "histogram, else 0.", labels=labels)
    up_family.add_metric([proxy], 1.0 if up else 0.0)
    out.append(up_family)
    if missing is not None:
        absent = GaugeMetricFamily(f"{p}_expected_metric_missing",
                                   "1 for a metric the proxy's page should carry but does not (its sync histogram): "
                                   "the proxy is not up while it is missing.", labels=["proxy", "metric"])
        absent.add_metric([proxy, missing], 1.0)
        out.append(absent)
    if reading is None:
        return out

    def histogram(name: str, help_text: str, value: Histogram | None) -> None:
        if value is None:
            return
        family = HistogramMetricFamily(name, help_text, labels=labels)
        family.add_metric([proxy], [(floatToGoString(b), c) for b, c in value.buckets], value.sum)
        out.append(family)

    def gauge(name: str, help_text: str, value: float | None) -> None:
        if value is None:
            return
        family = GaugeMetricFamily(name, help_text, labels=labels)
        family.add_metric([proxy], value)
        out.append(family)

    histogram(f"{p}_sync_duration_seconds",
              "The proxy's own histogram of how long its rule syncs took, buckets as it has them, "
              "summed over IP families.", reading.sync)
    gauge(f"{p}_last_sync_timestamp_seconds",
          "Unix time of the proxy's last sync: kube-proxy's own last successful sync (oldest IP family); "
          "for kube-router the scrape at which its sync count last grew.", reading.last_sync)
    gauge(f"{p}_sync_pending_seconds",
          "How long changes queued after kube-proxy's last sync have waited (0 when none are queued).",
          reading.pending_seconds)
    histogram(f"{p}_network_programming_duration_seconds",
              "kube-proxy's own histogram from a Service or EndpointSlice change to its rules being "
              "programmed, summed over IP families.", reading.network_programming)
    gauge(f"{p}_endpoint_changes_pending", "EndpointSlice changes kube-proxy has not yet synced.",
          reading.endpoint_changes_pending)
    gauge(f"{p}_service_changes_pending", "Service changes kube-proxy has not yet synced.",
          reading.service_changes_pending)
    gauge(f"{p}_ipvs_services", "IPVS services kube-router reports it has programmed.", reading.ipvs_services)
    return out


@register
class ProxyCollector(Collector):
    name = "proxy"
    help = "the local proxy's own sync metrics (kube-proxy or kube-router), read from its metrics page"

    def __init__(self, ctx: Context, clock: Callable[[], float] = time.time) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.proxy: str = settings["proxy"]
        self.url: str | None = settings["proxy.metrics-url"]
        if self.url is None and self.proxy == "kube-proxy":
            self.url = KUBE_PROXY_DEFAULT_URL
        if self.url is not None:
            check_url(self.url)  # a bad URL is reported at start, by build_collectors
        self.timeout: float = settings["proxy.timeout"]
        self.max_bytes: int = settings["proxy.max-bytes"]
        self.clock = clock
        self.sync_watch = SyncCountWatch()
        self.missing_said: str | None = None  # the last "sync histogram missing" line logged, until it is back

    def collect(self) -> Iterable[Metric]:
        if self.url is None:
            raise CollectorError("kube-router serves metrics only when run with --metrics-port; "
                                 "set proxy.metrics-url to that page (e.g. http://127.0.0.1:8080/metrics)")
        try:
            page = decode_page(fetch_page(self.url, self.timeout, self.max_bytes))
            now = self.clock()
            if self.proxy == "kube-proxy":
                families = parse_families(page, KUBE_PROXY_FAMILIES)
                reading = read_kube_proxy(families, now)
            else:
                families = parse_families(page, KUBE_ROUTER_FAMILIES)
                reading = read_kube_router(families, now, self.sync_watch)
        except ProxyNotListening as err:
            log.debug("%s metrics: %s", self.proxy, err)
            yield from shape(self.proxy, False, None)
            return
        except PageUnusable as err:
            yield from shape(self.proxy, False, None)
            raise CollectorError(f"{self.proxy} metrics page {self.url}: {err}") from None
        missing = SYNC_FAMILY[self.proxy] if reading.sync is None else None
        self._say_missing(missing, families)
        yield from shape(self.proxy, missing is None, reading, missing)

    def _say_missing(self, missing: str | None, families: dict[str, Family]) -> None:
        """Log a missing sync histogram once per cause, and once when it is back (not every scrape)."""
        if missing is None:
            if self.missing_said is not None:
                log.info("%s metrics page %s has %s again: up", self.proxy, self.url, SYNC_FAMILY[self.proxy])
                self.missing_said = None
            return
        line = (f"{self.proxy} metrics page {self.url} has no {missing}, so kubenode_proxy_up is 0: "
                f"{missing_sync_reason(self.proxy, families)}")
        if line != self.missing_said:
            log.warning("%s", line)
            self.missing_said = line
