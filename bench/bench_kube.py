"""The Kubernetes source at scale: list + build from the API stand-in, RSS, cost per change.

The stand-in (tests/apiserver.py) serves N Services and N EndpointSlices with 5
endpoints each (the first seed's 2,700 services, and 10,000 services with 50,000
endpoints). A child process runs the production KubeStore against it (so its
RSS is the exporter's alone) and reports:

- list + build time: LIST in pages of 500, parse to compact tuples, build the
  desired table; against the floor of fetching the same pages and json-decoding
  them without keeping anything (reference).
- RSS once synced, against the RSS of the same process after its imports.
- one EndpointSlice change: store update (parse + one Service recomputed)
  against rebuilding the whole table with ``desired.desired_table`` (reference),
  and the CPU per hour at one change per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import Row, main

ENDPOINTS_PER_SLICE = 5


def _populate(server, services: int) -> None:
    from tests.apiserver import endpoint_slice, node, service

    server.create("nodes", node("bench-node", zone="zone-a", addresses=("192.0.2.10",)))
    for i in range(services):
        ns = f"ns{i % 100}"
        name = f"svc-{i}"
        extra = {"type": "NodePort"} if i % 10 == 0 else {}
        ports = (("http", "TCP", 80), ("metrics", "TCP", 9090)) if i % 4 == 0 else (("http", "TCP", 80),)
        raw = service(ns, name, f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}", ports=ports, **extra)
        if extra:
            for k, p in enumerate(raw["spec"]["ports"]):
                p["nodePort"] = 30000 + (i * 2 + k) % 2767
        server.create("services", raw)
        base = i * ENDPOINTS_PER_SLICE
        addrs = [f"10.{128 + (base + j) // 65536}.{(base + j) // 256 % 256}.{(base + j) % 256}"
                 for j in range(ENDPOINTS_PER_SLICE)]
        server.create("endpointslices", endpoint_slice(
            ns, f"{name}-abcde", name, addrs,
            ports=(("http", "TCP", 8080), ("metrics", "TCP", 9090)),
            trigger_time="2026-11-22T04:00:00.000000001Z", node_name=f"node-{i % 50}"))


def _child(kubeconfig: str) -> None:
    """Runs in the child: measure the production path and print one JSON line."""
    from bench.common import rss_bytes
    from exporter.kube import desired, objects
    from exporter.kube.client import ApiClient
    from exporter.kube.store import KubeStore

    rss_imports = rss_bytes()
    api = ApiClient.from_settings(kubeconfig)

    store = KubeStore(api, "bench-node", "kube-proxy", ["192.0.2.10"])
    start = time.perf_counter()
    cpu_start = time.process_time()
    store.start()
    if not store.wait_synced(600):
        raise SystemExit("the store did not sync")
    build = time.perf_counter() - start
    build_cpu = time.process_time() - cpu_start
    snap = store.snapshot()
    rss_synced = rss_bytes()

    # Reference (after the build, so the RSS above is the store's alone): fetch and decode
    # every page, keep nothing.
    start = time.perf_counter()
    for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
        token = None
        while True:
            params = {"limit": 500, **({"continue": token} if token else {})}
            page = api.list_page(path, params)
            token = page["metadata"].get("continue")
            del page
            if not token:
                break
    fetch_only = time.perf_counter() - start

    # One EndpointSlice change, as a watch event line: parse + apply (one Service recomputed).
    state = store.state
    slices = list(state._slices.values())[:200]
    raw_events = []
    for k, sl in enumerate(slices):
        ep = [{"addresses": [f"10.250.{k // 256}.{k % 256}"], "conditions": {"ready": True}}]
        ep += [{"addresses": [e.addresses[0]], "conditions": {"ready": True}} for e in sl.endpoints[1:]]
        raw_events.append(json.dumps({"type": "MODIFIED", "object": {
            "metadata": {"namespace": sl.namespace, "name": sl.name, "resourceVersion": str(10**9 + k),
                         "labels": {"kubernetes.io/service-name": sl.service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": ep}}))
    cpu_start = time.process_time()
    for line in raw_events:
        event = json.loads(line)
        item = objects.parse_endpoint_slice(event["object"])
        state.upsert("endpointslices", item.key, item)
    per_change = (time.process_time() - cpu_start) / len(raw_events)

    by_service = state.slices_by_service()
    cpu_start = time.process_time()
    full = desired.desired_table(state._services.values(), by_service, state.node(), "kube-proxy")
    full_rebuild = time.process_time() - cpu_start
    store.stop()
    print(json.dumps({
        "services": len(state._services), "slices": len(state._slices),
        "virtual_servers": len(snap.table), "real_servers": snap.real_servers, "full_table": len(full),
        "fetch_only": fetch_only, "build": build, "build_cpu": build_cpu,
        "rss_imports": rss_imports, "rss_synced": rss_synced,
        "per_change": per_change, "full_rebuild": full_rebuild,
    }))


def _measure(services: int) -> dict:
    from tests.apiserver import FakeApiServer

    server = FakeApiServer().start()
    try:
        _populate(server, services)
        with tempfile.TemporaryDirectory(prefix=f"kube-bench-{os.getpid()}-") as tmp:
            kubeconfig = server.write_kubeconfig(os.path.join(tmp, "kubeconfig"))
            out = subprocess.run([sys.executable, "-m", "bench.bench_kube", "--child", kubeconfig],
                                 capture_output=True, text=True, timeout=900,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if out.returncode != 0:
            raise SystemExit(f"child failed: {out.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()


def run(args) -> list[Row]:
    rows = []
    sizes = (300, 1000) if getattr(args, "quick", False) else (2700, 10000)
    for n in sizes:
        m = _measure(n)
        label = f"{m['services']} svc / {m['slices'] * ENDPOINTS_PER_SLICE} endpoints"
        rows += [
            Row(f"{label}: list+build ({m['virtual_servers']} VS, {m['real_servers']} RS)",
                m["build"], m["fetch_only"], "fetch+decode only"),
            Row(f"{label}: RSS synced", m["rss_synced"] / 2**20, m["rss_imports"] / 2**20,
                "after imports", unit="MiB"),
            Row(f"{label}: one slice change (parse + 1 service)", m["per_change"] * 1e3,
                m["full_rebuild"] * 1e3, "full rebuild", unit="ms"),
            Row(f"{label}: CPU per hour at 1 change/s", m["per_change"] * 3600, unit="s"),
        ]
    return rows


if __name__ == "__main__":
    main(run, {"--child": _child})
