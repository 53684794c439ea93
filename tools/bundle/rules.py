"""Prometheus recording and alerting rules for kubenode-exporter, from the bundle config.

Every expression selects the exporter's series with ``exporterSelector`` and keeps
the target labels (job, instance and the node label) so each alert names its node.
Thresholds, ``for`` and severity come from ``config.yaml``; why each value was chosen
is in ``docs/runbooks/<AlertName>.md``.
"""

from __future__ import annotations

from typing import Any


def _sel(cfg: dict, extra: str = "") -> str:
    parts = [p for p in (cfg["exporterSelector"], extra) if p]
    return "{" + ", ".join(parts) + "}"


def _num(value: float) -> str:
    return repr(float(value)).removesuffix(".0") if float(value) == int(value) else repr(float(value))


def _alternation(values: list[str]) -> str:
    return "|".join(values)


def recording_rules(cfg: dict) -> list[tuple[str, dict]]:
    """(group, rule): rules that make dashboards and alerts cheaper, one rate or quantile
    for many readers. Each sits first in the group of the alerts that read it, so an alert
    sees the value recorded in the same evaluation (rules of one group run in order)."""
    s = lambda extra="": _sel(cfg, extra)  # noqa: E731 - a short local spelling
    rules = [
        {"record": "set:kubenode_ipset_fill:ratio",
         "expr": f"sum without (type) (kubenode_ipset_entries{s()}) / (kubenode_ipset_max_entries{s()} > 0)"},
        {"record": "node:kubenode_ipvs_drift:sum",
         # Draining real servers are graceful termination at work, not drift, unless it lasts
         # (KubeNodeIPVSGracefulTerminationStuck watches that on its own).
         "expr": "sum without (kind) (kubenode_ipvs_drift" + s('kind!="draining_real_server"') + ")"},
        {"record": "node:kubenode_ipvs_programming_latency_seconds:p99_rate5m",
         "expr": "histogram_quantile(0.99, rate(kubenode_ipvs_programming_latency_seconds_bucket"
                 f"{s()}[5m]))"},
        {"record": "proxy:kubenode_proxy_sync_duration_seconds:p99_rate10m",
         "expr": f"histogram_quantile(0.99, rate(kubenode_proxy_sync_duration_seconds_bucket{s()}[10m]))"},
        {"record": "component:kubenode_process_cpu_seconds:rate5m",
         "expr": f"rate(kubenode_process_cpu_seconds_total{s()}[5m])"},
        {"record": "component:kubenode_process_children_cpu_seconds:rate5m",
         "expr": f"rate(kubenode_process_children_cpu_seconds_total{s()}[5m])"},
        {"record": "node:kubenode_memcg_stat_read_seconds:max",
         "expr": f"max without (cgroup) (kubenode_memcg_stat_read_seconds{s()})"},
    ]
    group_of = {"set": "kubenode-ipset", "node:kubenode_ipvs_drift": "kubenode-ipvs",
                "node:kubenode_ipvs_programming": "kubenode-proxy", "proxy": "kubenode-proxy",
                "component": "kubenode-node", "node:kubenode_memcg": "kubenode-node"}
    out = []
    for rule in rules:
        group = next(g for prefix, g in group_of.items() if rule["record"].startswith(prefix))
        out.append((group, rule))
    return out


# (group, name, expr builder, summary, description). In descriptions, NODE stands for
# the node label's template and THRESHOLD for the configured threshold.
def _alert_table(cfg: dict) -> list[tuple[str, str, str, str, str]]:
    s = lambda extra="": _sel(cfg, extra)  # noqa: E731
    k = cfg["alerts"]
    t = lambda name: _num(k[name]["threshold"])  # noqa: E731
    proxies = _alternation(cfg["proxyComponents"])
    kubelet = cfg["kubeletComponent"]

    def drift(kind: str) -> str:
        matcher = 'kind="%s"' % kind
        return f"sum without (kind) (kubenode_ipvs_drift{s(matcher)}) > 0"

    return [
        ("kubenode-ipvs", "KubeNodeIPVSStaleRealServers", drift("stale_real_server"),
         "IPVS still sends traffic to endpoints that are gone.",
         "{{ $value | humanize }} IPVS real servers on node NODE have weight > 0 but no ready "
         "endpoint behind them, past the exporter's drift grace period: connections to them fail."),
        ("kubenode-ipvs", "KubeNodeIPVSMissingVirtualServers", drift("missing_virtual_server"),
         "Service addresses are not programmed in IPVS.",
         "{{ $value | humanize }} virtual servers that Services need are missing from IPVS on node NODE, "
         "past the drift grace period: traffic to those Service addresses from this node is lost."),
        ("kubenode-ipvs", "KubeNodeIPVSMissingRealServers", drift("missing_real_server"),
         "Ready endpoints are missing from IPVS.",
         "{{ $value | humanize }} ready endpoints are missing as IPVS real servers on node NODE, "
         "past the drift grace period: their Services run on fewer backends from this node."),
        ("kubenode-ipvs", "KubeNodeIPVSStaleVirtualServers", drift("stale_virtual_server"),
         "IPVS keeps virtual servers of deleted Services.",
         "{{ $value | humanize }} IPVS virtual servers on node NODE belong to no Service, past the "
         "drift grace period: the proxy is not cleaning up, and a reused address would be misrouted."),
        ("kubenode-ipvs", "KubeNodeIPVSZeroWeightRealServers", drift("zero_weight_real_server"),
         "Ready endpoints have IPVS weight 0.",
         "{{ $value | humanize }} ready endpoints on node NODE are in IPVS with weight 0, past the "
         "drift grace period: no new connection reaches them."),
        # The exporter counts a real server as stuck only at weight 0 with no connections
        # left for drift.stuck-draining-after: a long-lived connection still draining is
        # graceful termination working, not stuck (kubernetes issue 71071).
        ("kubenode-ipvs", "KubeNodeIPVSGracefulTerminationStuck",
         "kubenode_ipvs_stuck_graceful_termination_real_servers"
         + s() + f" > {t('KubeNodeIPVSGracefulTerminationStuck')}",
         "IPVS real servers of removed endpoints are not being deleted.",
         "{{ $value | humanize }} real servers of removed endpoints on node NODE are at weight 0 "
         "with no connections left, yet still in IPVS: the proxy's graceful termination is not "
         "deleting them (kubernetes issue 71071)."),
        # The drift collector reports nothing over a table it did not read whole (success 0):
        # without this alert the drift alerts would only fall silent.
        ("kubenode-ipvs", "KubeNodeIPVSTableUnreadable", f"kubenode_ipvs_unparsed_lines{s()} > 0",
         "The IPVS table is not read whole; drift is not reported.",
         "{{ $value | humanize }} lines of /proc/net/ip_vs on node NODE are not IPVS text the exporter "
         "understands: it reports no IPVS drift there rather than a clean table it did not read whole, "
         "so the drift alerts of this node are blind."),
        ("kubenode-proxy", "KubeNodeProxyProgrammingLatencyHigh",
         f"node:kubenode_ipvs_programming_latency_seconds:p99_rate5m > {t('KubeNodeProxyProgrammingLatencyHigh')}",
         "Endpoint changes take long to reach IPVS.",
         "99th percentile of network programming latency on node NODE is {{ $value | humanizeDuration }} "
         "(threshold THRESHOLDs): new and removed endpoints take that long to reach IPVS."),
        ("kubenode-proxy", "KubeNodeProxySyncSlow",
         f"proxy:kubenode_proxy_sync_duration_seconds:p99_rate10m > {t('KubeNodeProxySyncSlow')}",
         "The proxy's rule syncs are slow.",
         "99th percentile of {{ $labels.proxy }} sync duration on node NODE is "
         "{{ $value | humanizeDuration }} (threshold THRESHOLDs)."),
        # kube-proxy says when a queued change is waiting (the precise "hung" sign); for
        # kube-router only the time since its sync count last grew is known.
        ("kubenode-proxy", "KubeNodeProxySyncStale",
         f"kubenode_proxy_sync_pending_seconds{s()} > {_num(k['KubeNodeProxySyncStale']['pendingThreshold'])} "
         f"or time() - kubenode_proxy_last_sync_timestamp_seconds{s()} > {t('KubeNodeProxySyncStale')}",
         "The proxy has stopped syncing its rules.",
         "{{ $labels.proxy }} on node NODE has not synced its rules for {{ $value | humanizeDuration }} "
         "(a queued change waiting over PENDINGs, or no sync at all for over THRESHOLDs): it may be hung."),
        ("kubenode-proxy", "KubeNodeProxyMetricsDown", f"kubenode_proxy_up{s()} == 0",
         "The proxy's own sync metrics cannot be read.",
         "kubenode-exporter on node NODE cannot read {{ $labels.proxy }}'s sync metrics (its page does not "
         "answer, is unusable, or lacks them: see kubenode_proxy_expected_metric_missing and the exporter's log): "
         "sync duration and staleness of that proxy are not visible."),
        ("kubenode-ipset", "KubeNodeIpsetNearlyFull",
         f"set:kubenode_ipset_fill:ratio > {t('KubeNodeIpsetNearlyFull')}",
         "An ipset is nearly full.",
         "ipset {{ $labels.set }} on node NODE is {{ $value | humanizePercentage }} full "
         "(threshold PERCENT_THRESHOLD): once full, every add fails."),
        ("kubenode-ipset", "KubeNodeIpsetFull",
         f"set:kubenode_ipset_fill:ratio >= {t('KubeNodeIpsetFull')}",
         "An ipset is full; adds to it fail.",
         "ipset {{ $labels.set }} on node NODE is {{ $value | humanizePercentage }} full: "
         "the proxy cannot add entries to it and new Services or endpoints are not served."),
        ("kubenode-node", "KubeNodeKubeletCPUHigh",
         f'component:kubenode_process_cpu_seconds:rate5m{{component="{kubelet}"}} '
         f'+ component:kubenode_process_children_cpu_seconds:rate5m{{component="{kubelet}"}} '
         f"> {t('KubeNodeKubeletCPUHigh')}",
         "kubelet uses a lot of CPU.",
         "kubelet on node NODE uses {{ $value | printf \"%.2f\" }} CPU cores (own and exited children, "
         "threshold THRESHOLD)."),
        ("kubenode-node", "KubeNodeProxyCPUHigh",
         f'component:kubenode_process_cpu_seconds:rate5m{{component=~"{proxies}"}} '
         f'+ component:kubenode_process_children_cpu_seconds:rate5m{{component=~"{proxies}"}} '
         f"> {t('KubeNodeProxyCPUHigh')}",
         "The service proxy uses a lot of CPU.",
         "{{ $labels.component }} on node NODE uses {{ $value | printf \"%.2f\" }} CPU cores "
         "(own and exited children, threshold THRESHOLD)."),
        ("kubenode-node", "KubeNodeProxyExecStorm",
         f'component:kubenode_process_children_cpu_seconds:rate5m{{component=~"{proxies}"}} '
         f"> {t('KubeNodeProxyExecStorm')}",
         "The service proxy burns CPU in short-lived child processes.",
         "Exited children of {{ $labels.component }} on node NODE use {{ $value | printf \"%.2f\" }} "
         "CPU cores (threshold THRESHOLD): it is exec'ing tools like ipset or ip in a loop."),
        ("kubenode-node", "KubeNodeMemcgStatReadSlow",
         f"node:kubenode_memcg_stat_read_seconds:max > {t('KubeNodeMemcgStatReadSlow')}",
         "Reading memory.stat is slow.",
         "The slowest memory.stat read on node NODE took {{ $value | humanizeDuration }} "
         "(threshold THRESHOLDs): kubelet's cAdvisor pays this on every housekeeping pass."),
        ("kubenode-node", "KubeNodeDyingMemcgsHigh",
         "sum without (state) (kubenode_memcg_cgroups" + s('state="dying"')
         + f") > {t('KubeNodeDyingMemcgsHigh')}",
         "Many dying memory cgroups.",
         "Node NODE has {{ $value | humanize }} dying memory cgroups (threshold THRESHOLD): "
         "removed cgroups still pinned by page cache make memory.stat reads slow."),
        ("kubenode-exporter", "KubeNodeCollectorFailing", f"kubenode_collector_success{s()} == 0",
         "A kubenode-exporter collector fails.",
         "Collector {{ $labels.collector }} of kubenode-exporter on node NODE has been failing: "
         "its metrics are missing or partial."),
        ("kubenode-exporter", "KubeNodeKubeWatchDown", f"kubenode_kube_watch_up{s()} == 0",
         "kubenode-exporter cannot watch the Kubernetes API.",
         "kubenode-exporter on node NODE has no working watch on {{ $labels.resource }}: IPVS drift "
         "cannot be computed there."),
        ("kubenode-exporter", "KubeNodeExporterDown", f"up{s()} == 0",
         "kubenode-exporter cannot be scraped.",
         "Prometheus cannot scrape kubenode-exporter on node NODE ({{ $labels.instance }}): "
         "every kubenode alert for that node is blind."),
    ]


ALERT_NAMES = [
    "KubeNodeIPVSStaleRealServers", "KubeNodeIPVSMissingRealServers",
    "KubeNodeIPVSMissingVirtualServers", "KubeNodeIPVSStaleVirtualServers",
    "KubeNodeIPVSZeroWeightRealServers", "KubeNodeIPVSGracefulTerminationStuck", "KubeNodeIPVSTableUnreadable",
    "KubeNodeProxyProgrammingLatencyHigh", "KubeNodeProxySyncSlow", "KubeNodeProxySyncStale",
    "KubeNodeProxyMetricsDown", "KubeNodeIpsetNearlyFull", "KubeNodeIpsetFull",
    "KubeNodeKubeletCPUHigh", "KubeNodeProxyCPUHigh", "KubeNodeProxyExecStorm",
    "KubeNodeMemcgStatReadSlow", "KubeNodeDyingMemcgsHigh", "KubeNodeCollectorFailing",
    "KubeNodeKubeWatchDown", "KubeNodeExporterDown",
]


def rule_groups(cfg: dict) -> list[dict[str, Any]]:
    node_tmpl = "{{ $labels.%s }}" % cfg["nodeLabel"]
    groups: dict[str, list[dict]] = {}
    for group, rule in recording_rules(cfg):
        groups.setdefault(group, []).append(rule)
    for group, name, expr, summary, description in _alert_table(cfg):
        knobs = cfg["alerts"][name]
        if "threshold" in knobs:
            description = description.replace("PERCENT_THRESHOLD", f"{knobs['threshold'] * 100:g}%")
            description = description.replace("THRESHOLD", _num(knobs["threshold"]))
        if "pendingThreshold" in knobs:
            description = description.replace("PENDING", _num(knobs["pendingThreshold"]))
        groups.setdefault(group, []).append({
            "alert": name,
            "expr": expr,
            "for": knobs["for"],
            "labels": {"severity": knobs["severity"]},
            "annotations": {
                "summary": summary,
                "description": description.replace("NODE", node_tmpl),
                "runbook_url": cfg["runbookURLBase"] + name + ".md",
            },
        })
    order = ["kubenode-ipvs", "kubenode-proxy", "kubenode-ipset", "kubenode-node", "kubenode-exporter"]
    return [{"name": name, "rules": groups[name]} for name in order]
