"""Inside the VM (real IPVS): drift and programming latency against a proxy stand-in.

The proxy stand-in watches the API stand-in with its own client and store, and
after ``delay`` seconds programs what changed with ``ipvsadm -R``, remembering
what it programmed (it never re-reads the kernel, so faults injected behind its
back stay, as with a hung kube-proxy). The exporter runs as `serve` runs it
(real Runner, real HTTP server, /proc and netlink of this kernel); every check
is a scrape.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from exporter.dataplane import VirtualServerKey
from exporter.kube.client import ApiClient
from exporter.kube.store import KubeStore
from tests import apiserver as api_objects
from tests.apiserver import FakeApiServer
from tests.drift_rig import (KINDS, NAMESPACE, NODE, NODE_IP, DriftRig, add_service, cluster_ip, drift,
                             drifted_services, set_endpoints, wait_until)
from tests.helpers import value
from tests.kernel import ipvs_tables

SERVICES = 20
GRACE = 3.0
FOLLOW = 0.2


def _target(key: VirtualServerKey) -> str:
    flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[key.protocol]
    host = f"[{key.address}]" if ":" in key.address else key.address
    return f"{flag} {host}:{key.port}"


def _real(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class ProxyStandIn:
    """Programs IPVS from the Services and EndpointSlices, ``delay`` seconds after each change."""

    def __init__(self, kubeconfig: str, delay: float) -> None:
        self.delay = delay
        self.store = KubeStore(ApiClient.from_settings(kubeconfig), NODE, "kube-proxy", [NODE_IP],
                               backoff_base=0.05, backoff_cap=0.3)
        self.programmed: dict = {}
        self.generation = -1
        self.syncs: list[tuple[int, float]] = []  # (generation programmed, time.time() when done)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proxy-standin", daemon=True)

    def start(self) -> "ProxyStandIn":
        self.store.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.store.stop()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            snap = self.store.snapshot()
            if not snap.synced or snap.generation == self.generation:
                continue
            if self._stop.wait(self.delay):  # the proxy's delay: a sync that comes late
                return
            snap = self.store.snapshot()  # what it programs is what it sees now
            try:
                self._program(snap.table)
            except Exception as err:  # noqa: BLE001 - reported by the test, not fatal to the thread
                self.errors.append(str(err))
            self.generation = snap.generation
            self.syncs.append((snap.generation, time.time()))

    def _program(self, table) -> None:
        lines = []
        for key, old in self.programmed.items():
            if key not in table:
                lines.append(f"-D {_target(key)}")
        for key, want in table.items():
            old = self.programmed.get(key)
            persist = f" -p {want.persistent_timeout}" if want.persistent_timeout else ""
            if old is None:
                lines.append(f"-A {_target(key)} -s {want.scheduler}{persist}")
                old_reals = {}
            else:
                old_reals = old.real_servers
            for rkey, rs in want.real_servers.items():
                if rkey not in old_reals:
                    lines.append(f"-a {_target(key)} -r {_real(*rkey)} -m -w {rs.weight}")
            for rkey in old_reals:
                if rkey not in want.real_servers:
                    lines.append(f"-d {_target(key)} -r {_real(*rkey)}")
        if lines:
            ipvs_tables.restore(lines)
        self.programmed = {k: v for k, v in table.items()}

    def wait_programmed(self, generation: int, timeout: float = 20.0) -> float:
        """When (time.time()) the stand-in finished programming ``generation`` or later."""
        found = wait_until(lambda: next((t for g, t in self.syncs if g >= generation), None),
                           timeout, f"proxy stand-in at generation {generation}")
        return found


@pytest.fixture
def world(tmp_path):
    ipvs_tables.load_modules()
    ipvs_tables.clear()
    server = FakeApiServer().start()
    server.create("nodes", api_objects.node(NODE, zone="zone-a"))
    for i in range(1, SERVICES + 1):
        add_service(server, i, endpoints=3)
    kubeconfig = server.write_kubeconfig(str(tmp_path / f"kubeconfig-drift-vm-{os.getpid()}"))
    proxy = ProxyStandIn(kubeconfig, delay=0.5).start()
    rig = DriftRig(tmp_path, kubeconfig, procfs="/proc", grace=GRACE, follow=FOLLOW,
                   extra=("--drift.stuck-draining-after", "2"))
    try:
        rig.wait_synced(30)
        proxy.wait_programmed(rig.store.snapshot().generation)
        yield server, proxy, rig
    finally:
        rig.close()
        proxy.stop()
        server.stop()
        ipvs_tables.clear()
    assert not proxy.errors, proxy.errors


def scrape_fresh(rig: DriftRig) -> dict:
    time.sleep(0.55)  # past the shared table's reuse window
    return rig.scrape()


def test_faults_behind_the_proxy_are_reported_with_kind_and_service_after_grace(world):
    server, proxy, rig = world
    s = scrape_fresh(rig)
    assert value(s, "kubenode_collector_success", collector="drift") == 1, s
    assert value(s, "kubenode_dataplane_desired_virtual_servers") == SERVICES
    assert value(s, "kubenode_dataplane_desired_real_servers") == 3 * SERVICES
    assert value(s, "kubenode_ipvs_virtual_servers") == SERVICES
    assert all(drift(s, k) == 0 for k in KINDS) and drifted_services(s) == {}

    vip = {i: f"-t {cluster_ip(i)}:80" for i in range(1, SERVICES + 1)}
    ipvs_tables.restore([
        f"-a {vip[1]} -r 10.244.1.99:8080 -m -w 1",   # stale real server (a gone endpoint still served)
        f"-D {vip[2]}",                                 # missing virtual server
        f"-e {vip[3]} -r 10.244.3.1:8080 -m -w 0",    # a ready endpoint at weight 0
        f"-a {vip[4]} -r 10.244.4.99:8080 -m -w 0",   # left at weight 0, no connections
    ])
    s = scrape_fresh(rig)
    first_seen_by = time.monotonic()  # the scrape that first saw the faults ended by now
    assert all(drift(s, k) == 0 for k in KINDS), "within grace nothing counts"
    assert sum(value(s, "kubenode_dataplane_drift_pending", kind=k) for k in KINDS) == 4
    time.sleep(max(0.0, GRACE - (time.monotonic() - first_seen_by)))
    s = rig.scrape()  # the first scrape after the grace period
    assert drifted_services(s) == {
        (NAMESPACE, "svc-1", "stale_real_server"): 1,
        (NAMESPACE, "svc-2", "missing_virtual_server"): 1,
        (NAMESPACE, "svc-3", "zero_weight_real_server"): 1,
        (NAMESPACE, "svc-4", "draining_real_server"): 1,
    }
    assert {k: drift(s, k) for k in KINDS} == {
        "missing_virtual_server": 1, "stale_virtual_server": 0, "missing_real_server": 0,
        "stale_real_server": 1, "zero_weight_real_server": 1, "draining_real_server": 1}
    # Idle at weight 0 past drift.stuck-draining-after: kubernetes issue 71071.
    assert value(s, "kubenode_ipvs_stuck_graceful_termination_real_servers") == 1


def test_churn_within_grace_raises_nothing_and_latency_matches_the_delays(world):
    server, proxy, rig = world
    base = scrape_fresh(rig)
    count0 = value(base, "kubenode_dataplane_programming_latency_seconds_count")
    sum0 = value(base, "kubenode_dataplane_programming_latency_seconds_sum")
    assert count0 == 0
    expected = []
    for n, delay in enumerate((0.5, 1.5, 2.5)):
        proxy.delay = delay
        i = n + 1
        trigger = time.time()
        generation = rig.store.snapshot().generation
        set_endpoints(server, i, [f"10.244.{i}.{10 * (n + 1) + j}" for j in range(3)], trigger)
        wait_until(lambda: rig.store.snapshot().generation > generation, what="change seen")
        # While the stand-in waits out its delay (< grace): no drift, only pending.
        s = rig.scrape()
        assert all(drift(s, k) == 0 for k in KINDS), s
        done = proxy.wait_programmed(generation + 1)
        s = wait_until(lambda: (lambda s: s if value(s, "kubenode_dataplane_programming_latency_seconds_count")
                                == count0 + n + 1 else None)(rig.scrape()), 15, "latency observed")
        total = value(s, "kubenode_dataplane_programming_latency_seconds_sum")
        observed = total - (sum0 if n == 0 else expected[-1][2])
        expected.append((delay, done - trigger, total))
        # From the trigger to IPVS matching: at least the injected delay, at most the
        # moment the stand-in finished plus one follow interval (and scheduling slack).
        print(f"latency: injected delay {delay:.2f} s, programmed {done - trigger:.3f} s after the trigger, "
              f"observed {observed:.3f} s")
        assert delay <= observed <= (done - trigger) + FOLLOW + 0.5, (delay, done - trigger, observed)
        s = scrape_fresh(rig)
        assert all(drift(s, k) == 0 for k in KINDS) and drifted_services(s) == {}
    s = rig.scrape()
    assert value(s, "kubenode_dataplane_programming_latency_seconds_bucket", le="0.25") == 0
    assert value(s, "kubenode_dataplane_programming_latency_seconds_bucket", le="+Inf") == 3
    assert value(s, "kubenode_dataplane_programming_latency_timeouts_total") == 0
