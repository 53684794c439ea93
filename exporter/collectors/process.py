"""Collector ``process``: CPU, children's CPU and memory of the node's components.

For each component of ``process.components`` (kubelet, kube-proxy, kube-router by
default) the processes whose name (else command line) matches its regex are
summed. ``children_cpu_seconds_total`` is the CPU of children the component
waited for: a kube-router forking ``ipset``/``ip`` thousands of times shows
there, not in its own CPU (the first incident).

Reads ``--path.procfs`` (a DaemonSet mounts the host's /proc there, or shares
the host PID namespace).

A matching process whose stat or statm does not parse is left out of the sums and
counted in ``kubenode_process_unreadable_processes`` (logged once by the reader),
so the collector still succeeds with every other process's figures.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.collector import NAMESPACE, Collector, CollectorError, register
from exporter.readers.processes import Component, ProcessTracker, ProcfsError

SUMMED = " Summed over every process that matches the component; the sum drops when one exits."


@register
class ProcessCollector(Collector):
    name = "process"
    help = "CPU, children's CPU (exec storms) and RSS of kubelet, kube-proxy, kube-router"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        components = [Component.parse(c["name"], c["match"]) for c in ctx.settings["process.components"]]
        self.tracker = ProcessTracker(ctx.paths.procfs, components)

    def collect(self) -> Iterable[Metric]:
        try:
            sample = self.tracker.sample()
        except ProcfsError as err:
            raise CollectorError(str(err)) from None

        up = GaugeMetricFamily(
            f"{NAMESPACE}_process_up",
            "1 when at least one process of the component is running (read or not), else 0.",
            labels=["component"])
        count = GaugeMetricFamily(
            f"{NAMESPACE}_process_processes",
            "How many running processes match the component and are in its sums.",
            labels=["component"])
        unreadable = GaugeMetricFamily(
            f"{NAMESPACE}_process_unreadable_processes",
            "Processes matching the component whose /proc stat or statm did not parse: left out "
            "of its sums.",
            labels=["component"])
        cpu = CounterMetricFamily(
            f"{NAMESPACE}_process_cpu_seconds_total",
            "User and system CPU time of the component's processes." + SUMMED,
            labels=["component"])
        children = CounterMetricFamily(
            f"{NAMESPACE}_process_children_cpu_seconds_total",
            "User and system CPU time of the exited children the component's processes waited "
            "for (exec storms)." + SUMMED,
            labels=["component"])
        rss = GaugeMetricFamily(
            f"{NAMESPACE}_process_resident_memory_bytes",
            "Resident memory of the component's processes." + SUMMED,
            labels=["component"])
        for component, usages in sample.usages.items():
            skipped = len(sample.unreadable.get(component, {}))
            # An odd process is still a running one: the component is not down.
            up.add_metric([component], 1.0 if usages or skipped else 0.0)
            count.add_metric([component], float(len(usages)))
            unreadable.add_metric([component], float(skipped))
            if not usages:
                continue
            cpu.add_metric([component], sum(u.cpu_seconds for u in usages))
            children.add_metric([component], sum(u.children_cpu_seconds for u in usages))
            rss.add_metric([component], float(sum(u.rss_bytes for u in usages)))
        yield from (up, count, unreadable, cpu, children, rss)
