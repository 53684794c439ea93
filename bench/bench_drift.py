"""Drift at scale: list + model build, RSS, and the diff against a full IPVS read of the same table.

Clusters of 2,700 services (kube-router issue 962) and 10,000 services with
50,000 endpoints (5 per service; one in five a NodePort on two node addresses).
The live table is the desired one written as /proc/net/ip_vs text with a few
faults, so the parse and the diff work on exactly the same table.

Rows:
- list decode + parse (pages of 500) (json.loads of the List body, then
  ``parse_objects``), model build (``desired_table``), RSS kept after both;
- the diff against ``parse_ip_vs`` of the same table (the issue's limit: the
  diff must cost less than the read, ratio < 1), like for like twice: per scrape
  on a busy node, where only connection counters moved (the reader reuses every
  virtual server, ``TableDiffer`` every comparison), and with nothing reused on
  either side. The
  kernel's part of a read (``cat /proc/net/ip_vs``, bench_ipvs) comes on top of
  the parse, so the ratio to a whole read is lower still;
- one endpoint change per second: recomputing that one service, as CPU
  seconds per hour.
"""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import time

from bench.common import Row, best_of, rss_bytes
from exporter.dataplane import RealServer
from exporter.kube import desired as model
from exporter.kube.diff import DriftTracker, TableDiffer, diff_tables
from exporter.kube.objects import parse_objects
from exporter.readers.ipvs import IncrementalParser
from tests.ipvs_text import format_ip_vs

NODE = model.NodeFacts("node-0", "zone-a", ("192.168.0.10", "10.0.0.10"))
HZ = 250


def _ip(base: int, i: int) -> str:
    return f"{base}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def cluster_list(services: int, endpoints_per_service: int = 5, page: int = 500) -> list[str]:
    """``kubectl get services,endpointslices -A -o json`` as List bodies of ``page`` items each
    (the API hands out pages of 500 by default; the store parses page by page)."""
    items = []
    ep_index = 0
    for i in range(services):
        name = f"svc-{i}"
        node_port = i % 5 == 0
        port = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
        if node_port:
            port["nodePort"] = 30000 + i % 2700
        items.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": f"ns-{i % 50}", "resourceVersion": str(i),
                         "labels": {"app": name}, "annotations": {"owner": "bench"}},
            "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": _ip(10, 0x600000 + i),
                     "clusterIPs": [_ip(10, 0x600000 + i)], "ports": [port], "sessionAffinity": "None",
                     "selector": {"app": name}},
            "status": {"loadBalancer": {}}})
        endpoints = []
        for _ in range(endpoints_per_service):
            endpoints.append({"addresses": [_ip(10, 0x100000 + ep_index)],
                              "conditions": {"ready": True, "serving": True, "terminating": False},
                              "nodeName": f"node-{ep_index % 100}", "zone": "zone-a",
                              "targetRef": {"kind": "Pod", "name": f"{name}-{ep_index}", "namespace": f"ns-{i % 50}"}})
            ep_index += 1
        items.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-abcde", "namespace": f"ns-{i % 50}", "resourceVersion": str(i),
                         "labels": {"kubernetes.io/service-name": name},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                                         "2026-11-22T04:00:00.123456789Z"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints})
    return [json.dumps({"apiVersion": "v1", "kind": "List", "items": items[i:i + page]})
            for i in range(0, len(items), page)]


def counters(table, seed: int) -> dict:
    """Connection counters for every real server of ``table``, different per seed."""
    rng = random.Random(seed)
    return {(key, rkey): (rng.randrange(50), rng.randrange(500))
            for key, vs in table.items() for rkey in vs.real_servers}


def with_faults(table, every: int = 500):
    """The live side: the desired table with a stale real server in one VS of every ``every``."""
    live = dict(table)
    for n, (key, vs) in enumerate(table.items()):
        if n % every == 0:
            rs = dict(vs.real_servers)
            rs[("10.255.0.1", 8080)] = RealServer("10.255.0.1", 8080, 1, "Masq")
            live[key] = vs._replace(real_servers=rs, service=None)
    return live


def scale(services: int, quick: bool) -> list[Row]:
    label = f"{services:,} svc"
    pages = cluster_list(services)
    gc.collect()
    rss_before = rss_bytes()

    # List and build are timed in CPU seconds of this (single-threaded) process:
    # on a shared 2-core machine wall time mostly measures the neighbours.
    start = time.process_time()
    objs = parse_objects(json.loads(body) for body in pages)
    list_s = time.process_time() - start
    if not quick:
        start = time.process_time()
        parse_objects(json.loads(body) for body in pages)
        list_s = min(list_s, time.process_time() - start)
    del pages
    start = time.process_time()
    by_service = model.slices_by_service(objs.slices.values())
    table = model.desired_table(objs.services.values(), by_service, NODE)
    build_s = time.process_time() - start
    gc.collect()
    rss_after = rss_bytes()
    if not quick:
        start = time.process_time()
        model.desired_table(objs.services.values(), model.slices_by_service(objs.slices.values()), NODE)
        build_s = min(build_s, time.process_time() - start)
    reals = sum(len(vs.real_servers) for vs in table.values())

    faulty = with_faults(table)
    # Two readings of one table on a busy node: the same virtual and real servers,
    # other connection counters.
    texts = [format_ip_vs(faulty, HZ, counters(faulty, seed)) for seed in (1, 2)]
    parser = IncrementalParser()  # what the live reader keeps from scrape to scrape
    lives = [parser.parse(text, HZ) for text in texts]
    live = lives[0]
    repeat = 2 if quick else 5
    turn = [0]

    def parse_moved():
        turn[0] ^= 1
        return parser.parse(texts[turn[0]], HZ)

    # Per scrape on a busy node: counters moved, nothing else; the reader reuses
    # every virtual server, ``TableDiffer`` every comparison.
    parse_s = best_of(parse_moved, repeat)
    lives = [parser.parse(text, HZ) for text in texts]  # the objects the parses above keep
    differ = TableDiffer()

    def diff_moved():
        turn[0] ^= 1
        return differ.diff(table, lives[turn[0]])

    diff_s = best_of(diff_moved, repeat)

    def parse_anew():
        parser.forget()  # nothing reused: as if every record had changed
        parser.parse(texts[0], HZ)

    full_parse_s = best_of(parse_anew, repeat)
    full_diff_s = best_of(lambda: diff_tables(table, live), repeat)
    result = diff_tables(table, live)
    tracker = DriftTracker()
    tracker.update(result, 0.0)
    track_s = best_of(lambda: tracker.update(result, 100.0), repeat)

    # One endpoint change per second: the watch recomputes that one service.
    some = list(objs.services.values())[: min(1000, services)]
    start = time.process_time()
    for svc in some:
        model.virtual_servers_for_service(svc, by_service.get(svc.key, ()), NODE)
    per_change = (time.process_time() - start) / len(some)

    return [
        Row(f"{label}: list decode + parse, pages of 500 (CPU)", list_s),
        Row(f"{label}: model build, {len(table):,} VS {reals:,} RS (CPU)", build_s),
        Row(f"{label}: RSS growth: objects + desired table (+ one page)", (rss_after - rss_before) / 2**20,
            unit="MB"),
        Row(f"{label}: RSS of the whole process after build", rss_after / 2**20, unit="MB"),
        Row(f"{label}: diff per scrape, counters moved (TableDiffer)", diff_s, parse_s,
            "parse, counters moved", limit=1.0),
        Row(f"{label}: diff of every virtual server (diff_tables)", full_diff_s, full_parse_s,
            "parse, no record reused", limit=1.0),
        Row(f"{label}: DriftTracker.update ({len(result.stale_real_servers)} items)", track_s),
        Row(f"{label}: CPU per hour at 1 endpoint change/s", per_change * 3600, unit="s"),
    ]


def run(args) -> list[Row]:
    """Each size in a fresh interpreter, so its RSS is its own."""
    sizes = (2700, 10_000) if not args.quick else (2700,)
    rows = []
    for n in sizes:
        cmd = [sys.executable, "-m", "bench.bench_drift", "--one", str(n)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"bench_drift {n} failed: {proc.stderr.strip().splitlines()[-1:]}")
        rows += [Row(**fields) for fields in json.loads(proc.stdout)]
    return rows


if __name__ == "__main__":
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", type=int, help="run one size here and print its rows as JSON")
    args = parser.parse_args()
    if args.one:
        print(json.dumps([dataclasses.asdict(row) for row in scale(args.one, args.quick)]))
    else:
        for row in run(args):
            print(row)
