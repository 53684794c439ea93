"""The drift collector wired as `serve` wires it, for tests on the host and in the VM.

The real production client talks to the API stand-in (tests/apiserver.py), the
real Runner runs every enabled collector, the real HTTP server serves /metrics,
and each check is a scrape over HTTP. On the host the live table is a fixture
procfs whose net/ip_vs the test writes in the kernel's text format; in the VM
it is the real /proc.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from exporter.cli import settings_from_args
from exporter.collector import Context, Runner, build_collectors
from exporter.collectors.drift import KUBE_SERVICE, KubeAccess
from exporter.collectors.ipvs import SCRAPE_WINDOW
from exporter.dataplane import Table
from exporter.http import MetricsServer, make_app
from exporter.paths import Paths
from exporter.readers.ipvs import kernel_hz
from tests import apiserver as api_objects
from tests.helpers import get, samples, value
from tests.ipvs_text import format_ip_vs

NAMESPACE = "drift"
NODE = "node-drift"
NODE_IP = "192.0.2.10"
KINDS = ("missing_virtual_server", "stale_virtual_server", "missing_real_server", "stale_real_server",
         "zero_weight_real_server", "draining_real_server")  # IPVS's; rejected_virtual_server is the rules modes'
RULES_KINDS = KINDS + ("rejected_virtual_server",)  # nftables and iptables modes


def rules_drift(s: dict) -> dict[str, float | None]:
    """``kubenode_dataplane_drift`` of every kind of the nftables/iptables modes, from one scrape."""
    return {k: value(s, "kubenode_dataplane_drift", kind=k) for k in RULES_KINDS}


def rules_no_drift(s: dict) -> bool:
    return value(s, "kubenode_collector_success", collector="drift") == 1 and \
        rules_drift(s) == dict.fromkeys(RULES_KINDS, 0.0)


def services_drifted(s: dict) -> dict[tuple[str, str], float]:
    """(service, kind) -> value of ``kubenode_dataplane_service_drift``."""
    return {(dict(labels)["service"], dict(labels)["kind"]): v for (name, labels), v in s.items()
            if name == "kubenode_dataplane_service_drift"}



def rfc3339(ts: float) -> str:
    """As the EndpointSlice controller stamps it (the store parses any precision)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 200}.{i % 200 + 1}"


def pod_ips(i: int, count: int, first: int = 1) -> list[str]:
    return [f"10.244.{i}.{first + j}" for j in range(count)]


def add_service(server, i: int, endpoints: int = 2, trigger: float | None = None, first: int = 1) -> None:
    name = f"svc-{i}"
    server.create("services", api_objects.service(NAMESPACE, name, cluster_ip(i)))
    set_endpoints(server, i, pod_ips(i, endpoints, first), trigger)


def set_endpoints(server, i: int, addresses: list[str], trigger: float | None = None) -> None:
    name = f"svc-{i}"
    server.create("endpointslices", api_objects.endpoint_slice(
        NAMESPACE, f"{name}-abcde", name, addresses, trigger_time=rfc3339(trigger) if trigger else None))


def copy_table(table) -> Table:
    return {k: vs._replace(real_servers=dict(vs.real_servers)) for k, vs in table.items()}


class DriftRig:
    """One exporter in-process: settings from flags, shared services, Runner, HTTP server."""

    def __init__(self, tmp_path: Path, kubeconfig: str | None, *, procfs: str | None = None,
                 grace: float = 1.0, follow: float = 0.1, extra: tuple[str, ...] = (),
                 store_options: dict | None = None, mode: str = "ipvs", kube_mode: str | None = None) -> None:
        self.procfs = Path(procfs) if procfs else tmp_path / f"proc-drift-{os.getpid()}"
        if procfs is None:
            (self.procfs / "net").mkdir(parents=True, exist_ok=True)
        argv = ["--node-name", NODE, "--node-ip", NODE_IP, "--path.procfs", str(self.procfs),
                "--drift.grace-period", str(grace), "--drift.follow-interval", str(follow),
                "--no-collector.proxy", "--proxy-mode", mode, *extra]
        if kubeconfig:
            argv += ["--kubeconfig", kubeconfig]
        self.settings = settings_from_args(argv)
        self.ctx = Context(settings=self.settings, paths=Paths(self.settings["path.procfs"], "/sys"))
        # Shorter reconnect and "down" times than production, so a test sees them in seconds.
        options = {"backoff_base": 0.05, "backoff_cap": 0.3, "down_after": 0.5}
        options.update(store_options or {})
        if kubeconfig:
            # With --proxy-mode auto, ``kube_mode``: the mode the test's node starts in.
            self.ctx.service(KUBE_SERVICE, lambda: KubeAccess(self.settings, kube_mode or mode, **options))
        self.runner = Runner(build_collectors(self.ctx))
        self.server = MetricsServer(make_app(self.runner), "127.0.0.1:0")
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}/metrics"

    @property
    def store(self):
        return self.ctx.services[KUBE_SERVICE].store

    def wait_synced(self, timeout: float = 15.0) -> None:
        assert self.store.wait_synced(timeout), f"store not synced: {self.store.watch_status()}"

    def desired(self) -> Table:
        return copy_table(self.store.snapshot().table)

    def write_table(self, table, connections=None) -> None:
        """Replace net/ip_vs at once, as the kernel's text (a reader never sees half a file)."""
        path = self.procfs / "net" / "ip_vs"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(format_ip_vs(table, kernel_hz(), connections))
        os.replace(tmp, path)
        # Past the shared IPVSReader's reuse window, so the next scrape reads this file.
        time.sleep(SCRAPE_WINDOW + 0.05)

    def scrape(self) -> dict:
        status, _, body = get(self.url)
        assert status == 200, body
        return samples(body.decode())

    def close(self) -> None:
        self.server.stop()
        self.runner.close()
        self.ctx.close()


def drift(s: dict, kind: str) -> float | None:
    return value(s, "kubenode_dataplane_drift", kind=kind)


def drifted_services(s: dict) -> dict[tuple[str, str, str], float]:
    return {tuple(dict(labels)[k] for k in ("namespace", "service", "kind")): v
            for (name, labels), v in s.items() if name == "kubenode_dataplane_service_drift"}


def wait_until(condition, timeout: float = 10.0, what: str = "condition", step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
