"""Collector ``drift``: the dataplane the proxy should have programmed, against the live one, in any mode.

The desired table comes from the shared ``KubeStore`` (Services and
EndpointSlices listed and watched in the background, the table kept
incrementally, by the model of this node's proxy mode); the live one from the
``DataplaneReader`` of that mode (``exporter.readers.dataplanes``): IPVS shares
the ``ipvs`` collector's read, nftables the ``nftables`` collector's, so a scrape
reads the live rules once. Per scrape: one O(n) diff, then the ``DriftTracker``
applies the grace period (``drift.grace-period``): a healthy proxy's normal
delay never counts.

The mode is ``--proxy-mode``, or found on the node (``exporter.proxymode``); when
it changes, the store, reader and latency follower of the new mode replace the
old ones. Without a mode (auto found none) the collector is unavailable with the
reason, said once. iptables mode shares the ``iptables`` collector's read, from
whichever backend (iptables-nft, iptables-legacy) holds kube-proxy's rules.

Series: counts per kind always (0 when none); per Service only for drifted
Services, at most ``drift.max-service-series`` of them (those with the most
items first), with the number left out in
``kubenode_dataplane_service_drift_series_dropped``.

A live table not read whole gives no drift figures either (success 0 with what
was not read): what was not read is not "no drift".

Before the first full list of every resource has been applied, no drift
figures are served (the desired table would be empty or partial, and every
live virtual server would look stale): ``kubenode_dataplane_drift_synced`` is 0.

Old name: ``ipvs_drift`` (``--collector.ipvs_drift`` still works).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter import allocator
from exporter.collector import NAMESPACE, Collector, CollectorError, Unavailable, register
from exporter.config import Option, _as_count, _as_seconds
from exporter.dataplane import DataplaneReader, DataplaneUnavailable
from exporter.kube.client import RateLimitedLog
from exporter.kube.desired_rules import RULES_MODES, RulesViews
from exporter.kube.diff import KINDS, DriftReport, DriftTracker, TableDiffer, singular
from exporter.kube.latency import LatencyFollower, netlink_reader
from exporter.kube.store import watch_up_family
from exporter.proxymode import shared_proxy_mode
from exporter.readers.dataplanes import ReadFailed, dataplane_for

log = logging.getLogger("exporter.collectors.drift")

KUBE_SERVICE = "kube-store"
LATENCY_METRIC = f"{NAMESPACE}_dataplane_programming_latency_seconds"

OPTIONS = (
    Option("drift.grace-period", _as_seconds, 60.0,
           "seconds a difference may last before it counts as drift (default 60: covers one late "
           "sync of either proxy at thousands of services; see exporter/kube/diff.py)", "SECONDS"),
    Option("drift.max-service-series", _as_count, 200,
           "cap on kubenode_dataplane_service_drift series", "N"),
    Option("drift.stuck-draining-after", _as_seconds, 180.0,
           "seconds a weight-0 real server with no connections may stay before it counts as "
           "stuck graceful termination (kubernetes issue 71071; kube-proxy checks every 60 s)", "SECONDS"),
    Option("drift.follow-interval", _as_seconds, 1.0,
           "seconds between checks of the virtual servers of changed Services, for "
           "kubenode_dataplane_programming_latency_seconds (its resolution)", "SECONDS"),
)


class KubeAccess:
    """The shared ``KubeStore`` (started once, in the background) for one proxy mode, or why there is none."""

    def __init__(self, settings, mode: str | None = None, **store_options) -> None:
        from exporter.kube.store import KubeStore

        from exporter.kube.client import KubeNotConfigured

        self.store = None
        self.error: str | None = None
        self.configured = True  # False: no API configuration at all (run outside a cluster)
        self.settings = settings
        self.store_options = store_options
        try:
            self.store = KubeStore.from_settings(settings, mode=mode, **store_options)
        except Exception as err:  # noqa: BLE001 - KubeConfigError and any odd config: one line
            # Not logged here: the runner says it once, for the collector that needs it.
            self.error = str(err) or type(err).__name__
            self.configured = not isinstance(err, KubeNotConfigured)
            self.mode = mode
            return
        self.mode = self.store.mode
        self.store.start()

    def for_mode(self, mode: str) -> "KubeAccess":
        """This access if its model is ``mode``'s, else a new one (this one stopped)."""
        if self.mode == mode or self.store is None:
            return self
        self.stop()
        return KubeAccess(self.settings, mode, **self.store_options)

    def stop(self) -> None:
        if self.store is not None:
            self.store.stop()


def shared_kube(ctx, mode: str) -> KubeAccess:
    """The one store of this exporter, with the model of ``mode`` (rebuilt when the mode changes)."""
    access = ctx.service(KUBE_SERVICE, lambda: KubeAccess(ctx.settings, mode))
    current = access.for_mode(mode)
    if current is not access:
        with ctx._lock:
            ctx.services[KUBE_SERVICE] = current
    return current


def start_latency(ctx, access: KubeAccess, dataplane: DataplaneReader):
    """A latency follower of the store's changes against ``dataplane``, and how to unsubscribe it."""
    if access.store is None:
        return None, None
    # IPVS over netlink reads one virtual server at a time, but only of this host's
    # kernel: with a fixture procfs the fixture is the table.
    direct = netlink_reader() if dataplane.mode == "ipvs" and ctx.paths.procfs == "/proc" else None
    follower = LatencyFollower(access.store.snapshot, dataplane.read_following, direct,
                               interval=max(0.05, ctx.settings.get("drift.follow-interval")))
    unsubscribe = access.store.subscribe(follower.on_change)
    follower.start()
    return follower, unsubscribe


def _gauge(name: str, help_text: str, labels: list[str] | None = None, value: float | None = None):
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", help_text, labels=labels, value=value)


def info_metric(proxy: str, mode: str) -> Metric:
    info = _gauge("dataplane_info", "The proxy and the dataplane mode whose rules drift is measured on "
                  "(always 1).", ["proxy", "mode"])
    info.add_metric([proxy, mode], 1.0)
    return info


def desired_metrics(desired_vs: int, desired_rs: int) -> list[Metric]:
    return [
        _gauge("dataplane_desired_virtual_servers", "Frontends (virtual servers) the proxy should have "
               "programmed to send traffic to endpoints.", value=desired_vs),
        _gauge("dataplane_desired_real_servers", "Endpoints (real servers) the proxy should have programmed, "
               "over all frontends.", value=desired_rs),
    ]


def report_metrics(report: DriftReport, mode: str = "ipvs") -> list[Metric]:
    """Shape one DriftReport (pure: tested without clocks or kernels)."""
    drift = _gauge("dataplane_drift", "Differences between the desired and the live dataplane that lasted "
                   "past the grace period, by kind.", ["kind"])
    oldest = _gauge("dataplane_drift_oldest_seconds", "Age of the oldest difference of this kind still "
                    "drifted (0 when none).", ["kind"])
    pending = _gauge("dataplane_drift_pending", "Differences still within the grace period, by kind "
                     "(a proxy doing its job).", ["kind"])
    for kind in KINDS:
        label = [singular(kind)]
        drift.add_metric(label, report.counts.get(kind, 0))
        oldest.add_metric(label, report.oldest_seconds.get(kind, 0.0))
        pending.add_metric(label, report.pending.get(kind, 0))
    per_service = _gauge("dataplane_service_drift", "Drifted items of one Service by kind (drifted Services "
                         "only, capped by drift.max-service-series).", ["namespace", "service", "kind"])
    for item in report.services:
        per_service.add_metric([item.namespace, item.service, singular(item.kind)], item.count)
    out = [
        drift, oldest, pending, per_service,
        _gauge("dataplane_service_drift_series_dropped", "kubenode_dataplane_service_drift series left out "
               "by the drift.max-service-series cap.", value=report.services_not_shown),
    ]
    if mode == "ipvs":  # graceful termination at weight 0 is IPVS's alone
        out.append(_gauge("ipvs_stuck_graceful_termination_real_servers",
                          "Real servers left at weight 0 with no connections past drift.stuck-draining-after: "
                          "kube-proxy's graceful termination is not running (kubernetes issue 71071).",
                          value=report.stuck_draining))
    return out


def latency_metrics(follower: LatencyFollower | None) -> list[Metric]:
    if follower is None:
        return []
    help_text = ("Network programming latency seen from outside the proxy: from an EndpointSlice's "
                 "last-change-trigger-time to the live dataplane matching it.")
    dropped = CounterMetricFamily(f"{NAMESPACE}_dataplane_programming_latency_dropped",
                                  "Changed Services not followed because too many were pending.",
                                  value=follower.dropped)
    timed_out = CounterMetricFamily(f"{NAMESPACE}_dataplane_programming_latency_timeouts",
                                    "Changed Services given up on: the dataplane did not match within the "
                                    "timeout.", value=follower.timed_out)
    return [follower.histogram.metric(LATENCY_METRIC, help_text),
            _gauge("dataplane_programming_latency_pending", "Changed Services followed until the dataplane "
                   "matches them.", value=follower.pending()),
            dropped, timed_out]


@register
class DriftCollector(Collector):
    name = "drift"
    old_names = ("ipvs_drift",)
    options = OPTIONS
    help = ("drift between the dataplane Services/EndpointSlices call for and the live one (IPVS, "
            "nftables or iptables, by proxy mode); programming latency")

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.proxy_mode = shared_proxy_mode(ctx)
        settings = ctx.settings
        self._tracker_settings = (settings.get("drift.grace-period"), settings.get("drift.max-service-series"),
                                  settings.get("drift.stuck-draining-after"))
        self.mode: str | None = None
        self.dataplane: DataplaneReader | None = None
        self.kube: KubeAccess | None = None
        self.latency: LatencyFollower | None = None
        self._unsubscribe_latency = None
        self.tracker = DriftTracker(*self._tracker_settings)
        self.differ = TableDiffer()  # per scrape, only what changed is compared again
        self.rules_views = RulesViews()  # nftables/iptables: the desired side in the readers' shape
        self._chain_names = None  # (store generation, iptables.ChainServices)
        self._said_waiting = False
        self._trimmed_after: int | None = None  # id() of the live table read when pages were last handed back
        self._stuck_log = RateLimitedLog(log, burst=1, period=600.0)  # once per 10 min while it lasts
        mode = self.proxy_mode.current()
        if mode is not None:
            self._use(mode)

    def _use(self, mode: str) -> None:
        """Store model, reader and latency follower of ``mode`` (what drifted before is forgotten)."""
        if mode == self.mode:
            return
        self._stop_latency()
        self.mode = mode
        self.kube = shared_kube(self.ctx, mode)
        self.dataplane = dataplane_for(self.ctx, mode)
        self.latency, self._unsubscribe_latency = start_latency(self.ctx, self.kube, self.dataplane)
        self.tracker = DriftTracker(*self._tracker_settings)
        self.differ = TableDiffer()
        self.rules_views = RulesViews()  # of this mode's store
        self._chain_names = None  # (store generation, iptables.ChainServices)
        self._trimmed_after = None

    def _chain_services(self, store, generation: int):
        """The iptables chain names of the store's Services, made again only after a change."""
        from exporter.readers.iptables import chain_services_for

        if self._chain_names is None or self._chain_names[0] != generation:
            self._chain_names = (generation, chain_services_for(store.services()))
        return self._chain_names[1]

    def _stop_latency(self) -> None:
        if self.latency is not None:
            self._unsubscribe_latency()
            self.latency.stop()
            self.latency = self._unsubscribe_latency = None

    def close(self) -> None:
        self._stop_latency()

    def collect(self) -> Iterable[Metric]:
        mode = self.proxy_mode.current()
        if mode is None:
            raise Unavailable(f"no proxy mode found on this node: {self.proxy_mode.how}")
        self._use(mode)
        store = self.kube.store
        if store is None:
            if not self.kube.configured:
                raise Unavailable(f"no Kubernetes API access: {self.kube.error}")
            raise CollectorError(f"no Kubernetes API access: {self.kube.error}")
        yield info_metric(self.ctx.settings.get("proxy"), mode)
        statuses = store.watch_status()
        yield watch_up_family(statuses)
        yield from latency_metrics(self.latency)
        snap = store.snapshot()
        yield _gauge("dataplane_drift_synced", "1 when every resource has been listed and drift figures are "
                     "served; 0 before the first full list (no figures rather than everything missing).",
                     value=1.0 if snap.synced else 0.0)
        if not snap.synced:
            reasons = [s.last_error for s in statuses.values() if s.last_error and not s.synced]
            if reasons and not any(s.synced for s in statuses.values()):
                raise CollectorError(f"no Kubernetes API access: {reasons[0]}")
            if not self._said_waiting:
                log.info("drift figures wait for the first full list of Services, EndpointSlices and this Node")
                self._said_waiting = True
            return
        if mode in RULES_MODES:
            want = self.rules_views.of(snap)
            desired_table, desired_rejected = want.table, want.rejected
        else:
            desired_table, desired_rejected = snap.table, {}
        yield from desired_metrics(len(desired_table), snap.real_servers)
        if mode == "iptables":
            # Its chain names are hashes of the service port names: named from the Services,
            # never from comments (kube-proxy drops them past 1,000 endpoints).
            self.dataplane.chain_services = lambda: self._chain_services(store, snap.generation)
        try:
            # Within one scrape the mode's table collector has just read it: shared, not read twice.
            live = self.dataplane.read()
        except DataplaneUnavailable as err:
            raise Unavailable(str(err)) from None
        except ReadFailed as err:
            raise CollectorError(str(err)) from None
        except OSError as err:
            raise CollectorError(f"reading the live {mode} dataplane: {err.strerror or err}") from None
        yield _gauge("dataplane_read_seconds", "How long this scrape's read of the live dataplane took (a "
                     "generation check alone when nftables rules did not change).", value=live.read_seconds)
        if live.unread:
            # What was not read would be missing or, worse, silent: no drift figures at all
            # rather than a clean-looking table.
            more = f" (and {len(live.unread) - 1} more)" if len(live.unread) > 1 else ""
            raise CollectorError(f"the live {mode} dataplane not read whole, no drift figures: "
                                 f"{live.unread[0]}{more}")
        diff = self.differ.diff(desired_table, live.table, desired_rejected, live.rejected, snap.table)
        report = self.tracker.update(diff, time.monotonic())
        if any(report.pending.values()) or any(report.counts.values()):
            # Still this mode? A proxy redeployed in another one leaves these rules cleaned
            # up or stale: asked within the grace period, not at the next 5-minute check.
            self.proxy_mode.recheck_soon()
        if id(live.table) != self._trimmed_after:
            # The live table was read anew (the first time: with the list's decode and the
            # first full diff): what that read and this diff made and dropped is freed by
            # now; its pages go back (a fraction of a millisecond). Under churn, without this,
            # RSS sat 15-50 MB above a still table's (bench soak, 10,000 Services).
            allocator.trim()
            self._trimmed_after = id(live.table)
        yield from report_metrics(report, mode)
        if report.stuck_draining:
            # Names the first few so the log says which endpoints, without a series per item.
            shown = ", ".join(f"{i.service or i.vs} -> {i.real[0]}:{i.real[1]}"
                              for i in report.stuck_draining_items[:3])
            self._stuck_log.warning("%d real servers stuck at weight 0 with no connections (graceful termination "
                                    "not running, kubernetes issue 71071): %s", report.stuck_draining, shown)
