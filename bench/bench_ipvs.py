"""IPVS reader vs `cat /proc/net/ip_vs`, `ipvsadm -Ln` and node_exporter's ipvs collector.

Needs a kernel with IPVS: on the host (which has none) ``run`` boots the kernel
lane's VM once and runs the measurements there; every figure of a row comes from
the same VM and the same table. Tables: 2,700 and 10,000 TCP services with 5
real servers each (``--quick``: 2,700 only). Absolute times are those of a
software-emulated guest; the ratios are what to read.

The reader's limit (2x `cat`) is checked on what a running exporter meets from
scrape to scrape: the table unchanged, every counter moved (a busy node), and a
virtual server changed besides. The first read of a process, with nothing
converted yet, is printed without a limit: it happens once per start.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from bench.common import Row, best_of

SIZES = (2700, 10000)
QUICK_SIZES = (2700,)
READER_LIMIT = 2.0  # the limit: at most 2x `cat /proc/net/ip_vs`


def run(args) -> list[Row]:
    if os.environ.get("KUBENODE_IN_VM") == "1":
        return measure(QUICK_SIZES if args.quick else SIZES)
    return _run_in_vm(args.quick)


def _run_in_vm(quick: bool) -> list[Row]:
    from tests.kernel.vm import LaneError, run_in_vm

    script = (f"{shlex.quote(sys.executable)} -m bench.bench_ipvs {'--quick' if quick else ''} "
              "--json \"$RESULTS/rows.json\" > \"$RESULTS/bench.out\" 2>&1")
    try:
        vm = run_in_vm(script, "bench-ipvs", memory="2G", timeout=3600)
    except LaneError as err:
        raise SystemExit(f"IPVS bench needs the kernel lane's VM: {err}") from None
    rows_file = vm.results / "rows.json"
    if vm.status != 0 or not rows_file.is_file():
        out = (vm.results / "bench.out").read_text(errors="replace") if (vm.results / "bench.out").exists() else ""
        raise SystemExit(f"IPVS bench failed in the VM (status {vm.status}):\n{out[-3000:]}")
    rows = [Row(**r) for r in json.loads(rows_file.read_text())]
    rows.append(Row("VM run (boot, program tables, measure), wall time", vm.seconds))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeExporter:
    """Debian's prometheus-node-exporter with only its ipvs collector, on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.proc = subprocess.Popen(
            ["prometheus-node-exporter", "--collector.disable-defaults", "--collector.ipvs",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("prometheus-node-exporter did not start") from None
                time.sleep(0.2)

    def scrape(self) -> int:
        with urllib.request.urlopen(self.url, timeout=600) as resp:
            body = resp.read()
        if b"node_ipvs_backend_weight" not in body:
            raise SystemExit("node_exporter's scrape has no node_ipvs_backend_weight")
        return len(body)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def interleaved(fns: dict, rounds: int, warm_up: bool = True) -> dict[str, float]:
    """Median wall time of each function, run in turn ``rounds`` times.

    A value may be (prepare, fn): ``prepare`` runs untimed before each call.
    """
    fns = {name: fn if isinstance(fn, tuple) else (None, fn) for name, fn in fns.items()}
    if warm_up:
        for prepare, fn in fns.values():
            if prepare:
                prepare()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (prepare, fn) in fns.items():
            if prepare:
                prepare()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(sizes) -> list[Row]:
    from exporter.readers import ipvs as reader
    from tests.kernel import ipvs_tables

    ipvs_tables.load_modules()
    rows = []
    exporter = NodeExporter()
    try:
        for n in sizes:
            ipvs_tables.clear()
            ipvs_tables.restore(ipvs_tables.uniform_table(n, reals=5))
            table = reader.read_ip_vs(hz=250)
            assert len(table) == n and sum(len(v.real_servers) for v in table.values()) == 5 * n
            label = f"{n:,} services x 5 real servers"
            size = len(reader.read_ip_vs_text())

            def cat():
                subprocess.run(["cat", "/proc/net/ip_vs"], stdout=subprocess.DEVNULL, check=True)

            # The parser a live reader owns, kept from read to read.
            parser = reader.IncrementalParser()

            def ours():
                parser.parse(reader.read_ip_vs_text(), 250)

            def ours_counters_moved():
                # Only connection counters changed since the last read: a busy node.
                last = parser._last
                # As if the last read's text differed in its counters only.
                parser._last = last._replace(text_hash=last.text_hash ^ 1)
                parser.parse(reader.read_ip_vs_text(), 250)

            # One real server's weight flips between two reads, in a virtual server
            # in the middle of the table (an endpoint turning ready or not).
            middle = n // 2
            vip = f"{ipvs_tables._v4(middle, '10.96.0.0')}:{80 + middle % 7}"
            rip = f"{ipvs_tables._v4(middle * 8, '10.128.0.0')}:8080"
            weight = [1]

            def flip_a_weight():
                weight[0] ^= 1
                ipvs_tables.ipvsadm("-e", "-t", vip, "-r", rip, "-m", "-w", str(weight[0]))

            def ours_shape_changed():
                parser.parse(reader.read_ip_vs_text(), 250)

            # A real server added to / removed from that virtual server: the lines after
            # it move, so the layout after it is shifted.
            extra = f"{ipvs_tables._v4(middle * 8 + 7, '10.128.0.0')}:8080"
            present = [False]

            def add_or_remove():
                present[0] = not present[0]
                if present[0]:
                    ipvs_tables.ipvsadm("-a", "-t", vip, "-r", extra, "-m", "-w", "1")
                else:
                    ipvs_tables.ipvsadm("-d", "-t", vip, "-r", extra)

            def ours_cold():
                # The first read of a process: nothing converted yet.
                reader.IncrementalParser().parse(reader.read_ip_vs_text(), 250)

            def ours_exact():
                reader.merge_service_flags(parser.parse(reader.read_ip_vs_text(), 250), reader.dump_service_flags())

            def ipvsadm_list():
                subprocess.run(["ipvsadm", "-Ln"], stdout=subprocess.DEVNULL, check=True)

            # The guest is emulated on a shared machine: its speed drifts with the host's
            # load. Interleave the contenders so each ratio compares the same moments.
            fast = interleaved({"cat": cat, "ours": ours, "moved": ours_counters_moved,
                                "shape": (flip_a_weight, ours_shape_changed),
                                "moved lines": (add_or_remove, ours_shape_changed), "cold": ours_cold,
                                "exact": ours_exact}, rounds=5)
            slow = interleaved({"ipvsadm": ipvsadm_list, "node": exporter.scrape}, rounds=2,
                               warm_up=False)
            t_cat, t_ours, t_exact = fast["cat"], fast["ours"], fast["exact"]
            t_ipvsadm, t_node = slow["ipvsadm"], slow["node"]
            key = next(iter(table))
            with reader.IPVSNetlink() as nl:
                t_one = best_of(lambda: nl.read_virtual_server(key), repeat=20)
            rows += [
                Row(f"read+parse /proc ({label}, {size / 1e6:.1f} MB), table unchanged", t_ours,
                    t_cat, "cat /proc/net/ip_vs", limit=READER_LIMIT),
                Row("  same, every real server's counters moved since the last read", fast["moved"],
                    t_cat, "cat /proc/net/ip_vs", limit=READER_LIMIT),
                Row("  same, and a real server's weight changed too", fast["shape"],
                    t_cat, "cat /proc/net/ip_vs", limit=READER_LIMIT),
                Row("  same, and a real server added or removed (the lines after it move)",
                    fast["moved lines"], t_cat, "cat /proc/net/ip_vs", limit=READER_LIMIT),
                Row("  same, first read of a process (all caches empty)", fast["cold"], t_cat,
                    "cat /proc/net/ip_vs"),
                Row("  vs ipvsadm -Ln", t_ours, t_ipvsadm, "ipvsadm -Ln"),
                Row("  vs one node_exporter scrape (ipvs collector only)", t_ours, t_node,
                    "node_exporter"),
                Row("  + netlink service dump for scheduler flags (unchanged table)", t_exact, t_cat,
                    "cat /proc/net/ip_vs"),
                Row("  one virtual server over netlink (read_virtual_server)", t_one, t_ours,
                    "whole /proc read"),
            ]
    finally:
        exporter.stop()
        ipvs_tables.clear()
    return rows


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.bench_ipvs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("KUBENODE_IN_VM") != "1":
        print("run this through `python -m bench ipvs` (it boots the VM)", file=sys.stderr)
        return 2
    rows = measure(QUICK_SIZES if args.quick else SIZES)
    for row in rows:
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([row.__dict__ for row in rows], fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
