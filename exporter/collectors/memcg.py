"""Collector ``memcg``: how long memory.stat takes to read, and live vs dying memory cgroups.

The second incident: kubelet (cAdvisor) burning a core because every read of
memory.stat took seconds, since thousands of removed-but-not-freed ("dying")
memory cgroups were still walked. This collector reads memory.stat the way
cAdvisor does (one full read) for the root, the kubelet's pods cgroup and any
configured cgroup, and counts the dying cgroups that cause the slowness.

Each path is read at most once per run; the Runner runs this collector once at
a time and lets overlapping scrapes share a run, so two Prometheus servers never
double the cost. A path is read again only READ_SPACING times its last read time
later (``cgroups.StatReads``; until then its last figures are served): the slower
memory.stat gets, the less often the exporter pays for it.

A read that never returns (the runner's deadline passes) stays visible:
``while_running()`` serves its elapsed seconds as the read time, with
``kubenode_memcg_stat_read_in_flight`` 1, while the run goes on alone.

Failures: no memory hierarchy at all is an error. A missing pods cgroup is not
(a node without kubelet pods yet): no series, a debug log. A memory.stat that
cannot be read, a configured cgroup that does not exist, or an unreadable
/proc/cgroups is an error naming the path, but only after every figure that
could be read has been yielded: success is 0 and the rest is still served.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collector import NAMESPACE, Collector, CollectorError, register
from exporter.readers import cgroups

log = logging.getLogger("exporter.collectors.memcg")


def cgroup_label(root: str, path: str) -> str:
    """``/`` for the root, ``/kubepods.slice`` for a child: the path inside the hierarchy."""
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


def configured_cgroup(root: str, given: str) -> str:
    """A ``memcg.paths`` entry (relative to the memory root; a leading / is allowed)."""
    rel = os.path.normpath(given.strip("/") or ".")
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise CollectorError(f"memcg.paths entry {given!r} leaves the memory hierarchy")
    return os.path.normpath(os.path.join(root, rel))


def read_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    seconds = GaugeMetricFamily(
        f"{NAMESPACE}_memcg_stat_read_seconds",
        "How long the last full read of this cgroup's memory.stat took (what cAdvisor "
        "pays on every housekeeping pass); for a read still running, how long so far.",
        labels=["cgroup"])
    size = GaugeMetricFamily(
        f"{NAMESPACE}_memcg_stat_read_bytes",
        "Bytes read in the last full read of this cgroup's memory.stat.",
        labels=["cgroup"])
    in_flight = GaugeMetricFamily(
        f"{NAMESPACE}_memcg_stat_read_in_flight",
        "1 while a read of this cgroup's memory.stat has not returned (read_seconds then "
        "counts its seconds so far).",
        labels=["cgroup"])
    return seconds, size, in_flight


@register
class MemcgCollector(Collector):
    name = "memcg"
    help = "memory.stat read time and live/dying memory cgroups (cgroup v1 and v2)"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.reads = cgroups.StatReads()
        # label -> memory.stat path of the run in progress (or the last), for while_running()
        self._stat_paths: dict[str, str] = {}

    def while_running(self) -> Iterable[Metric]:
        """The read times known while a run is past the deadline: the read in flight
        with its seconds so far, the others as last read."""
        running = self.reads.in_flight()
        last = self.reads.last()
        seconds, size, in_flight = read_families()
        for label, path in self._stat_paths.items():
            if path in running:
                seconds.add_metric([label], running[path])
                in_flight.add_metric([label], 1.0)
            elif path in last:
                seconds.add_metric([label], last[path].seconds)
                size.add_metric([label], float(last[path].size))
                in_flight.add_metric([label], 0.0)
        return [seconds, size, in_flight]

    def collect(self) -> Iterable[Metric]:
        try:
            hierarchy = cgroups.detect_memory_hierarchy(self.ctx.paths)
        except cgroups.CgroupError as err:
            raise CollectorError(str(err)) from None
        root = hierarchy.root
        errors: list[str] = []

        # label -> absolute path, in a stable order; one entry per distinct
        # cgroup so each memory.stat is read once even if named twice.
        targets: dict[str, str] = {"/": root}
        pods = cgroups.find_pods_cgroup(root)
        if pods is None:
            log.debug("no kubepods or kubepods.slice cgroup under %s", root)
        else:
            targets[cgroup_label(root, pods)] = pods
        for given in self.ctx.settings["memcg.paths"]:
            try:
                path = configured_cgroup(root, given)
            except CollectorError as err:
                errors.append(str(err))
                continue
            if not os.path.isdir(path):
                errors.append(f"configured memory cgroup {path} does not exist")
                continue
            targets.setdefault(cgroup_label(root, path), path)

        info = GaugeMetricFamily(
            f"{NAMESPACE}_memcg_hierarchy_info",
            "The memory cgroup hierarchy in use: cgroup version and the kubelet's pods cgroup "
            "found under it (empty when there is none).",
            labels=["version", "pods_cgroup"])
        info.add_metric([str(hierarchy.version), cgroup_label(root, pods) if pods else ""], 1.0)
        yield info

        stat_paths = {label: os.path.join(path, "memory.stat") for label, path in targets.items()}
        self._stat_paths = stat_paths
        self.reads.keep_only(stat_paths.values())
        seconds, size, in_flight = read_families()
        for label, stat_path in stat_paths.items():
            try:
                result = self.reads.read(stat_path)
            except cgroups.CgroupError as err:
                errors.append(str(err))
                continue
            seconds.add_metric([label], result.seconds)
            size.add_metric([label], float(result.size))
            in_flight.add_metric([label], 0.0)
        yield seconds
        yield size
        yield in_flight

        try:
            counts = cgroups.count_memory_cgroups(self.ctx.paths, hierarchy)
        except cgroups.CgroupError as err:
            errors.append(str(err))
        else:
            state = GaugeMetricFamily(
                f"{NAMESPACE}_memcg_cgroups",
                "Memory cgroups by state: live (directories, the root included) or dying "
                "(removed, still held by charged memory; v1: /proc/cgroups minus live, "
                "v2: nr_dying_descendants).",
                labels=["state"])
            state.add_metric(["live"], float(counts.live))
            state.add_metric(["dying"], float(counts.dying))
            yield state

        if errors:
            raise CollectorError("; ".join(errors))
