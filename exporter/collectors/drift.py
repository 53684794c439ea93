"""Collector ``ipvs_drift``: the IPVS table the proxy should have programmed, against the live one.

The desired table comes from the shared ``KubeStore`` (Services and
EndpointSlices listed and watched in the background, the table kept
incrementally); the live one from the ``IPVSReader`` the ``ipvs`` collector
also reads, so /proc/net/ip_vs is read once per scrape. Per scrape: one O(n)
diff, then the ``DriftTracker`` applies the grace period (``drift.grace-period``):
a healthy proxy's normal delay never counts.

Series: counts per kind always (0 when none); per Service only for drifted
Services, at most ``drift.max-service-series`` of them (those with the most
items first), with the number left out in
``kubenode_ipvs_service_drift_series_dropped``.

A live table with a line the reader does not understand gives no drift figures
either (success 0 with the line named): what was not read is not "no drift".

Before the first full list of every resource has been applied, no drift
figures are served (the desired table would be empty or partial, and every
live virtual server would look stale): ``kubenode_ipvs_drift_synced`` is 0.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.collector import NAMESPACE, Collector, CollectorError, Unavailable, register
from exporter.collectors.ipvs import shared_ipvs_reader
from exporter.kube.diff import KINDS, DriftReport, DriftTracker, TableDiffer, singular
from exporter.kube.client import RateLimitedLog
from exporter.kube.store import watch_up_family
from exporter.kube.latency import LatencyFollower, netlink_reader
from exporter.readers.ipvs import IPVSUnavailable

log = logging.getLogger("exporter.collectors.drift")

KUBE_SERVICE = "kube-store"
LATENCY_SERVICE = "ipvs-programming-latency"
LATENCY_METRIC = f"{NAMESPACE}_ipvs_programming_latency_seconds"


class KubeAccess:
    """The shared ``KubeStore`` (started once, in the background), or why there is none."""

    def __init__(self, settings, **store_options) -> None:
        from exporter.kube.store import KubeStore

        from exporter.kube.client import KubeNotConfigured

        self.store = None
        self.error: str | None = None
        self.configured = True  # False: no API configuration at all (run outside a cluster)
        try:
            self.store = KubeStore.from_settings(settings, **store_options)
        except Exception as err:  # noqa: BLE001 - KubeConfigError and any odd config: one line
            # Not logged here: the runner says it once, for the collector that needs it.
            self.error = str(err) or type(err).__name__
            self.configured = not isinstance(err, KubeNotConfigured)
            return
        self.store.start()

    def stop(self) -> None:
        if self.store is not None:
            self.store.stop()


def shared_kube(ctx) -> KubeAccess:
    return ctx.service(KUBE_SERVICE, lambda: KubeAccess(ctx.settings))


def shared_latency(ctx, access: KubeAccess, live) -> LatencyFollower | None:
    if access.store is None:
        return None

    def make() -> LatencyFollower:
        # Netlink reads one virtual server at a time, but only of this host's kernel:
        # with a fixture procfs the fixture is the table.
        direct = netlink_reader() if ctx.paths.procfs == "/proc" else None
        follower = LatencyFollower(access.store.snapshot, lambda max_age: live.get(max_age), direct,
                                   interval=max(0.05, ctx.settings.get("drift.follow-interval")))
        access.store.subscribe(follower.on_change)
        follower.start()
        return follower
    return ctx.service(LATENCY_SERVICE, make)


def _gauge(name: str, help_text: str, labels: list[str] | None = None, value: float | None = None):
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", help_text, labels=labels, value=value)


def desired_metrics(desired_vs: int, desired_rs: int) -> list[Metric]:
    return [
        _gauge("ipvs_desired_virtual_servers", "Virtual servers the proxy should have programmed.",
               value=desired_vs),
        _gauge("ipvs_desired_real_servers", "Real servers the proxy should have programmed, over all "
               "virtual servers.", value=desired_rs),
    ]


def report_metrics(report: DriftReport) -> list[Metric]:
    """Shape one DriftReport (pure: tested without clocks or kernels)."""
    drift = _gauge("ipvs_drift", "Differences between the desired and the live IPVS table that lasted "
                   "past the grace period, by kind.", ["kind"])
    oldest = _gauge("ipvs_drift_oldest_seconds", "Age of the oldest difference of this kind still drifted "
                    "(0 when none).", ["kind"])
    pending = _gauge("ipvs_drift_pending", "Differences still within the grace period, by kind "
                     "(a proxy doing its job).", ["kind"])
    for kind in KINDS:
        label = [singular(kind)]
        drift.add_metric(label, report.counts.get(kind, 0))
        oldest.add_metric(label, report.oldest_seconds.get(kind, 0.0))
        pending.add_metric(label, report.pending.get(kind, 0))
    per_service = _gauge("ipvs_service_drift", "Drifted items of one Service by kind (drifted Services "
                         "only, capped by drift.max-service-series).", ["namespace", "service", "kind"])
    for item in report.services:
        per_service.add_metric([item.namespace, item.service, singular(item.kind)], item.count)
    return [
        drift, oldest, pending, per_service,
        _gauge("ipvs_service_drift_series_dropped", "kubenode_ipvs_service_drift series left out by the "
               "drift.max-service-series cap.", value=report.services_not_shown),
        _gauge("ipvs_stuck_graceful_termination_real_servers",
               "Real servers left at weight 0 with no connections past drift.stuck-draining-after: "
               "kube-proxy's graceful termination is not running (kubernetes issue 71071).",
               value=report.stuck_draining),
    ]


def latency_metrics(follower: LatencyFollower | None) -> list[Metric]:
    if follower is None:
        return []
    help_text = ("Network programming latency seen from outside the proxy: from an EndpointSlice's "
                 "last-change-trigger-time to the live IPVS table matching it.")
    dropped = CounterMetricFamily(f"{NAMESPACE}_ipvs_programming_latency_dropped",
                                  "Changed Services not followed because too many were pending.",
                                  value=follower.dropped)
    timed_out = CounterMetricFamily(f"{NAMESPACE}_ipvs_programming_latency_timeouts",
                                    "Changed Services given up on: IPVS did not match within the timeout.",
                                    value=follower.timed_out)
    return [follower.histogram.metric(LATENCY_METRIC, help_text),
            _gauge("ipvs_programming_latency_pending", "Changed Services followed until IPVS matches them.",
                   value=follower.pending()),
            dropped, timed_out]


@register
class DriftCollector(Collector):
    name = "ipvs_drift"
    help = "drift between the IPVS table Services/EndpointSlices call for and the live one; programming latency"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.live = shared_ipvs_reader(ctx)
        self.kube = shared_kube(ctx)
        self.latency = shared_latency(ctx, self.kube, self.live)
        settings = ctx.settings
        self.tracker = DriftTracker(settings.get("drift.grace-period"), settings.get("drift.max-service-series"),
                                    settings.get("drift.stuck-draining-after"))
        self.differ = TableDiffer()  # per scrape, only what changed is compared again
        self._said_waiting = False
        self._stuck_log = RateLimitedLog(log, burst=1, period=600.0)  # once per 10 min while it lasts

    def collect(self) -> Iterable[Metric]:
        store = self.kube.store
        if store is None:
            if not self.kube.configured:
                raise Unavailable(f"no Kubernetes API access: {self.kube.error}")
            raise CollectorError(f"no Kubernetes API access: {self.kube.error}")
        statuses = store.watch_status()
        yield watch_up_family(statuses)
        yield from latency_metrics(self.latency)
        snap = store.snapshot()
        synced = _gauge("ipvs_drift_synced", "1 when every resource has been listed and drift figures are "
                        "served; 0 before the first full list (no figures rather than everything missing).",
                        value=1.0 if snap.synced else 0.0)
        yield synced
        if not snap.synced:
            reasons = [s.last_error for s in statuses.values() if s.last_error and not s.synced]
            if reasons and not any(s.synced for s in statuses.values()):
                raise CollectorError(f"no Kubernetes API access: {reasons[0]}")
            if not self._said_waiting:
                log.info("drift figures wait for the first full list of Services, EndpointSlices and this Node")
                self._said_waiting = True
            return
        yield from desired_metrics(len(snap.table), snap.real_servers)
        try:
            # Within one scrape the ipvs collector has just read it: shared, not read twice.
            live = self.live.get()
        except IPVSUnavailable as err:
            raise Unavailable(str(err)) from None
        except OSError as err:
            raise CollectorError(f"reading {self.ctx.paths.proc('net', 'ip_vs')}: {err.strerror}") from None
        unread = live.unread_reason()
        if unread is not None:
            # What was not read would be missing or, worse, silent: no drift figures at all
            # rather than a clean-looking table (KubeNodeIPVSTableUnreadable says why).
            raise CollectorError(f"{self.ctx.paths.proc('net', 'ip_vs')} not read whole, no drift figures: {unread}")
        diff = self.differ.diff(snap.table, live)
        report = self.tracker.update(diff, time.monotonic())
        yield from report_metrics(report)
        if report.stuck_draining:
            # Names the first few so the log says which endpoints, without a series per item.
            shown = ", ".join(f"{i.service or i.vs} -> {i.real[0]}:{i.real[1]}"
                              for i in report.stuck_draining_items[:3])
            self._stuck_log.warning("%d real servers stuck at weight 0 with no connections (graceful termination "
                        "not running, kubernetes issue 71071): %s", report.stuck_draining, shown)



