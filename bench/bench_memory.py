"""The whole exporter's memory at 1,000 and 10,000 Services, against the issue's 80 MB.

A fresh ``python -m exporter`` (the real ``serve``, every default collector on)
lists and watches the API stand-in (tests/apiserver.py) serving N Services with
one EndpointSlice of 5 endpoints each (bench_kube's cluster: 10,000 Services are
50,000 endpoints), and reads a live IPVS table from a fixture procfs
(``--path.procfs``): the desired table of the same objects written as
/proc/net/ip_vs text, as bench_drift does, so the drift collector diffs a full
live table. Once its drift collector reports success with the table synced, the
exporter is scraped a few times more, then its own /proc/PID/status is read:

- peak RSS (VmHWM): the list, the build and every scrape's read included;
- steady RSS (VmRSS) after those scrapes.

Both are printed against 80 MB (10^6 bytes: stricter than MiB), the issue's limit
for the whole exporter synced at 10,000 Services / 50,000 endpoints with the live
table read. The 1,000-Service row shows how the cost grows.

nftables mode (``serve`` cannot be told the mode yet, so not the whole exporter):
a fresh process syncs the store in nftables mode against the stand-in serving
the same Services as kube-proxy's rules loaded into a namespace of its own
(tests/nft_rulesets.py), reads them once with the nftables reader (a thread that
joined the namespace) and keeps both tables, as the drift collector would; its
peak and steady RSS are printed against the same 80 MB.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.bench_kube import _populate
from bench.common import Row, main

LIMIT_MB = 80.0
NODE_NAME, NODE_IP = "bench-node", "192.0.2.10"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Recorder:
    """Stands in for the API server in ``_populate`` to keep the raw objects."""

    def __init__(self, server) -> None:
        self.server = server
        self.items: dict[str, list[dict]] = {}

    def create(self, resource: str, obj: dict) -> None:
        self.items.setdefault(resource, []).append(obj)
        self.server.create(resource, obj)


def _desired_ip_vs(items: dict[str, list[dict]]) -> str:
    """What a healthy node's /proc/net/ip_vs shows for these objects (the exporter's own model)."""
    from exporter.kube import desired, objects
    from exporter.readers.ipvs import kernel_hz
    from tests.ipvs_text import format_ip_vs

    services = [objects.parse_service(o) for o in items["services"]]
    slices = [objects.parse_endpoint_slice(o) for o in items["endpointslices"]]
    node = objects.parse_node(items["nodes"][0])
    facts = desired.node_facts(NODE_NAME, node, (NODE_IP,))
    table = desired.desired_table(services, desired.slices_by_service(slices), facts)
    return format_ip_vs(table, kernel_hz())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field}")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def _value(page: str, pattern: str) -> float | None:
    match = re.search(r"^" + pattern + r" (\S+)$", page, re.M)
    return float(match.group(1)) if match else None


def measure(services: int, scrapes: int = 3, timeout: float = 300.0) -> dict:
    from tests.apiserver import FakeApiServer

    server = FakeApiServer().start()
    proc = None
    try:
        recorder = _Recorder(server)
        _populate(recorder, services)
        with tempfile.TemporaryDirectory(prefix=f"bench-memory-{os.getpid()}-") as tmp:
            kubeconfig = server.write_kubeconfig(os.path.join(tmp, "kubeconfig"))
            procfs = os.path.join(tmp, "proc")
            os.makedirs(os.path.join(procfs, "net"))
            with open(os.path.join(procfs, "net", "ip_vs"), "w") as fh:
                fh.write(_desired_ip_vs(recorder.items))
            del recorder
            port = _free_port()
            cmd = [sys.executable, "-m", "exporter", "serve", "--kubeconfig", kubeconfig,
                   "--node-name", NODE_NAME, "--node-ip", NODE_IP, "--path.procfs", procfs, "--proxy-mode", "ipvs",
                   "--web.listen-address", f"127.0.0.1:{port}"]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + timeout
            start = time.monotonic()
            page = ""
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise SystemExit(f"the exporter exited {proc.returncode}: {proc.stderr.read()[-300:]}")
                try:
                    page = _scrape(url)
                except OSError:
                    page = ""
                if (_value(page, r'kubenode_collector_success\{collector="drift"\}') == 1
                        and _value(page, "kubenode_dataplane_drift_synced") == 1):
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"the exporter did not sync {services} Services within {timeout:.0f} s")
            synced_after = time.monotonic() - start
            for _ in range(scrapes):
                page = _scrape(url)
            desired_vs = _value(page, "kubenode_dataplane_desired_virtual_servers")
            live_vs = _value(page, "kubenode_ipvs_virtual_servers")
            drift = sum(float(v) for v in re.findall(r'^kubenode_dataplane_drift\{kind="[a-z_]+"\} (\S+)$', page, re.M))
            if not desired_vs or desired_vs != live_vs or drift:
                raise SystemExit(f"the exporter's tables differ (desired {desired_vs}, live {live_vs}, "
                                 f"drift {drift}): the bench would not measure a full read")
            return {"services": services, "virtual_servers": desired_vs, "synced_after": synced_after,
                    "peak": _status_kib(proc.pid, "VmHWM") * 1024, "steady": _status_kib(proc.pid, "VmRSS") * 1024}
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()


def _nft_objects(services) -> dict[str, list[dict]]:
    """The API objects of ``tests.nft_rulesets`` Services (one port, one slice each)."""
    from tests.apiserver import endpoint_slice, node, service

    items: dict[str, list[dict]] = {"nodes": [node(NODE_NAME, zone="zone-a", addresses=(NODE_IP,))],
                                    "services": [], "endpointslices": []}
    for svc in services:
        extra = {"type": "NodePort"} if svc.node_port else {}
        raw = service(svc.namespace, svc.name, svc.cluster_ip, ports=((svc.port_name, "TCP", svc.port),), **extra)
        if svc.node_port:
            raw["spec"]["ports"][0]["nodePort"] = svc.node_port
        items["services"].append(raw)
        items["endpointslices"].append(endpoint_slice(
            svc.namespace, f"{svc.name}-abcde", svc.name, [a for a, _ in svc.endpoints],
            ports=((svc.port_name, "TCP", svc.endpoints[0][1]),), node_name="node-1"))
    return items


def _nft_child(kubeconfig: str, netns: str) -> None:
    """Runs in the child: the store in nftables mode synced, one live read kept; one JSON line."""
    import gc
    import json
    import threading

    from exporter.kube.client import ApiClient
    from exporter.kube.desired_rules import rules_view
    from exporter.kube.store import KubeStore
    from exporter.readers.nftables import NftablesReader
    from tests.ipset_ns import setns

    store = KubeStore(ApiClient.from_settings(kubeconfig), NODE_NAME, node_ips=(NODE_IP,), mode="nftables")
    store.start()
    if not store.wait_synced(600):
        raise SystemExit("the store did not sync")
    reader = NftablesReader()
    reads: list = []

    def read() -> None:
        setns(netns)
        reads.append(reader.read())

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    if not reads:
        raise SystemExit("the nftables read failed")
    live = reads[0]
    desired = rules_view(store.snapshot().table.values())
    gc.collect()
    differ = sum(1 for key, vs in desired.table.items() if live.table.get(key) != vs)
    print(json.dumps({"desired": len(desired.table), "live": len(live.table), "unread": len(live.unread),
                      "differ": differ,
                      "peak": _status_kib(os.getpid(), "VmHWM") * 1024,
                      "steady": _status_kib(os.getpid(), "VmRSS") * 1024}))
    store.stop()


def measure_nftables(services: int) -> dict:
    import json

    from tests.apiserver import FakeApiServer
    from tests.nft_rulesets import NftNS, bench_services, ruleset

    ports = bench_services(services, 5)
    server = FakeApiServer().start()
    try:
        for resource, objs in _nft_objects(ports).items():
            for obj in objs:
                server.create(resource, obj)
        with NftNS() as ns, tempfile.TemporaryDirectory(prefix=f"bench-memory-{os.getpid()}-") as tmp:
            ns.nft(ruleset(ports))
            kubeconfig = server.write_kubeconfig(os.path.join(tmp, "kubeconfig"))
            done = subprocess.run([sys.executable, "-m", "bench.bench_memory", "--nft-child", kubeconfig, ns.path],
                                  cwd=ROOT, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise SystemExit(f"nftables child failed: {done.stderr.strip().splitlines()[-1:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
    except RuntimeError as err:  # a missing tool, named
        raise SystemExit(str(err)) from None
    finally:
        server.stop()
    if result["unread"] or result["differ"] or result["desired"] != result["live"]:
        raise SystemExit(f"desired and live nftables tables differ ({result}): not a full read")
    return result


def run(args) -> list[Row]:
    rows = []
    sizes = (300, 1000) if getattr(args, "quick", False) else (1000, 10_000)
    for n in sizes:
        m = measure(n)
        label = f"{n:,} svc / {n * 5:,} endpoints, {m['virtual_servers']:,.0f} VS"
        rows += [
            Row(f"{label}: whole exporter, peak RSS", m["peak"] / 1e6, LIMIT_MB, "limit", unit="MB", limit=1.0),
            Row(f"{label}: whole exporter, steady RSS", m["steady"] / 1e6, LIMIT_MB, "limit", unit="MB",
                limit=1.0),
            Row(f"{label}: synced and drift served after", m["synced_after"]),
        ]
    for n in sizes:
        m = measure_nftables(n)
        label = f"{n:,} svc / {n * 5:,} endpoints, {m['live']:,} frontends"
        rows += [
            Row(f"{label}: store + nftables read, peak RSS", m["peak"] / 1e6, LIMIT_MB, "limit", unit="MB",
                limit=1.0),
            Row(f"{label}: store + nftables read, steady RSS", m["steady"] / 1e6, LIMIT_MB, "limit", unit="MB",
                limit=1.0),
        ]
    return rows


if __name__ == "__main__":
    main(run, {"--nft-child": _nft_child})
