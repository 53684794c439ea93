"""Grafana dashboards for kubenode-exporter, written with grafana-foundation-sdk.

Two dashboards: one node (what is wrong on this node, and since when) and a
cluster overview (worst nodes first). Both have datasource, job and node
variables; the node label's name and the tags come from the bundle config.
The node dashboard reads raw exporter series (one node: cheap); the cluster
overview reads the recording rules of alerts/ where one rate or quantile per node
would otherwise be computed across the whole fleet on every refresh, so load the
rules with the dashboards. ``panel_queries`` lists every query for the end-to-end test.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from grafana_foundation_sdk.builders import bargauge, common as cb, heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
REF_IDS = "ABCDEFGH"


class _Layout:
    """Hands out panel ids so the JSON is stable from one build to the next."""

    def __init__(self) -> None:
        self.next_id = 1

    def id(self) -> int:
        out = self.next_id
        self.next_id += 1
        return out


def _query(expr: str, legend: str = "", *, instant: bool = False,
           fmt: pm.PromQueryFormat | None = None) -> prom.Dataquery:
    q = prom.Dataquery().expr(expr)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant()
    else:
        q = q.range()
    if fmt is not None:
        q = q.format(fmt)
    return q


def _targets(panel, queries: list[prom.Dataquery]):
    for ref, q in zip(REF_IDS, queries):
        panel = panel.with_target(q.ref_id(ref))
    return panel


def _graph(ids: _Layout, title: str, description: str, queries: list[prom.Dataquery], unit: str,
           span: int = 12, stack: bool = False) -> timeseries.Panel:
    legend = (cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
              .placement(cm.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"]))
    panel = (timeseries.Panel().id(ids.id()).title(title).description(description)
             .datasource(DATASOURCE).unit(unit).min(0).height(8).span(span).fill_opacity(10)
             .legend(legend))
    if stack:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    return _targets(panel, queries)


def _heatmap(ids: _Layout, title: str, description: str, expr: str, span: int = 12) -> heatmap.Panel:
    panel = (heatmap.Panel().id(ids.id()).title(title).description(description)
             .datasource(DATASOURCE).height(8).span(span).calculate(False)
             .y_axis(heatmap.YAxisConfig().unit("s"))
             .cell_values(heatmap.CellValues().unit("reqps"))
             .color(heatmap.HeatmapColorOptions().mode(heatmap_color_mode()).scheme("Oranges")
                    .scale(heatmap_color_scale()).exponent(0.5).steps(64))
             .show_tooltip().show_y_histogram().hide_legend())
    return _targets(panel, [_query(expr, "{{le}}", fmt=pm.PromQueryFormat.HEATMAP)])


def heatmap_color_mode():
    from grafana_foundation_sdk.models import heatmap as hm
    return hm.HeatmapColorMode.SCHEME


def heatmap_color_scale():
    from grafana_foundation_sdk.models import heatmap as hm
    return hm.HeatmapColorScale.EXPONENTIAL


def _table(ids: _Layout, title: str, description: str, expr: str, span: int = 12,
           sort_field: str = "Value") -> table.Panel:
    panel = (table.Panel().id(ids.id()).title(title).description(description)
             .datasource(DATASOURCE).height(8).span(span)
             .sort_by([cb.TableSortByFieldState().display_name(sort_field).desc(True)])
             .with_transformation(dm.DataTransformerConfig(
                 id_val="organize", options={"excludeByName": {"Time": True}})))
    return _targets(panel, [_query(expr, instant=True, fmt=pm.PromQueryFormat.TABLE)])


def _bars(ids: _Layout, title: str, description: str, expr: str, legend: str, unit: str,
          span: int = 8, maximum: float | None = None, steps: list[tuple[float | None, str]] | None = None,
          top: int = 10, link: str | None = None) -> bargauge.Panel:
    """Worst first, and only the ``top`` worst: a bar per node of a 1,000-node fleet helps no one."""
    assert expr.startswith("sort_desc(") and expr.endswith(")")
    expr = f"sort_desc(topk({top}, {expr[len('sort_desc('):-1]}))"
    panel = (bargauge.Panel().id(ids.id()).title(title).description(description)
             .datasource(DATASOURCE).height(8).span(span).unit(unit).min(0)
             .orientation(cm.VizOrientation.HORIZONTAL)
             .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
             .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if maximum is not None:
        panel = panel.max(maximum)
    if steps:
        panel = panel.thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
            [dm.Threshold(value=v, color=c) for v, c in steps]))
    if link:
        panel = panel.data_links([db.DashboardLink("Open this node").url(link)])
    return _targets(panel, [_query(expr, legend, instant=True)])


def _stat(ids: _Layout, title: str, description: str, expr: str, unit: str = "short",
          span: int = 6, steps: list[tuple[float | None, str]] | None = None, legend: str = "",
          text_mode: cm.BigValueTextMode | None = None, no_value: str | None = None) -> stat.Panel:
    panel = (stat.Panel().id(ids.id()).title(title).description(description)
             .datasource(DATASOURCE).height(4).span(span).unit(unit)
             .color_mode(cm.BigValueColorMode.BACKGROUND)
             .graph_mode(cm.BigValueGraphMode.AREA)
             .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if steps:
        panel = panel.thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
            [dm.Threshold(value=v, color=c) for v, c in steps]))
    if text_mode is not None:
        panel = panel.text_mode(text_mode)
    if no_value is not None:
        panel = panel.no_value(no_value)
    return _targets(panel, [_query(expr, legend)])


# What a panel of the IPVS row says on a node whose proxy runs another mode.
NOT_IPVS = "No IPVS table: this node's proxy runs another mode (see Proxy mode)"


def _variables(d: db.Dashboard, cfg: dict, multi_node: bool) -> db.Dashboard:
    job, node = cfg["jobLabel"], cfg["nodeLabel"]
    d = d.with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    d = d.with_variable(
        db.QueryVariable("job").label("job").datasource(DATASOURCE)
        .query(f"label_values(kubenode_collector_success, {job})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*"))
    node_var = (db.QueryVariable("node").label("node").datasource(DATASOURCE)
                .query(f'label_values(kubenode_collector_success{{{job}=~"$job"}}, {node})')
                .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC))
    if multi_node:
        node_var = node_var.multi(True).include_all(True).all_value(".*")
    return d.with_variable(node_var)


def _base(cfg: dict, slug: str, title: str, description: str) -> db.Dashboard:
    g = cfg["grafana"]
    node = cfg["nodeLabel"]
    # This bundle's alerts as marks on every time axis: when did the page start, and end.
    alerts = (db.AnnotationQuery().name("kubenode alerts").datasource(DATASOURCE).enable(True)
              .icon_color("red").expr(f'ALERTS{{alertname=~"KubeNode.*", alertstate="firing", '
                                      f'{cfg["jobLabel"]}=~"$job", {node}=~"$node"}}'))
    return (db.Dashboard(title).uid(f"{g['uidPrefix']}-{slug}").description(description)
            .tags(list(g["tags"])).refresh(g["refresh"]).time("now-3h", "now").timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR).editable().annotation(alerts))


def node_dashboard(cfg: dict) -> db.Dashboard:
    ids = _Layout()
    j = f'{cfg["jobLabel"]}=~"$job", {cfg["nodeLabel"]}=~"$node"'
    d = _variables(_base(cfg, "node", "kubenode-exporter / Node",
                         "One node's Kubernetes dataplane: drift of the proxy's rules (any mode), "
                         "proxy programming and sync, "
                         "ipsets, kubelet and proxy CPU, memory.stat reads."), cfg, multi_node=False)
    # Drift reads only mode-neutral kubenode_dataplane_* series: the same panels on every mode.
    d = d.with_row(db.Row("Dataplane drift").id(ids.id()))
    d = d.with_panel(_stat(ids, "Proxy mode", "The proxy and the dataplane mode it runs on this node "
                           "(kubenode_dataplane_info): IPVS, nftables or iptables.",
                           f"max by (proxy, mode) (kubenode_dataplane_info{{{j}}})", legend="{{proxy}}: {{mode}}",
                           text_mode=cm.BigValueTextMode.NAME, steps=[(None, "blue")],
                           no_value="unknown (no kubenode_dataplane_info)"))
    d = d.with_panel(_stat(ids, "Drifted items", "Frontends and endpoints of the proxy's rules that differ "
                           "from the Services and EndpointSlices past the grace period (all kinds but draining).",
                           f'sum(kubenode_dataplane_drift{{{j}, kind!="draining_real_server"}}) or vector(0)',
                           steps=[(None, "green"), (1, "red")]))
    d = d.with_panel(_stat(ids, "Oldest drift", "Age of the oldest item still drifted, any kind but draining.",
                           f'max(kubenode_dataplane_drift_oldest_seconds{{{j}, kind!="draining_real_server"}})',
                           unit="s", steps=[(None, "green"), (120, "orange"), (600, "red")]))
    d = d.with_panel(_stat(ids, "Kubernetes watch", "1 when every watched resource is up.",
                           f"min(kubenode_kube_watch_up{{{j}}})", steps=[(None, "red"), (1, "green")]))
    d = d.with_panel(_graph(ids, "Drift by kind", "Drifted items of the proxy's rules per kind.",
                            [_query(f"sum by (kind) (kubenode_dataplane_drift{{{j}}})", "{{kind}}")], "short"))
    d = d.with_panel(_graph(ids, "Drift age by kind", "Age of the oldest drifted item per kind.",
                            [_query(f"max by (kind) (kubenode_dataplane_drift_oldest_seconds{{{j}}})", "{{kind}}")], "s"))
    d = d.with_panel(_table(ids, "Drifted services", "Services with drifted frontends or endpoints now (capped).",
                            f"max by (namespace, service, kind) (kubenode_dataplane_service_drift{{{j}}})", span=12))
    d = d.with_panel(_graph(ids, "Differences within the grace period", "Differences not yet drift: a proxy "
                            "doing its job shows short spikes here.",
                            [_query(f"sum by (kind) (kubenode_dataplane_drift_pending{{{j}}})", "{{kind}}")], "short"))
    d = d.with_panel(_graph(ids, "Desired frontends and endpoints", "What the Services and EndpointSlices ask "
                            "of this node's proxy, in any mode.", [
                                _query(f"sum(kubenode_dataplane_desired_virtual_servers{{{j}}})", "frontends"),
                                _query(f"sum(kubenode_dataplane_desired_real_servers{{{j}}})", "endpoints"),
                            ], "short"))
    d = d.with_panel(_graph(ids, "Live rules read time", "How long each scrape's read of the live rules took "
                            "(a cheap generation check when nothing changed).",
                            [_query(f"max(kubenode_dataplane_read_seconds{{{j}}})", "read")], "s"))

    # IPVS-only panels, apart, saying so on nodes of other modes rather than showing an empty graph.
    d = d.with_row(db.Row("IPVS table (IPVS mode only)").id(ids.id()))
    d = d.with_panel(_stat(ids, "Virtual servers: IPVS minus desired",
                           "Negative: virtual servers missing; positive: stale ones left behind.",
                           f"sum(kubenode_ipvs_virtual_servers{{{j}}}) - sum(kubenode_dataplane_desired_virtual_servers{{{j}}})",
                           span=12, steps=[(None, "green")], no_value=NOT_IPVS))
    d = d.with_panel(_stat(ids, "Stuck graceful terminations", "Real servers at weight 0 with no connections "
                           "that kube-proxy should have deleted.",
                           f"sum(kubenode_ipvs_stuck_graceful_termination_real_servers{{{j}}}) "
                           f"and sum(kubenode_ipvs_virtual_servers{{{j}}})",
                           span=12, steps=[(None, "green"), (1, "red")], no_value=NOT_IPVS))
    d = d.with_panel(_graph(ids, "IPVS table size", "What is programmed in IPVS against what should be.", [
        _query(f"sum(kubenode_ipvs_virtual_servers{{{j}}})", "virtual servers"),
        _query(f"sum(kubenode_dataplane_desired_virtual_servers{{{j}}}) and sum(kubenode_ipvs_virtual_servers{{{j}}})",
               "desired virtual servers"),
        _query(f"sum(kubenode_ipvs_real_servers{{{j}}})", "real servers"),
        _query(f"sum(kubenode_dataplane_desired_real_servers{{{j}}}) and sum(kubenode_ipvs_real_servers{{{j}}})",
               "desired real servers"),
    ], "short", span=24).no_value(NOT_IPVS))

    d = d.with_row(db.Row("Proxy programming and sync").id(ids.id()))
    d = d.with_panel(_heatmap(ids, "Network programming latency",
                              "From an EndpointSlice change to the proxy's rules matching it (any mode), "
                              "measured from outside the proxy.",
                              f"sum by (le) (rate(kubenode_dataplane_programming_latency_seconds_bucket{{{j}}}[$__rate_interval]))"))
    d = d.with_panel(_heatmap(ids, "Proxy sync duration", "The proxy's own rule-sync histogram.",
                              f"sum by (le) (rate(kubenode_proxy_sync_duration_seconds_bucket{{{j}}}[$__rate_interval]))"))
    d = d.with_panel(_graph(ids, "Since last proxy sync", "Seconds since the proxy last synced its rules, and "
                            "how long a queued change has waited (kube-proxy only): a rising line is a hung proxy.",
                            [_query(f"time() - max by (proxy) (kubenode_proxy_last_sync_timestamp_seconds{{{j}}})",
                                    "{{proxy}} since last sync"),
                             _query(f"max by (proxy) (kubenode_proxy_sync_pending_seconds{{{j}}})",
                                    "{{proxy}} change waiting")], "s"))
    d = d.with_panel(_graph(ids, "Proxy metrics endpoint up", "1 when the proxy's own metrics page answered.",
                            [_query(f"max by (proxy) (kubenode_proxy_up{{{j}}})", "{{proxy}}")], "short"))

    d = d.with_row(db.Row("ipsets").id(ids.id()))
    d = d.with_panel(_bars(ids, "ipset fill (entries / maxelem)", "Fullest sets first; a full set fails every add.",
                           f"sort_desc(sum by (set) (kubenode_ipset_entries{{{j}}}) "
                           f"/ max by (set) (kubenode_ipset_max_entries{{{j}}} > 0))",
                           "{{set}}", "percentunit", span=12, maximum=1,
                           steps=[(None, "green"), (0.8, "orange"), (1, "red")]))
    d = d.with_panel(_graph(ids, "ipset entries, largest sets", "Entries of the ten largest sets.",
                            [_query(f"topk(10, sum by (set) (kubenode_ipset_entries{{{j}}}))", "{{set}}")], "short"))

    d = d.with_row(db.Row("Processes").id(ids.id()))
    d = d.with_panel(_graph(ids, "Process CPU", "CPU cores used by each component itself.",
                            [_query(f"sum by (component) (rate(kubenode_process_cpu_seconds_total{{{j}}}[$__rate_interval]))",
                                    "{{component}}")], "short"))
    d = d.with_panel(_graph(ids, "Exited children CPU (exec storms)",
                            "CPU cores burned by short-lived children (ipset, ip, iptables) of each component.",
                            [_query(f"sum by (component) (rate(kubenode_process_children_cpu_seconds_total{{{j}}}[$__rate_interval]))",
                                    "{{component}}")], "short"))
    d = d.with_panel(_graph(ids, "Resident memory", "Resident set size of each component.",
                            [_query(f"sum by (component) (kubenode_process_resident_memory_bytes{{{j}}})",
                                    "{{component}}")], "bytes"))
    d = d.with_panel(_graph(ids, "Components running", "1 when the component's process was found.",
                            [_query(f"max by (component) (kubenode_process_up{{{j}}})", "{{component}}")], "short"))

    d = d.with_row(db.Row("Memory cgroups").id(ids.id()))
    d = d.with_panel(_graph(ids, "memory.stat read time", "How long the last read of each timed memory.stat took.",
                            [_query(f"max by (cgroup) (kubenode_memcg_stat_read_seconds{{{j}}})", "{{cgroup}}")], "s"))
    d = d.with_panel(_graph(ids, "Memory cgroups: live and dying", "Dying = the kernel's count minus live directories.",
                            [_query(f"sum by (state) (kubenode_memcg_cgroups{{{j}}})", "{{state}}")], "short"))

    d = d.with_row(db.Row("Exporter").id(ids.id()))
    d = d.with_panel(_table(ids, "Collectors", "1 = the collector's last run succeeded.",
                            f"min by (collector) (kubenode_collector_success{{{j}}})", sort_field="collector"))
    d = d.with_panel(_graph(ids, "Collector duration", "Time each collector took per scrape.",
                            [_query(f"max by (collector) (kubenode_collector_duration_seconds{{{j}}})",
                                    "{{collector}}")], "s"))
    d = d.with_panel(_graph(ids, "Exporter CPU", "CPU cores the exporter itself uses (its own process_* metrics).",
                            [_query(f"sum(rate(process_cpu_seconds_total{{{j}}}[$__rate_interval]))", "cores")],
                            "short", span=6))
    d = d.with_panel(_graph(ids, "Exporter memory", "The exporter's own resident memory.",
                            [_query(f"max(process_resident_memory_bytes{{{j}}})", "resident memory")],
                            "bytes", span=6))
    return d


def cluster_dashboard(cfg: dict) -> db.Dashboard:
    ids = _Layout()
    node = cfg["nodeLabel"]
    to_node = (f"/d/{cfg['grafana']['uidPrefix']}-node?var-datasource=${{datasource}}&var-job=${{job}}"
               f"&var-node=${{__field.labels.{node}}}&${{__url_time_range}}")
    j = f'{cfg["jobLabel"]}=~"$job", {node}=~"$node"'
    proxies = "|".join(cfg["proxyComponents"])
    kubelet = cfg["kubeletComponent"]
    d = _variables(_base(cfg, "cluster", "kubenode-exporter / Cluster",
                         "Every node's Kubernetes dataplane health, worst nodes first."), cfg, multi_node=True)
    d = d.link(db.DashboardLink("Node").type(dm.DashboardLinkType.DASHBOARDS)
               .tags(list(cfg["grafana"]["tags"])).as_dropdown(True).include_vars(True).keep_time(True))
    d = d.with_row(db.Row("Now").id(ids.id()))
    d = d.with_panel(_stat(ids, "Nodes scraped", "Exporter targets that answered.",
                           f"count(up{{{j}}} == 1) or vector(0)", span=4, steps=[(None, "blue")]))
    d = d.with_panel(_stat(ids, "Nodes down", "Exporter targets that did not answer.",
                           f"count(up{{{j}}} == 0) or vector(0)", span=4, steps=[(None, "green"), (1, "red")]))
    d = d.with_panel(_stat(ids, "Nodes per proxy mode", "How many nodes run each dataplane mode "
                           "(kubenode_dataplane_info): a migration from IPVS to nftables shows both.",
                           f"count by (mode) (kubenode_dataplane_info{{{j}}})", span=6, legend="{{mode}}",
                           text_mode=cm.BigValueTextMode.VALUE_AND_NAME, steps=[(None, "blue")],
                           no_value="unknown (no kubenode_dataplane_info)"))
    d = d.with_panel(_stat(ids, "Nodes with dataplane drift", "Nodes with any drifted item but draining ones, "
                           "in any proxy mode.",
                           f"count(sum by ({node}) (node:kubenode_dataplane_drift:sum{{{j}}}) > 0) or vector(0)",
                           span=5, steps=[(None, "green"), (1, "red")]))
    d = d.with_panel(_stat(ids, "Firing kubenode alerts", "Alerts of this bundle firing now.",
                           'count(ALERTS{alertname=~"KubeNode.*", alertstate="firing"}) or vector(0)',
                           span=5, steps=[(None, "green"), (1, "orange")]))

    d = d.with_row(db.Row("Worst nodes").id(ids.id()))
    d = d.with_panel(_bars(ids, "Dataplane drift items", "Drifted items per node, all kinds but draining, "
                           "any proxy mode.",
                           f"sort_desc(sum by ({node}) (node:kubenode_dataplane_drift:sum{{{j}}}))",
                           f"{{{{{node}}}}}", link=to_node, unit="short", steps=[(None, "green"), (1, "red")]))
    d = d.with_panel(_bars(ids, "Oldest drift", "Age of the oldest drifted item per node, all kinds but draining.",
                           f'sort_desc(max by ({node}) (kubenode_dataplane_drift_oldest_seconds{{{j}, kind!="draining_real_server"}}))',
                           f"{{{{{node}}}}}", link=to_node, unit="s", steps=[(None, "green"), (120, "orange"), (600, "red")]))
    d = d.with_panel(_bars(ids, "Network programming latency p99", "Over the last 5 minutes.",
                           f"sort_desc(max by ({node}) (node:kubenode_dataplane_programming_latency_seconds:p99_rate5m{{{j}}}))",
                           f"{{{{{node}}}}}", link=to_node, unit="s", steps=[(None, "green"), (10, "orange"), (30, "red")]))
    d = d.with_panel(_bars(ids, "Fullest ipset", "Fill of the fullest set on each node.",
                           f"sort_desc(max by ({node}) (set:kubenode_ipset_fill:ratio{{{j}}}))",
                           f"{{{{{node}}}}}", link=to_node, unit="percentunit", maximum=1,
                           steps=[(None, "green"), (0.8, "orange"), (1, "red")]))
    d = d.with_panel(_bars(ids, "Proxy sync p99", "The proxy's own sync duration, last 10 minutes.",
                           f"sort_desc(max by ({node}) (proxy:kubenode_proxy_sync_duration_seconds:p99_rate10m{{{j}}}))",
                           f"{{{{{node}}}}}", link=to_node, unit="s", steps=[(None, "green"), (5, "orange"), (10, "red")]))
    d = d.with_panel(_bars(ids, "Proxy CPU (own + children)", "Cores, last 5 minutes.",
                           f'sort_desc(sum by ({node}) (component:kubenode_process_cpu_seconds:rate5m{{{j}, component=~"{proxies}"}}) '
                           f'+ sum by ({node}) (component:kubenode_process_children_cpu_seconds:rate5m{{{j}, component=~"{proxies}"}}))',
                           f"{{{{{node}}}}}", link=to_node, unit="short", steps=[(None, "green"), (0.5, "orange"), (0.8, "red")]))
    d = d.with_panel(_bars(ids, "kubelet CPU (own + children)", "Cores, last 5 minutes.",
                           f'sort_desc(sum by ({node}) (component:kubenode_process_cpu_seconds:rate5m{{{j}, component="{kubelet}"}}) '
                           f'+ sum by ({node}) (component:kubenode_process_children_cpu_seconds:rate5m{{{j}, component="{kubelet}"}}))',
                           f"{{{{{node}}}}}", link=to_node, unit="short", steps=[(None, "green"), (0.5, "orange"), (0.8, "red")]))
    d = d.with_panel(_bars(ids, "Slowest memory.stat read", "Per node, the slowest timed read.",
                           f"sort_desc(max by ({node}) (node:kubenode_memcg_stat_read_seconds:max{{{j}}}))",
                           f"{{{{{node}}}}}", link=to_node, unit="s", steps=[(None, "green"), (0.1, "orange"), (1, "red")]))
    d = d.with_panel(_bars(ids, "Dying memory cgroups", "Per node.",
                           f'sort_desc(sum by ({node}) (kubenode_memcg_cgroups{{{j}, state="dying"}}))',
                           f"{{{{{node}}}}}", link=to_node, unit="short", steps=[(None, "green"), (2000, "orange"), (10000, "red")]))

    d = d.with_row(db.Row("Trends").id(ids.id()))
    d = d.with_panel(_graph(ids, "Dataplane drift, five worst nodes", "Drifted items over time, any proxy mode.",
                            [_query(f"topk(5, sum by ({node}) (node:kubenode_dataplane_drift:sum{{{j}}}))",
                                    f"{{{{{node}}}}}")], "short"))
    d = d.with_panel(_table(ids, "Failing collectors", "Collectors failing now, and on how many nodes.",
                            f"count by (collector) (kubenode_collector_success{{{j}}} == 0)"))

    # What the exporter itself costs each node, from its own process_* series (one series per
    # node: cheap enough without a recording rule). Thresholds are shares of the limits in
    # deploy/base/daemonset.yaml (500m CPU, 256Mi memory).
    d = d.with_row(db.Row("Exporter cost").id(ids.id()))
    d = d.with_panel(_bars(ids, "Exporter CPU, worst nodes", "Cores the exporter uses, last 5 minutes (limit 0.5).",
                           f"sort_desc(sum by ({node}) (rate(process_cpu_seconds_total{{{j}}}[5m])))",
                           f"{{{{{node}}}}}", link=to_node, unit="short",
                           steps=[(None, "green"), (0.25, "orange"), (0.4, "red")]))
    d = d.with_panel(_bars(ids, "Exporter memory, worst nodes", "Resident memory of the exporter (limit 256 MiB).",
                           f"sort_desc(max by ({node}) (process_resident_memory_bytes{{{j}}}))",
                           f"{{{{{node}}}}}", link=to_node, unit="bytes",
                           steps=[(None, "green"), (192 * 2**20, "orange"), (240 * 2**20, "red")]))
    d = d.with_panel(_bars(ids, "Exporter open fds, worst nodes", "Open file descriptors as a share of the limit.",
                           f"sort_desc(max by ({node}) (process_open_fds{{{j}}} / process_max_fds{{{j}}}))",
                           f"{{{{{node}}}}}", link=to_node, unit="percentunit", maximum=1,
                           steps=[(None, "green"), (0.5, "orange"), (0.8, "red")]))
    d = d.with_panel(_graph(ids, "Exporter CPU over time, five heaviest nodes", "Cores.",
                            [_query(f"topk(5, sum by ({node}) (rate(process_cpu_seconds_total{{{j}}}[$__rate_interval])))",
                                    f"{{{{{node}}}}}")], "short", span=8))
    d = d.with_panel(_table(ids, "Exporter versions", "Nodes running each build: a rollout in progress shows two.",
                            f"count by (version, python_version) (kubenode_exporter_build_info{{{j}}})",
                            span=4, sort_field="version"))
    return d


def dashboards(cfg: dict) -> dict[str, dict[str, Any]]:
    """{file name: dashboard JSON model} as plain data."""
    out = {}
    for name, builder in (("kubenode-node.json", node_dashboard), ("kubenode-cluster.json", cluster_dashboard)):
        out[name] = json.loads(json.dumps(builder(cfg).build(), cls=JSONEncoder))
    return out


def panel_queries(model: dict) -> Iterator[tuple[str, str, bool]]:
    """(panel title, expr, instant) for every target of every panel, rows included, and the
    annotation queries (title "annotation: <name>")."""
    for annotation in model.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            yield f"annotation: {annotation['name']}", annotation["expr"], False
    for panel in model.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets") or []:
                yield inner["title"], target["expr"], bool(target.get("instant"))
