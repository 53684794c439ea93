"""The whole exporter for minutes under churn, per mode: memory, CPU, scrape time, logs, drift.

bench_memory starts the real ``python -m exporter`` against the API stand-in and a live table
and measures it once synced; this bench keeps that exporter running (bench_memory's nodes and
``synced_exporter``) while the cluster churns as a DaemonSet beside kubelet would see it:

- every ~2 s one Service's EndpointSlice changes (one endpoint swapped for a new address),
  through the stand-in's API as a controller would, then in the live table as kube-proxy would
  program it (nftables: the service chain flushed and written again; iptables, either backend:
  the partial sync's ``iptables-restore --noflush``; IPVS: the fixture /proc/net/ip_vs written
  again), so once the "proxy" caught up the expected drift is zero;
- every other scrape (~30 s) one change goes to the API only and stays there for one scrape
  interval (a late proxy): that scrape must show it (pending within the grace period, or drift),
  then the rules are programmed and the next scrape must show nothing;
- /metrics is scraped every 15 s, as Prometheus would (no change in the second before a
  scrape, so only the late one can be in flight).

Per scrape: its duration, the exporter's VmRSS, its CPU since the last scrape (utime+stime of
/proc/PID/stat; cutime+cstime too, which must stay 0: no exec on a scrape path), every
``kubenode_collector_success``, the drift and pending counts, and the log lines written since.
``KUBENODE_SOAK_OUT=DIR`` keeps each run's scrapes and log lines there as JSON.

A leak is told from a plateau only over minutes: ``KUBENODE_SOAK_SECONDS=900`` soaks each mode
that long (default 150 s at 10,000 Services, 60 s at 1,000), ``KUBENODE_SOAK_MODES=iptables``
runs only the modes named (comma-separated, from MODES; ``iptables`` is the legacy backend) and
``KUBENODE_SOAK_SERVICES=1000`` only that size. Each scrape's RSS and CPU is printed to stderr
as it goes; the "RSS slope" row is the least-squares slope of RSS after SLOPE_FROM, held to
SLOPE_LIMIT when at least SLOPE_WINDOW of scrapes follow it (KUBENODE_SOAK_SECONDS=780 or more).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time

from bench.bench_memory import NODES, _desired_ip_vs, _scrape, _status_kib, synced_exporter
from bench.common import Row, main

SCRAPE_INTERVAL = 15.0
CHANGE_INTERVAL = 2.0
# No change starts this close before a scrape, plus what a change takes to apply (the rules'
# restore: ~2.4 s at 10,000 Services), so the watch and the rules have landed by then: a
# scrape during one sees it pending, rightly, and the bench would count that as unexpected.
SETTLE = 1.0
# RSS slope over the scrapes after the first minutes: the tables' first reads, malloc's arenas
# and the first full collections fill by then (iptables-legacy at 10,000 Services: within ~3 min).
SLOPE_FROM = 180.0
# Judged only over this long a window after SLOPE_FROM (a shorter run's slope is the trim's
# sawtooth, +-3 MB scrape to scrape): 1 MB per 10 min is 144 MB a day, an OOM kill within days.
SLOPE_WINDOW = 600.0
SLOPE_LIMIT = 1.0  # MB per 10 min
MODES = ("iptables-nft", "iptables", "nftables", "ipvs")  # "iptables": the legacy backend
QUICK = {1000: 50.0}
FULL = {1000: 60.0, 10_000: 150.0}
_TICKS = os.sysconf("SC_CLK_TCK")
# Collectors that cannot read the node the bench makes: IPVS's --path.procfs is a fixture
# holding net/ip_vs alone, so the collectors of /proc/cgroups and /proc/stat report down.
FIXTURE_DOWN = {"ipvs": ("memcg", "process")}


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime+stime, cutime+cstime) of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3): utime is field 14, so fields[11]
    own = int(fields[11]) + int(fields[12])
    children = int(fields[13]) + int(fields[14])
    return own / _TICKS, children / _TICKS


def _families(page: str, name: str) -> dict[str, float]:
    return {label: float(value) for label, value in
            re.findall(r"^" + name + r'\{[a-z_]+="([^"]*)"\} (\S+)$', page, re.M)}


def _trigger_time() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}000Z"


class _Churn:
    """One Service's endpoints changed at a time: in the API stand-in, then (``program``) in the
    node's live table as its proxy mode writes it."""

    def __init__(self, node, server, tmp: str, seed: int) -> None:
        self.node, self.server = node, server
        self.slices = node.items["endpointslices"]
        self.random = random.Random(seed)
        self.fresh = 0  # new endpoint addresses: 10.250.0.0/16, used by no generated Service
        self.ip_vs_path = os.path.join(tmp, "proc", "net", "ip_vs")
        # IPVS: the slices the "proxy" programmed, apart from the API's, so an on-time change
        # written after a late one does not program the late one with it.
        self.programmed = list(self.slices)

    def in_api(self) -> tuple[int, dict]:
        """Swap one endpoint of a random Service for a new address in the API; which slice and
        its new object."""
        index = self.random.randrange(len(self.slices))
        raw = copy.deepcopy(self.slices[index])
        addresses = [ep["addresses"][0] for ep in raw["endpoints"]]
        slot = self.fresh % len(addresses)
        addresses[slot] = f"10.250.{self.fresh // 250 % 250}.{self.fresh % 250 + 1}"
        self.fresh += 1
        raw["endpoints"][slot]["addresses"] = [addresses[slot]]
        raw["metadata"].setdefault("annotations", {})[
            "endpoints.kubernetes.io/last-change-trigger-time"] = _trigger_time()
        self.slices[index] = raw
        self.server.update("endpointslices", raw)
        return index, raw

    def program(self, index: int, raw: dict) -> None:
        """The proxy catching up on that change."""
        node = self.node
        if node.mode == "ipvs":
            self.programmed[index] = raw
            partial = self.ip_vs_path + ".new"
            with open(partial, "w") as fh:
                fh.write(_desired_ip_vs({**node.items, "endpointslices": self.programmed}))
            os.replace(partial, self.ip_vs_path)
            return
        addresses = [ep["addresses"][0] for ep in raw["endpoints"]]
        svc = node.ports[index]
        new = [(address, port) for address, (_, port) in zip(addresses, svc.endpoints)]
        if node.mode == "nftables":
            from tests.nft_rulesets import endpoints_changed

            node.ns.nft(endpoints_changed(svc, new))
        else:
            from tests.ipt_rulesets import endpoints_changed

            node.ns.restore(endpoints_changed(node.ports, svc, new), backend=node.backend)


def _scrape_record(node, url: str, pid: int, logs, since: dict) -> dict:
    start = time.monotonic()
    page = node.run(lambda: _scrape(url))
    took = time.monotonic() - start
    cpu, children = _cpu_seconds(pid)
    lines = len(logs.lines)
    record = {
        "t": start, "duration": took, "rss": _status_kib(pid, "VmRSS") * 1024,
        "cpu": cpu - since["cpu"], "children_cpu": children,
        "success": _families(page, "kubenode_collector_success"),
        "drift": {k: v for k, v in _families(page, "kubenode_dataplane_drift").items() if v},
        "pending": {k: v for k, v in _families(page, "kubenode_dataplane_drift_pending").items() if v},
        "log_lines": lines - since["lines"],
    }
    since.update(cpu=cpu, lines=lines)
    return record


def soak(services: int, mode: str, duration: float, timeout: float = 600.0) -> dict:
    node = NODES[mode](services)
    with node, tempfile.TemporaryDirectory(prefix=f"bench-soak-{os.getpid()}-") as tmp, \
            synced_exporter(node, tmp, timeout) as (server, proc, url, logs, synced_after):
        pid = proc.pid  # nsenter execs the exporter: the same process
        churn = _Churn(node, server, tmp, seed=services)
        rss_at_sync = _status_kib(pid, "VmRSS") * 1024
        since = {"cpu": _cpu_seconds(pid)[0], "lines": len(logs.lines)}
        log_start = len(logs.lines)
        scrapes: list[dict] = []
        changes: list[float] = []  # seconds each on-time change took to apply (API + rules)
        late: dict | None = None  # the API-only change in flight and what the scrapes saw of it
        lates: list[dict] = []
        start = time.monotonic()
        cpu_start = since["cpu"]
        next_scrape, next_change = start, start + CHANGE_INTERVAL
        while True:
            now = time.monotonic()
            if now >= next_scrape:
                record = _scrape_record(node, url, pid, logs, since)
                record["late"] = late["phase"] if late else None
                scrapes.append(record)
                print(f"   soak: {mode} {services:,} svc  t={now - start:6.0f} s  RSS {record['rss'] / 1e6:6.1f} MB"
                      f"  CPU {100.0 * record['cpu'] / SCRAPE_INTERVAL:5.1f}%  scrape {record['duration']:.2f} s",
                      file=sys.stderr, flush=True)
                next_scrape += SCRAPE_INTERVAL
                differs = bool(record["drift"] or record["pending"])
                if late and late["phase"] == "api-only":
                    late["seen"] = differs
                    churn.program(late["index"], late["raw"])
                    late["phase"] = "programmed"
                elif late and late["phase"] == "programmed":
                    late["cleared"] = not differs
                    lates.append(late)
                    late = None
                if late is None and len(scrapes) % 2 == 1 and now - start < duration:
                    index, raw = churn.in_api()
                    late = {"index": index, "raw": raw, "phase": "api-only", "at": now - start}
                if now - start >= duration and late is None:
                    break
                continue
            quiet_before_scrape = SETTLE + (max(changes[-5:]) if changes else 0.0)
            if now >= next_change and now < next_scrape - quiet_before_scrape:
                began = time.monotonic()
                churn.program(*churn.in_api())
                changes.append(time.monotonic() - began)
                next_change = max(next_change + CHANGE_INTERVAL, time.monotonic())
                continue
            wake = min(next_scrape, next_change if next_change < next_scrape - quiet_before_scrape else next_scrape)
            time.sleep(max(0.0, wake - time.monotonic()))
        soaked = time.monotonic() - start
        cpu_total = _cpu_seconds(pid)[0] - cpu_start
        log_lines = logs.lines[log_start:]
        out_dir = os.environ.get("KUBENODE_SOAK_OUT")
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"soak-{mode}-{services}.json"), "w") as fh:
                json.dump({"scrapes": scrapes, "changes": changes, "lates": lates,
                           "logs": [[t - start, line] for t, line in log_lines]}, fh, indent=1)
        return {"fixture_down": FIXTURE_DOWN.get(mode, ()), "synced_after": synced_after, "rss_at_sync": rss_at_sync, "scrapes": scrapes, "changes": changes,
                "lates": lates, "soaked": soaked, "cpu": cpu_total, "log_lines": len(log_lines), "start": start}


def _slope_mb_per_10min(scrapes: list[dict], start: float, soaked: float) -> float:
    """Least squares of RSS over time, after SLOPE_FROM (or the first third of a short run)."""
    after = min(SLOPE_FROM, soaked / 3)
    points = [(s["t"] - start, s["rss"] / 1e6) for s in scrapes if s["t"] - start >= after]
    if len(points) < 3:
        return float("nan")
    mean_t = statistics.fmean(t for t, _ in points)
    mean_m = statistics.fmean(m for _, m in points)
    num = sum((t - mean_t) * (m - mean_m) for t, m in points)
    den = sum((t - mean_t) ** 2 for t, _ in points)
    return num / den * 600.0


def _slope_row(label: str, m: dict) -> Row:
    """The slope with its limit when the run was long enough to tell a leak from a plateau."""
    slope = _slope_mb_per_10min(m["scrapes"], m["start"], m["soaked"])
    if m["soaked"] >= SLOPE_FROM + SLOPE_WINDOW:
        return Row(f"{label}: RSS slope after {SLOPE_FROM:.0f} s", slope, unit="MB/10min", ceiling=SLOPE_LIMIT)
    return Row(f"{label}: RSS slope (too short to judge)", slope, unit="MB/10min")


def rows_of(label: str, m: dict) -> list[Row]:
    scrapes = m["scrapes"]
    durations = sorted(s["duration"] for s in scrapes)
    failed = [s for s in scrapes if any(v != 1 for k, v in s["success"].items() if k not in m["fixture_down"])]
    unexpected = [s for s in scrapes if s["late"] != "api-only" and (s["drift"] or s["pending"])]
    lates = m["lates"]
    return [
        Row(f"{label}: synced after", m["synced_after"]),
        Row(f"{label}: RSS at sync", m["rss_at_sync"] / 1e6, unit="MB"),
        Row(f"{label}: RSS at the end", scrapes[-1]["rss"] / 1e6, unit="MB"),
        _slope_row(label, m),
        Row(f"{label}: CPU over the soak", 100.0 * m["cpu"] / m["soaked"], unit="% core"),
        Row(f"{label}: CPU per endpoint change", m["cpu"] / max(1, len(m["changes"]) + len(lates)), unit="s"),
        Row(f"{label}: children's CPU (exec) at the end", scrapes[-1]["children_cpu"]),
        Row(f"{label}: endpoint changes applied", len(m["changes"]) + len(lates), unit="n"),
        Row(f"{label}: one change applied (API + rules), p50", statistics.median(m["changes"] or [0.0])),
        Row(f"{label}: scrape duration p50", statistics.median(durations)),
        Row(f"{label}: scrape duration max", durations[-1]),
        Row(f"{label}: log lines per minute", 60.0 * m["log_lines"] / m["soaked"], unit="/min"),
        Row(f"{label}: scrapes with a collector at success 0", len(failed), unit=f"of {len(scrapes)}"),
        Row(f"{label}: scrapes with drift and no late change", len(unexpected), unit=f"of {len(scrapes)}"),
        Row(f"{label}: late changes seen as drift", sum(1 for x in lates if x.get("seen")),
            unit=f"of {len(lates)}"),
        Row(f"{label}: late changes cleared after", sum(1 for x in lates if x.get("cleared")),
            unit=f"of {len(lates)}"),
    ]


def run(args) -> list[Row]:
    rows = []
    durations = QUICK if getattr(args, "quick", False) else FULL
    seconds = os.environ.get("KUBENODE_SOAK_SECONDS")
    sizes = os.environ.get("KUBENODE_SOAK_SERVICES")
    if sizes:
        durations = {int(n): durations.get(int(n), 60.0) for n in sizes.split(",")}
    if seconds:
        durations = {services: float(seconds) for services in durations}
    named = os.environ.get("KUBENODE_SOAK_MODES")
    modes = tuple(named.split(",")) if named else MODES
    if set(modes) - set(MODES):
        raise SystemExit(f"KUBENODE_SOAK_MODES: {','.join(sorted(set(modes) - set(MODES)))} not one of {MODES}")
    for services, duration in durations.items():
        for mode in modes:
            m = soak(services, mode, duration)
            rows += rows_of(f"{mode}, {services:,} svc x 5, {m['soaked']:.0f} s", m)
            for row in rows[-16:]:  # as it goes: a full run takes minutes
                print("   soak: " + str(row), file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main(run)
