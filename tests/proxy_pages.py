"""Metrics pages as kube-proxy and kube-router print them, for the proxy collector's tests.

Written from their sources: kube-proxy's pkg/proxy/metrics/metrics.go as of
Kubernetes 1.36 (component-base metrics: "[ALPHA] " in HELP, an ``ip_family``
label on the sync families, network programming buckets from MergeBuckets with
its leading 0) and kube-router v2's pkg/metrics/metrics_controller.go
(client_golang histograms with the default buckets, per-service gauges labelled
svc_namespace/service_name/service_vip/protocol/port). Numbers are formatted
the way Go's expfmt does (strconv 'g', shortest), families sorted by name and
label pairs by label name, ``le`` last, as client_golang writes them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from decimal import Decimal

# client_golang's prometheus.DefBuckets (kube-router v2's histograms use them)
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# kube-proxy: ExponentialBuckets(0.001, 2, 15)
KUBE_PROXY_SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
# kube-proxy: MergeBuckets(Linear(0.25,0.25,2), Linear(1,1,59), Linear(60,5,12), Linear(120,30,7))
KUBE_PROXY_PROGRAMMING_BUCKETS = ((0.0, 0.25, 0.5) + tuple(float(i) for i in range(1, 60))
                                  + tuple(60.0 + 5 * i for i in range(12)) + tuple(120.0 + 30 * i for i in range(7)))
REST_CLIENT_DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
REST_CLIENT_SIZE_BUCKETS = (64, 256, 512, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


def go_float(value: float) -> str:
    """strconv.FormatFloat(v, 'g', -1, 64) as expfmt uses it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(float(value)))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # decimal point position
    exp = point - 1
    if exp < -4 or exp >= 6:  # shortest 'g' switches to an exponent at 1e6
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _labels(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), chr(92) + "n")}"'
                    for k, v in pairs)
    return "{" + body + "}"


class Page:
    """Accumulates families and prints them sorted by name, as Gather does."""

    def __init__(self) -> None:
        self.families: dict[str, list[str]] = {}

    def family(self, name: str, kind: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.families[name] = lines
        return lines

    def gauge(self, name: str, help_text: str, series: list[tuple[list[tuple[str, str]], float]],
              kind: str = "gauge") -> None:
        lines = self.family(name, kind, help_text)
        for labels, value in sorted(series, key=lambda s: [v for _, v in sorted(s[0])]):
            lines.append(f"{name}{_labels(sorted(labels))} {go_float(value)}")

    def histogram(self, name: str, help_text: str,
                  series: list[tuple[list[tuple[str, str]], tuple[float, ...], list[float]]]) -> None:
        """``series``: (labels, finite bucket bounds, observations); +Inf holds them all."""
        lines = self.family(name, "histogram", help_text)
        for labels, bounds, observations in sorted(series, key=lambda s: [v for _, v in sorted(s[0])]):
            labels = sorted(labels)
            ordered = sorted(observations)
            i = 0
            for bound in bounds:
                while i < len(ordered) and ordered[i] <= bound:
                    i += 1
                lines.append(f"{name}_bucket{_labels(labels + [('le', go_float(bound))])} {go_float(i)}")
            lines.append(f"{name}_bucket{_labels(labels + [('le', '+Inf')])} {go_float(len(ordered))}")
            lines.append(f"{name}_sum{_labels(labels)} {go_float(sum(ordered))}")
            lines.append(f"{name}_count{_labels(labels)} {go_float(len(ordered))}")

    def summary(self, name: str, help_text: str, quantiles: list[tuple[float, float]], total: float,
                count: int) -> None:
        lines = self.family(name, "summary", help_text)
        for q, v in quantiles:
            lines.append(f'{name}{{quantile="{go_float(q)}"}} {go_float(v)}')
        lines.append(f"{name}_sum {go_float(total)}")
        lines.append(f"{name}_count {count}")

    def text(self) -> str:
        return "".join("\n".join(self.families[n]) + "\n" for n in sorted(self.families))


def _go_runtime(page: Page, rng: random.Random, rich: bool) -> None:
    page.summary("go_gc_duration_seconds", "A summary of the wall-time pause (stop-the-world) duration in garbage "
                 "collection cycles.", [(0, 2.1e-05), (0.25, 4.3e-05), (0.5, 6.1e-05), (0.75, 9.8e-05),
                                        (1, 0.001843)], 0.734521, 9123)
    page.gauge("go_goroutines", "Number of goroutines that currently exist.", [([], 142)])
    page.gauge("go_info", "Information about the Go environment.", [([("version", "go1.24.9")], 1)])
    page.gauge("go_threads", "Number of OS threads created.", [([], 14)])
    memstats = ["alloc_bytes", "alloc_bytes_total", "buck_hash_sys_bytes", "frees_total", "gc_sys_bytes",
                "heap_alloc_bytes", "heap_idle_bytes", "heap_inuse_bytes", "heap_objects", "heap_released_bytes",
                "heap_sys_bytes", "last_gc_time_seconds", "mallocs_total", "mcache_inuse_bytes",
                "mcache_sys_bytes", "mspan_inuse_bytes", "mspan_sys_bytes", "next_gc_bytes", "other_sys_bytes",
                "stack_inuse_bytes", "stack_sys_bytes", "sys_bytes"]
    for m in memstats:
        kind = "counter" if m.endswith("_total") else "gauge"
        page.gauge(f"go_memstats_{m}", f"Go memstats {m.replace('_', ' ')}.", [([], rng.randint(10**4, 10**9))],
                   kind=kind)
    if rich:
        # client_golang's runtime/metrics collector as component-base enables it
        for cls in ("gc_mark_assist", "gc_mark_dedicated", "gc_mark_idle", "gc_pause", "gc_total", "idle",
                    "scavenge_assist", "scavenge_background", "scavenge_total", "total", "user"):
            page.gauge(f"go_cpu_classes_{cls}_cpu_seconds_total", f"Estimated total CPU time spent on {cls}.",
                       [([], rng.uniform(1, 5000))], kind="counter")
        pause_bounds = tuple(6.4e-08 * 2 ** i for i in range(40))
        page.histogram("go_sched_latencies_seconds", "Distribution of the time goroutines have spent in the "
                       "scheduler in a runnable state before actually running.",
                       [([], pause_bounds, [rng.expovariate(1e5) for _ in range(4000)])])
        page.histogram("go_gc_pauses_seconds", "Deprecated. Prefer the identical /sched/pauses/total/gc:seconds.",
                       [([], pause_bounds, [rng.expovariate(2e4) for _ in range(3000)])])


def _process(page: Page, rng: random.Random) -> None:
    page.gauge("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
               [([], 3712.45)], kind="counter")
    page.gauge("process_max_fds", "Maximum number of open file descriptors.", [([], 1048576)])
    page.gauge("process_open_fds", "Number of open file descriptors.", [([], 23)])
    page.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", [([], 61849600)])
    page.gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
               [([], 1763300000.12)])
    page.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", [([], 1351401472)])
    page.gauge("process_virtual_memory_max_bytes", "Maximum amount of virtual memory available in bytes.",
               [([], 1.8446744073709552e+19)])


@dataclass
class KubeProxyState:
    """What kube-proxy's sync families say; None leaves a family off the page."""

    now: float = 1763401234.5
    families: tuple[str, ...] = ("IPv4",)
    syncs: dict[str, list[float]] = field(default_factory=dict)  # ip_family -> observed durations
    last_sync: dict[str, float] | None = None
    last_queued: dict[str, float] | None = None
    programming: dict[str, list[float]] = field(default_factory=dict)
    endpoint_changes_pending: int | None = 0
    service_changes_pending: int | None = 0


def kube_proxy_state(now: float = 1763401234.5, dual_stack: bool = False, seed: int = 1) -> KubeProxyState:
    rng = random.Random(seed)
    fams = ("IPv4", "IPv6") if dual_stack else ("IPv4",)
    return KubeProxyState(
        now=now,
        families=fams,
        syncs={f: [rng.lognormvariate(-3.0, 1.0) for _ in range(2500)] + [20.0, 31.5] for f in fams},
        last_sync={f: now - 3.25 for f in fams},
        last_queued={f: now - 4.5 for f in fams},
        programming={f: [rng.lognormvariate(0.0, 1.0) for _ in range(6000)] + [400.0] for f in fams},
        endpoint_changes_pending=0,
        service_changes_pending=0,
    )


def kube_proxy_page(state: KubeProxyState, seed: int = 1, features: int = 260, api_hosts: int = 1) -> str:
    """kube-proxy 1.36, IPVS mode, as served on 127.0.0.1:10249/metrics.

    ``api_hosts`` > 1 adds client-go series for more API server addresses, to make the page larger.
    """
    rng = random.Random(seed)
    page = Page()
    _go_runtime(page, rng, rich=True)
    _process(page, rng)
    page.gauge("kubernetes_build_info", "[BETA] A metric with a constant '1' value labeled by major, minor, git "
               "version, git commit, git tree state, build date, Go version, and compiler from which Kubernetes "
               "was built, and platform on which it is running.",
               [([("build_date", "2026-11-12T10:11:12Z"), ("compiler", "gc"), ("git_commit", "0123456789abcdef"),
                  ("git_tree_state", "clean"), ("git_version", "v1.36.1"), ("go_version", "go1.24.9"),
                  ("major", "1"), ("minor", "36"), ("platform", "linux/amd64")], 1)])
    page.gauge("kubernetes_feature_enabled", "[BETA] This metric records the data about the stage and "
               "enablement of a k8s feature.",
               [([("name", f"SomeFeatureGateNumber{i:03d}"), ("stage", rng.choice(["ALPHA", "BETA", ""]))],
                 rng.choice([0, 1])) for i in range(features)])
    page.gauge("registered_metrics_total", "[BETA] The count of registered metrics broken by stability level "
               "and deprecation version.",
               [([("deprecated_version", ""), ("stability_level", s)], rng.randint(1, 80))
                for s in ("ALPHA", "BETA", "STABLE")], kind="counter")
    # client-go's view of the API server (host = the API server address)
    hosts = ["10.96.0.1:443"] + [f"192.168.{i // 250}.{i % 250 + 1}:6443" for i in range(api_hosts - 1)]
    verbs = ["GET", "LIST", "PATCH", "POST", "WATCH"]
    for name, bounds, help_text in (
        ("rest_client_request_duration_seconds", REST_CLIENT_DURATION_BUCKETS,
         "[ALPHA] Request latency in seconds. Broken down by verb, and host."),
        ("rest_client_rate_limiter_duration_seconds", REST_CLIENT_DURATION_BUCKETS,
         "[ALPHA] Client side rate limiter latency in seconds. Broken down by verb, and host."),
        ("rest_client_request_size_bytes", REST_CLIENT_SIZE_BUCKETS,
         "[ALPHA] Request size in bytes. Broken down by verb and host."),
        ("rest_client_response_size_bytes", REST_CLIENT_SIZE_BUCKETS,
         "[ALPHA] Response size in bytes. Broken down by verb and host."),
    ):
        series = []
        for host in hosts:
            for verb in verbs:
                scale = bounds[len(bounds) // 3]
                series.append(([("host", host), ("verb", verb)], bounds,
                               [rng.expovariate(1 / scale) for _ in range(rng.randint(5, 400))]))
        page.histogram(name, help_text, series)
    page.gauge("rest_client_requests_total", "[ALPHA] Number of HTTP requests, partitioned by status code, "
               "method, and host.",
               [([("code", c), ("host", h), ("method", m)], rng.randint(1, 90000))
                for h in hosts for m in ("GET", "PATCH", "POST") for c in ("200", "201", "404", "409")],
               kind="counter")
    page.gauge("rest_client_transport_cache_entries", "[ALPHA] Number of transport entries in the internal "
               "cache.", [([], 1)])
    page.gauge("kubeproxy_proxy_healthz_total", "[ALPHA] Cumulative proxy healthz HTTP status",
               [([("code", "200")], 51234), ([("code", "503")], 3)], kind="counter")
    page.gauge("kubeproxy_proxy_livez_total", "[ALPHA] Cumulative proxy livez HTTP status",
               [([("code", "200")], 51234)], kind="counter")
    page.gauge("kubeproxy_sync_proxy_rules_endpoint_changes_total", "[ALPHA] Cumulative proxy rules Endpoint "
               "changes", [([], 81234)], kind="counter")
    page.gauge("kubeproxy_sync_proxy_rules_service_changes_total", "[ALPHA] Cumulative proxy rules Service "
               "changes", [([], 4321)], kind="counter")
    page.gauge("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", "[ALPHA] Cumulative proxy iptables "
               "restore failures", [([("ip_family", f)], 0) for f in state.families], kind="counter")
    page.gauge("kubeproxy_sync_proxy_rules_no_local_endpoints_total", "[ALPHA] Number of services with a Local "
               "traffic policy and no endpoints",
               [([("ip_family", f), ("traffic_policy", t)], 0) for f in state.families
                for t in ("external", "internal")])
    # the families the collector carries
    if state.syncs:
        page.histogram("kubeproxy_sync_proxy_rules_duration_seconds", "[ALPHA] SyncProxyRules latency in seconds",
                       [([("ip_family", f)], KUBE_PROXY_SYNC_BUCKETS, obs) for f, obs in state.syncs.items()])
    if state.programming:
        page.histogram("kubeproxy_network_programming_duration_seconds", "[ALPHA] In Cluster Network Programming "
                       "Latency in seconds",
                       [([("ip_family", f)], KUBE_PROXY_PROGRAMMING_BUCKETS, obs)
                        for f, obs in state.programming.items()])
    if state.last_sync is not None:
        page.gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "[ALPHA] The last time proxy rules were "
                   "successfully synced", [([("ip_family", f)], t) for f, t in state.last_sync.items()])
    if state.last_queued is not None:
        page.gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "[ALPHA] The last time a sync of "
                   "proxy rules was queued", [([("ip_family", f)], t) for f, t in state.last_queued.items()])
    if state.endpoint_changes_pending is not None:
        page.gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "[ALPHA] Pending proxy rules Endpoint "
                   "changes", [([], state.endpoint_changes_pending)])
    if state.service_changes_pending is not None:
        page.gauge("kubeproxy_sync_proxy_rules_service_changes_pending", "[ALPHA] Pending proxy rules Service "
                   "changes", [([], state.service_changes_pending)])
    return page.text()


@dataclass
class KubeRouterState:
    syncs: list[float] = field(default_factory=list)
    ipvs_services: int = 0
    services: int = 0  # per-service traffic gauges, ten families each


def kube_router_state(syncs: int = 40, services: int = 50, seed: int = 2) -> KubeRouterState:
    rng = random.Random(seed)
    return KubeRouterState(syncs=[rng.lognormvariate(0.0, 1.2) for _ in range(syncs)],
                           ipvs_services=services * 2, services=services)


def kube_router_page(state: KubeRouterState, seed: int = 2, sync_family_type: str = "histogram") -> str:
    """kube-router v2 with --run-service-proxy --metrics-port, as its /metrics prints it."""
    rng = random.Random(seed)
    page = Page()
    _go_runtime(page, rng, rich=False)
    _process(page, rng)
    page.gauge("promhttp_metric_handler_requests_in_flight", "Current number of scrapes being served.", [([], 1)])
    page.gauge("promhttp_metric_handler_requests_total", "Total number of scrapes by HTTP status code.",
               [([("code", c)], n) for c, n in (("200", 812), ("500", 0), ("503", 0))], kind="counter")
    page.gauge("kube_router_build_info", "Expose version and other build information",
               [([("goversion", "go1.24.9"), ("version", "v2.6.2")], 1)])
    page.gauge("kube_router_controller_ipvs_services", "Number of ipvs services in the instance",
               [([], state.ipvs_services)])
    export_obs = [rng.expovariate(20) for _ in range(300)]
    page.histogram("kube_router_controller_ipvs_metrics_export_time", "Time it took to export metrics",
                   [([], GO_DEFAULT_BUCKETS, export_obs)])
    if sync_family_type == "histogram":
        page.histogram("kube_router_controller_ipvs_services_sync_time",
                       "Time it took for controller to sync ipvs services",
                       [([], GO_DEFAULT_BUCKETS, state.syncs)])
    else:  # kube-router before v1.0 had a gauge here
        page.gauge("kube_router_controller_ipvs_services_sync_time",
                   "Time it took for controller to sync ipvs services", [([], state.syncs[-1] if state.syncs else 0)])
    if state.services:
        rows = []
        for i in range(state.services):
            ns = f"team-{i % 37:02d}"
            vip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
            rows.append([("port", str(80 + i % 3)), ("protocol", "tcp"), ("service_name", f"svc-{i:05d}"),
                         ("service_vip", vip), ("svc_namespace", ns)])
        for metric, help_text in (("bps_in", "Incoming bytes per second"), ("bps_out", "Outgoing bytes per second"),
                                  ("bytes_in", "Total incoming bytes"), ("bytes_out", "Total outgoing bytes"),
                                  ("cps", "Service connections per second"), ("packets_in", "Total incoming packets"),
                                  ("packets_out", "Total outgoing packets"),
                                  ("pps_in", "Incoming packets per second"),
                                  ("pps_out", "Outgoing packets per second"),
                                  ("total_connections", "Total incoming connections made")):
            page.gauge(f"kube_router_service_{metric}", help_text,
                       [(labels, rng.randint(0, 10**9)) for labels in rows])
    return page.text()


def node_exporter_page(seed: int = 3, cpus: int = 4) -> str:
    """Another program's page on the proxy's port: node_exporter 1.x with its default collectors, in short.

    A valid metrics page with none of either proxy's families, so only "is the
    sync histogram there?" tells it from a proxy's own page.
    """
    rng = random.Random(seed)
    page = Page()
    _go_runtime(page, rng, rich=False)
    _process(page, rng)
    page.gauge("node_exporter_build_info", "A metric with a constant '1' value labeled by version, revision, branch, "
               "goversion from which node_exporter was built, and the goos and goarch for the build.",
               [([("branch", "HEAD"), ("goarch", "amd64"), ("goos", "linux"), ("goversion", "go1.23.4"),
                  ("revision", "0123456789abcdef"), ("tags", "unknown"), ("version", "1.9.0")], 1)])
    page.gauge("node_cpu_seconds_total", "Seconds the CPUs spent in each mode.",
               [([("cpu", str(c)), ("mode", m)], rng.uniform(10, 10**6))
                for c in range(cpus) for m in ("idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user")],
               kind="counter")
    for name in ("load1", "load5", "load15"):
        page.gauge(f"node_{name}", f"{name[:4].capitalize()} average over {name[4:]} minutes.",
                   [([], rng.uniform(0, 8))])
    page.gauge("node_ipvs_connections_total", "The total number of connections made.", [([], 123456)],
               kind="counter")
    page.gauge("node_scrape_collector_duration_seconds", "node_exporter: Duration of a collector scrape.",
               [([("collector", c)], rng.uniform(0, 0.05)) for c in ("cpu", "ipvs", "loadavg")])
    page.gauge("node_scrape_collector_success", "node_exporter: Whether a collector succeeded.",
               [([("collector", c)], 1) for c in ("cpu", "ipvs", "loadavg")])
    return page.text()


def old_kube_proxy_page(seed: int = 4) -> str:
    """kube-proxy 1.13 and older: its sync histogram in microseconds under another name (since renamed)."""
    rng = random.Random(seed)
    page = Page()
    _go_runtime(page, rng, rich=False)
    _process(page, rng)
    page.histogram("kubeproxy_sync_proxy_rules_latency_microseconds", "SyncProxyRules latency",
                   [([], tuple(1000 * 2 ** i for i in range(15)), [rng.lognormvariate(10, 1) for _ in range(300)])])
    return page.text()
