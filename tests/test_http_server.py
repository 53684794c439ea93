"""The HTTP server over real sockets: the name[] filter, Prometheus 3's Accept header, and a
server that holds up (listen backlog, silent and slow clients, connection bound, HEAD,
malformed request lines)."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.parse

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from exporter.collector import Collector, CollectorError, Runner
from exporter.http import MetricsServer, make_app
from tests.helpers import get, samples


class _Families(Collector):
    """A collector of fixed families, without settings (the Runner needs only name and collect)."""

    def __init__(self, name: str, families, error: str = "") -> None:  # noqa: D107 - no ctx needed
        self.name, self.families, self.error = name, families, error

    def collect(self):
        yield from self.families
        if self.error:
            raise CollectorError(self.error)


def _runner() -> Runner:
    entries = GaugeMetricFamily("kubenode_ipset_entries", "Entries.", labels=["set", "type"])
    entries.add_metric(["KUBE-CLUSTER-IP", "hash:ip,port"], 12)
    sets = GaugeMetricFamily("kubenode_ipset_sets", "Sets.", value=3)
    sync = HistogramMetricFamily("kubenode_proxy_sync_duration_seconds", "Sync.", labels=["proxy"])
    sync.add_metric(["kube-proxy"], [("0.1", 2), ("+Inf", 3)], 0.5)
    cpu = CounterMetricFamily("kubenode_process_cpu_seconds", "CPU.", labels=["component"])
    cpu.add_metric(["kubelet"], 7.5)
    return Runner([_Families("ipset", [entries, sets]), _Families("proxy", [sync]),
                   _Families("process", [cpu], error="no kubelet")])


@pytest.fixture
def server():
    servers = []

    def start(app=None, **kwargs) -> MetricsServer:
        srv = MetricsServer(app or make_app(_runner()), "127.0.0.1:0", **kwargs)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def _names(body: bytes) -> set[str]:
    return {name for name, _ in samples(body.decode())}


# -- item 5: name[] ---------------------------------------------------------------------

def _filtered(srv: MetricsServer, *names: str, headers: dict | None = None) -> bytes:
    query = urllib.parse.urlencode([("name[]", n) for n in names])
    status, _, body = get(f"http://127.0.0.1:{srv.port}/metrics?{query}", headers)
    assert status == 200
    return body


def test_name_filter_returns_the_named_families(server):
    srv = server()
    assert _names(_filtered(srv, "kubenode_ipset_entries")) == {"kubenode_ipset_entries"}
    # The runner's own families are filterable too, and keep every collector's series.
    body = _filtered(srv, "kubenode_collector_success", "kubenode_ipset_sets")
    assert _names(body) == {"kubenode_collector_success", "kubenode_ipset_sets"}
    s = samples(body.decode())
    assert s[("kubenode_collector_success", (("collector", "process"),))] == 0.0
    assert s[("kubenode_collector_success", (("collector", "ipset"),))] == 1.0
    # A histogram or a counter asked by its family name comes whole ...
    body = _filtered(srv, "kubenode_proxy_sync_duration_seconds", "kubenode_process_cpu_seconds")
    assert _names(body) == {"kubenode_proxy_sync_duration_seconds_bucket",
                            "kubenode_proxy_sync_duration_seconds_sum",
                            "kubenode_proxy_sync_duration_seconds_count",
                            "kubenode_process_cpu_seconds_total"}
    assert b"# TYPE kubenode_proxy_sync_duration_seconds histogram" in body
    # ... and asked by a sample name (client_python's reading), just those samples.
    assert _names(_filtered(srv, "kubenode_proxy_sync_duration_seconds_count")) == {
        "kubenode_proxy_sync_duration_seconds_count"}
    # In OpenMetrics too; a name nothing has gives an empty but valid page.
    body = _filtered(srv, "kubenode_ipset_sets", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert body.endswith(b"# EOF\n") and _names(body.replace(b"# EOF\n", b"")) == {"kubenode_ipset_sets"}
    assert _filtered(srv, "no_such_metric") == b""
    # Without the filter, everything.
    assert _names(get(f"http://127.0.0.1:{srv.port}/metrics")[2]) == {
        "kubenode_ipset_entries", "kubenode_ipset_sets", "kubenode_process_cpu_seconds_total",
        "kubenode_proxy_sync_duration_seconds_bucket", "kubenode_proxy_sync_duration_seconds_sum",
        "kubenode_proxy_sync_duration_seconds_count", "kubenode_collector_success",
        "kubenode_collector_duration_seconds"}
