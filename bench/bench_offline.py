"""``desired --objects`` on a real-sized dump: 24,000 Services and their EndpointSlices.

The dump is what ``kubectl get services,endpointslices -A -o yaml`` prints for
such a cluster (60 MB here; the issue's real dump was 56 MB): the objects of
bench_kube's stand-in cluster (tests/apiserver.py's builders, 5 endpoints per
slice) dressed with the fields the API server adds and kubectl prints (uid,
resourceVersion, creationTimestamp, labels and selectors, targetRefs, conditions),
so the loader meets the volume it meets in a real cluster.
The same objects are also written as JSON (``-o json``).

``desired`` runs as a child process (as a user runs it); the rows report its wall
time, its CPU time and its peak RSS (``ru_maxrss`` of that child, measured from
a fresh process so nothing else is counted), against the limits the issue sets:
under 15 s and under 1 GB. On a shared machine the wall time includes waiting
for a core; the CPU row is the cost.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench.bench_kube import ENDPOINTS_PER_SLICE
from bench.common import Row, main

SERVICES = 24_000
LIMIT_SECONDS = 15.0
LIMIT_RSS_BYTES = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _uid(kind: int, i: int) -> str:
    return f"{kind:08x}-{i >> 16 & 0xffff:04x}-4{i & 0xfff:03x}-8{i % 997:03x}-{i * 2654435761 % 2**48:012x}"


def cluster_items(services: int):
    """Services and EndpointSlices as the API server returns them, one of each per Service."""
    from tests.apiserver import endpoint_slice, node, service

    yield {"apiVersion": "v1", "kind": "Node",
           **node("bench-node", zone="zone-a", addresses=("192.0.2.10",))}
    for i in range(services):
        ns, name = f"ns{i % 100}", f"svc-{i}"
        ports = (("http", "TCP", 80), ("metrics", "TCP", 9090)) if i % 4 == 0 else (("http", "TCP", 80),)
        extra = {"type": "NodePort"} if i % 10 == 0 else {}
        svc = service(ns, name, f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}", ports=ports, **extra)
        labels = {"app.kubernetes.io/name": name}
        spec = svc["spec"]
        for k, port in enumerate(spec["ports"]):
            port["targetPort"] = 8080 + k
            if extra:
                port["nodePort"] = 30000 + (i * 2 + k) % 2767
        spec.update({"internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "selector": {"app.kubernetes.io/name": name}, "sessionAffinity": "None"})
        if extra:
            spec["externalTrafficPolicy"] = "Cluster"
        svc["metadata"].update({"creationTimestamp": "2026-11-02T08:14:03Z", "labels": labels,
                                "resourceVersion": str(4_000_000 + 2 * i), "uid": _uid(1, i)})
        yield {"apiVersion": "v1", "kind": "Service", **svc, "status": {"loadBalancer": {}}}

        base = i * ENDPOINTS_PER_SLICE
        addrs = [f"10.{128 + (base + j) // 65536}.{(base + j) // 256 % 256}.{(base + j) % 256}"
                 for j in range(ENDPOINTS_PER_SLICE)]
        sl = endpoint_slice(ns, f"{name}-abcde", name, addrs,
                            ports=(("http", "TCP", 8080), ("metrics", "TCP", 9090)),
                            trigger_time="2026-11-22T04:00:00.000000001Z", node_name=f"node-{i % 50}")
        for j, ep in enumerate(sl["endpoints"]):
            ep["conditions"].update({"serving": True, "terminating": False})
            ep["targetRef"] = {"kind": "Pod", "name": f"{name}-7d9f8c6b5-{j:05d}", "namespace": ns}
        sl["metadata"].update({
            "creationTimestamp": "2026-11-02T08:14:03Z", "generateName": f"{name}-",
            "generation": 7, "resourceVersion": str(4_000_001 + 2 * i), "uid": _uid(2, i)})
        sl["metadata"]["labels"].update({"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                                         **labels})
        yield {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", **sl}


def write_dump(path: str, services: int, as_json: bool = False) -> int:
    """Write the cluster as kubectl prints it (a List), one item at a time; return its size in bytes."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with open(path, "w", encoding="utf-8") as fh:
        if as_json:  # kubectl's -o json: indented by 4
            fh.write('{\n    "apiVersion": "v1",\n    "items": [\n')
            for n, item in enumerate(cluster_items(services)):
                fh.write((",\n" if n else "") + "        " + json.dumps(item, indent=4).replace("\n", "\n        "))
            fh.write('\n    ],\n    "kind": "List",\n    "metadata": {\n        "resourceVersion": ""\n    }\n}\n')
        else:  # kubectl's -o yaml: items as a block sequence at the left margin
            fh.write("apiVersion: v1\nitems:\n")
            for item in cluster_items(services):
                fh.write(yaml.dump([item], Dumper=dumper, default_flow_style=False, width=1 << 20))
            fh.write("kind: List\nmetadata:\n  resourceVersion: \"\"\n")
    return os.path.getsize(path)


def time_desired(objects: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS in bytes of one ``desired --objects`` child."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "desired", "--objects", objects,
                             "--node-name", "bench-node", "--output", "json"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=900)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"desired exited {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def _measure_child(objects: str) -> None:
    """In a fresh process (so RUSAGE_CHILDREN is this one run's alone): print the figures."""
    seconds, cpu, rss = time_desired(objects)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss": rss}))


def measure(objects: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_offline", "--child", objects],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"measuring desired failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> list[Row]:
    services = 2_400 if getattr(args, "quick", False) else SERVICES
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"offline-bench-{os.getpid()}-") as tmp:
        for fmt in ("yaml", "json"):
            path = os.path.join(tmp, f"cluster.{fmt}")
            size = write_dump(path, services, as_json=fmt == "json")
            m = measure(path)
            label = f"desired --objects, {services} svc, {fmt} {size / 1e6:.0f} MB"
            rows += [
                Row(f"{label}: wall", m["seconds"], unit="s", ceiling=LIMIT_SECONDS),
                Row(f"{label}: CPU (user+sys)", m["cpu"], unit="s"),
                Row(f"{label}: peak RSS", m["rss"] / 2**20, unit="MiB", ceiling=LIMIT_RSS_BYTES / 2**20),
            ]
    return rows


if __name__ == "__main__":
    main(run, {"--child": _measure_child})
