"""The exporter's own cost on this machine: RSS after 100 scrapes (limit 60 MB), CPU per
scrape, CPU while idle; and what the process collector's /proc scan costs with hundreds of
processes, against reading the processes it keeps.

The real command (`python -m exporter`, every collector enabled by default) runs as a
subprocess; its CPU is read from /proc/<pid>/stat, its RSS from /proc/<pid>/status.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.common import Row, best_of, main, rss_bytes

SCRAPES = 100
RSS_LIMIT = 60 * 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def start_exporter(port: int, workdir: str) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": os.path.join(workdir, "no-kubeconfig")}
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the exporter exited with {proc.returncode} at start")
        try:
            scrape(f"http://127.0.0.1:{port}/healthz")
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the exporter did not answer /healthz within 20 s")


def exporter_rows(idle_seconds: float) -> list[Row]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with tempfile.TemporaryDirectory(prefix=f"kubenode-nodeproc-bench-{os.getpid()}-") as workdir:
        proc = start_exporter(port, workdir)
        try:
            cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
            size = 0
            for _ in range(SCRAPES):
                size = len(scrape(url))
            cpu1, wall1 = cpu_seconds(proc.pid), time.perf_counter()
            rss = rss_bytes(proc.pid)
            time.sleep(idle_seconds)
            cpu2 = cpu_seconds(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return [
        Row(f"exporter RSS after {SCRAPES} scrapes ({size} bytes each)", rss / 2**20, RSS_LIMIT / 2**20,
            "limit", unit="MB", limit=1.0),
        Row("exporter CPU per scrape", (cpu1 - cpu0) / SCRAPES * 1e3, unit="ms"),
        Row("scrape wall time (client side)", (wall1 - wall0) / SCRAPES * 1e3, unit="ms"),
        Row(f"exporter CPU while idle for {idle_seconds:.0f} s", cpu2 - cpu1),
        Row("exporter idle CPU, share of one core", (cpu2 - cpu1) / idle_seconds, unit="cores"),
    ]


def scan_rows(extra: int) -> list[Row]:
    from exporter.readers.processes import Component, ProcessTracker

    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(extra)]
    kubelet_dir = tempfile.mkdtemp(prefix=f"kubenode-nodeproc-bench-{os.getpid()}-")
    link = os.path.join(kubelet_dir, "kubelet")
    os.symlink("/bin/sleep", link)
    kubelet = subprocess.Popen([link, "600"])
    try:
        time.sleep(0.2)
        tracker = ProcessTracker("/proc", [Component.parse(c, f"^{c}$")
                                           for c in ("kubelet", "kube-proxy", "kube-router")])
        scan = best_of(tracker.scan, repeat=9)
        processes = tracker.stats.last_processes
        kept = best_of(tracker.read_kept, repeat=9)
    finally:
        for p in [*sleepers, kubelet]:
            p.kill()
            p.wait()
        os.unlink(link)
        os.rmdir(kubelet_dir)
    return [Row(f"process collector: full /proc scan, {processes} processes", scan * 1e3,
                kept * 1e3, "reading the 1 kept process", unit="ms"),
            Row("process collector: scan cost per process", scan / processes * 1e6, unit="us")]


def run(args) -> list[Row]:
    idle = 5.0 if getattr(args, "quick", False) else 20.0
    extra = 100 if getattr(args, "quick", False) else 300
    return exporter_rows(idle) + scan_rows(extra)


if __name__ == "__main__":
    main(run)
