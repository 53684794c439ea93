"""The exporter's own metrics: what it costs the node, and which build runs.

Always on, not behind a ``--collector.*`` flag (node_exporter serves its own
``process_*``, ``go_*`` and ``node_exporter_build_info`` the same way): they are
how a user checks this exporter's cost, so they must not be switched off with a
collector. They are registered on the HTTP layer's own registry, never on
prometheus_client's global one.

- ``process_*`` (client_python's ProcessCollector): CPU, resident and virtual
  memory, start time, open and maximum file descriptors of this process.
- ``python_info`` and ``python_gc_*`` (client_python's platform and gc
  collectors): constant or a few counters, nothing read from disk.
- ``kubenode_exporter_build_info{version,python_version,python_implementation}``,
  1, as ``node_exporter_build_info``.
"""

from __future__ import annotations

import platform
from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from exporter import __version__
from exporter.collector import NAMESPACE

# The exporter's own /proc, never --path.procfs. --path.procfs is the node's /proc
# (a DaemonSet mounts the host's there) and is for the node's processes: in a
# container with its own PID namespace the exporter's PID (os.getpid()) names some
# other host process under the host's /proc, and a fixture tree or a copy given as
# --path.procfs has no `self` of ours at all. /proc/self of the procfs in the
# exporter's own mount namespace is always this process, with or without hostPID.
OWN_PROCFS = "/proc"


class BuildInfoCollector:
    """``kubenode_exporter_build_info``: 1, labelled with what was built and what runs it."""

    def __init__(self) -> None:
        self.labels = {
            "version": __version__,
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
        }

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            f"{NAMESPACE}_exporter_build_info",
            "Always 1; the labels say which kubenode-exporter version runs, on which Python.",
            labels=list(self.labels))
        info.add_metric(list(self.labels.values()), 1.0)
        yield info


def register_own_metrics(registry: CollectorRegistry, procfs: str = OWN_PROCFS) -> None:
    """Put the exporter's own metrics on ``registry`` (the one /metrics serves)."""
    ProcessCollector(proc=procfs, registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BuildInfoCollector())
