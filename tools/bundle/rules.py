"""Prometheus recording and alerting rules for kubenode-exporter, from the bundle config.

Every expression selects the exporter's series with ``exporterSelector`` and keeps
the target labels (job, instance and the node label) so each alert names its node;
the drift and programming-latency alerts also carry the ``proxy`` and ``mode`` of
``kubenode_dataplane_info``, so a page says which dataplane the node runs.
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
        {"record": "node:kubenode_dataplane_drift:sum",
         # Draining real servers are graceful termination at work (IPVS only), not drift, unless
         # it lasts (KubeNodeIPVSGracefulTerminationStuck watches that on its own).
         "expr": "sum without (kind) (kubenode_dataplane_drift" + s('kind!="draining_real_server"') + ")"},
        {"record": "node:kubenode_dataplane_programming_latency_seconds:p99_rate5m",
         "expr": "histogram_quantile(0.99, rate(kubenode_dataplane_programming_latency_seconds_bucket"
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
    group_of = {"set": "kubenode-ipset", "node:kubenode_dataplane_drift": "kubenode-dataplane",
                "node:kubenode_dataplane_programming": "kubenode-proxy", "proxy": "kubenode-proxy",
                "component": "kubenode-node", "node:kubenode_memcg": "kubenode-node"}
    out = []
    for rule in rules:
        group = next(g for prefix, g in group_of.items() if rule["record"].startswith(prefix))
        out.append((group, rule))
    return out


# (group, name, expr builder, summary, description). In descriptions, NODE stands for
# the node label's template, RULES for the node's rules and their mode, and THRESHOLD for
# the configured threshold.
def _alert_table(cfg: dict) -> list[tuple[str, str, str, str, str]]:
    s = lambda extra="": _sel(cfg, extra)  # noqa: E731
    k = cfg["alerts"]
    t = lambda name: _num(k[name]["threshold"])  # noqa: E731
    proxies = _alternation(cfg["proxyComponents"])
    kubelet = cfg["kubeletComponent"]

    def with_mode(expr: str) -> str:
        # The page says which dataplane the node runs: the proxy and mode labels of
        # kubenode_dataplane_info joined on the target's own labels. A node whose exporter does
        # not say (an older build, the info series missing) still pages, without them.
        info = f"kubenode_dataplane_info{s()}"
        return (f"({expr}) * ignoring (proxy, mode) group_left (proxy, mode) {info} "
                f"or ignoring (proxy, mode) ({expr})")

    def drift(kind: str) -> str:
        matcher = 'kind="%s"' % kind
        return with_mode(f"sum without (kind) (kubenode_dataplane_drift{s(matcher)}) > 0")

    # Every drift kind is the same question in every kube-proxy mode: a frontend (ClusterIP,
    # NodePort, externalIP or load-balancer address and port) is a virtual server, an endpoint
    # a real server. RULES names the node's rules and, where the exporter says it, their mode.
    return [
        ("kubenode-dataplane", "KubeNodeDataplaneStaleRealServers", drift("stale_real_server"),
         "The proxy's rules still send traffic to endpoints that are gone.",
         "{{ $value | humanize }} addresses that are no longer ready endpoints still take traffic in "
         "RULES on node NODE, past the exporter's drift grace period: connections to them fail."),
        ("kubenode-dataplane", "KubeNodeDataplaneMissingVirtualServers", drift("missing_virtual_server"),
         "Service frontends are not programmed in the proxy's rules.",
         "{{ $value | humanize }} Service frontends (address, protocol and port) are missing from RULES "
         "on node NODE, past the drift grace period: traffic to them from this node is lost."),
        ("kubenode-dataplane", "KubeNodeDataplaneRejectedVirtualServers", drift("rejected_virtual_server"),
         "The proxy's rules refuse traffic to Services that have endpoints.",
         "{{ $value | humanize }} frontends of Services with usable endpoints hit a reject or drop "
         "verdict in RULES on node NODE, past the drift grace period: clients are refused although "
         "the Service has endpoints."),
        ("kubenode-dataplane", "KubeNodeDataplaneMissingRealServers", drift("missing_real_server"),
         "Ready endpoints are missing from the proxy's rules.",
         "{{ $value | humanize }} ready endpoints are missing from RULES on node NODE, past the drift "
         "grace period: their Services run on fewer backends from this node."),
        ("kubenode-dataplane", "KubeNodeDataplaneStaleVirtualServers", drift("stale_virtual_server"),
         "The proxy's rules keep frontends of deleted Services.",
         "{{ $value | humanize }} frontends in RULES on node NODE belong to no Service, past the drift "
         "grace period: the proxy is not cleaning up, and a reused address would be misrouted."),
        # Weights exist only in IPVS: in the other modes this kind stays 0.
        ("kubenode-dataplane", "KubeNodeDataplaneZeroWeightRealServers", drift("zero_weight_real_server"),
         "Ready endpoints have IPVS weight 0.",
         "{{ $value | humanize }} ready endpoints are in RULES on node NODE with IPVS weight 0, past the "
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
        # The drift collector reports nothing over a table it did not read whole (success 0,
        # in every mode: KubeNodeCollectorFailing); this says why, early, on IPVS nodes.
        ("kubenode-ipvs", "KubeNodeIPVSTableUnreadable", f"kubenode_ipvs_unparsed_lines{s()} > 0",
         "The IPVS table is not read whole; drift is not reported.",
         "{{ $value | humanize }} lines of /proc/net/ip_vs on node NODE are not IPVS text the exporter "
         "understands: it reports no IPVS drift there rather than a clean table it did not read whole, "
         "so the drift alerts of this node are blind."),
        ("kubenode-proxy", "KubeNodeProxyProgrammingLatencyHigh",
         with_mode("node:kubenode_dataplane_programming_latency_seconds:p99_rate5m"
                   f" > {t('KubeNodeProxyProgrammingLatencyHigh')}"),
         "Endpoint changes take long to reach the proxy's rules.",
         "99th percentile of network programming latency on node NODE is {{ $value | humanizeDuration }} "
         "(threshold THRESHOLDs): new and removed endpoints take that long to reach RULES."),
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
         "kubenode-exporter on node NODE has no working watch on {{ $labels.resource }}: dataplane "
         "drift cannot be computed there."),
        ("kubenode-exporter", "KubeNodeExporterDown", f"up{s()} == 0",
         "kubenode-exporter cannot be scraped.",
         "Prometheus cannot scrape kubenode-exporter on node NODE ({{ $labels.instance }}): "
         "every kubenode alert for that node is blind."),
    ]


# The node's rules, and their mode where kubenode_dataplane_info says it.
RULES_TEMPLATE = "the proxy's rules{{ with $labels.mode }} ({{ . }} mode){{ end }}"

ALERT_NAMES = [
    "KubeNodeDataplaneStaleRealServers", "KubeNodeDataplaneMissingRealServers",
    "KubeNodeDataplaneMissingVirtualServers", "KubeNodeDataplaneStaleVirtualServers",
    "KubeNodeDataplaneZeroWeightRealServers", "KubeNodeDataplaneRejectedVirtualServers",
    "KubeNodeIPVSGracefulTerminationStuck", "KubeNodeIPVSTableUnreadable",
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
                "description": description.replace("NODE", node_tmpl).replace("RULES", RULES_TEMPLATE),
                "runbook_url": cfg["runbookURLBase"] + name + ".md",
            },
        })
    order = ["kubenode-dataplane", "kubenode-ipvs", "kubenode-proxy", "kubenode-ipset", "kubenode-node", "kubenode-exporter"]
    return [{"name": name, "rules": groups[name]} for name in order]
