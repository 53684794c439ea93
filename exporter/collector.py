"""The collector interface and the runner that wraps every enabled collector.

A collector is one small class per data source (``exporter/collectors/<name>.py``)
that registers itself with ``@register``. Its ``collect()`` yields fresh metric
families each call (client_python's custom-collector pattern; no global
registry). The ``Runner`` is the one object handed to the HTTP layer: it runs
each enabled collector, and for each emits ``kubenode_collector_success`` and
``kubenode_collector_duration_seconds``, so a failing collector never fails the
scrape or hides the others.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.config import Settings
from exporter.paths import Paths

log = logging.getLogger("exporter.collector")

NAMESPACE = "kubenode"


class CollectorError(Exception):
    """An expected failure (missing file, no kernel support, bad input).

    The runner logs its message as it is, without a traceback, and marks the
    collector down for this scrape. Metric families the collector yielded
    before raising are still served (as node_exporter does), so a collector
    can say what it knows and then fail.
    """


@dataclass
class Context:
    """What a collector may use: settings, the /proc and /sys roots, shared services."""

    settings: Settings
    paths: Paths
    # Long-lived shared services (the Kubernetes watch, the live IPVS reader)
    # keyed by name, created once on first use by whichever collector needs them.
    services: dict[str, object] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def service(self, name: str, factory: Callable[[], object]) -> object:
        with self._lock:
            if name not in self.services:
                self.services[name] = factory()
            return self.services[name]

    def close(self) -> None:
        for svc in self.services.values():
            stop = getattr(svc, "stop", None)
            if callable(stop):
                try:
                    stop()
                except Exception:  # noqa: BLE001 - shutting down; nothing to do but log
                    log.exception("stopping %r failed", svc)


class Collector:
    """Base class. Subclasses set ``name`` and implement ``collect``."""

    name: ClassVar[str]
    default_enabled: ClassVar[bool] = True
    help: ClassVar[str] = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterable[Metric]:
        raise NotImplementedError

    def close(self) -> None:
        """Release long-lived resources (sockets, threads)."""


COLLECTORS: dict[str, type[Collector]] = {}


def register(cls: type[Collector]) -> type[Collector]:
    if cls.name in COLLECTORS and COLLECTORS[cls.name] is not cls:
        raise RuntimeError(f"collector {cls.name!r} registered twice")
    COLLECTORS[cls.name] = cls
    return cls


def load_collectors() -> dict[str, type[Collector]]:
    """Import every module of ``exporter.collectors`` so each registers itself."""
    import importlib
    import pkgutil

    import exporter.collectors as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return COLLECTORS


@dataclass
class Outcome:
    metrics: list[Metric]
    success: bool
    duration: float
    finished: float  # monotonic time the collection ended
    error: str = ""


class _Slot:
    """One collector plus what keeps two scrapes from running it at once."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.lock = threading.Lock()
        self.last: Outcome | None = None


class Runner:
    """The single custom collector registered with the HTTP layer's registry.

    Scrapes that overlap share work: a scrape that finds a collector already
    running waits for it and reuses that result, if it finished after this
    scrape began. So an expensive read (a slow memory.stat) is done at most
    once at a time, never doubled by two Prometheus servers scraping together.
    """

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.slots = [_Slot(c) for c in collectors]

    @property
    def collectors(self) -> list[Collector]:
        return [s.collector for s in self.slots]

    def state(self) -> list[tuple[str, Outcome | None]]:
        return [(s.collector.name, s.last) for s in self.slots]

    def _run(self, slot: _Slot, asked_at: float) -> Outcome:
        with slot.lock:
            if slot.last is not None and slot.last.finished >= asked_at:
                return slot.last
            start = time.monotonic()
            name = slot.collector.name
            metrics: list[Metric] = []
            try:
                metrics.extend(slot.collector.collect())
                outcome = Outcome(metrics, True, 0.0, 0.0)
            except CollectorError as err:
                # An expected failure: what the collector yielded before raising is
                # kept (e.g. kubenode_proxy_up 0 before "garbage metrics page").
                log.error("collector %s failed: %s", name, err)
                outcome = Outcome(metrics, False, 0.0, 0.0, str(err))
            except Exception as err:  # noqa: BLE001 - one collector must never fail the scrape
                # A bug: partial families may be half-built, so none are served.
                log.exception("collector %s failed unexpectedly", name)
                outcome = Outcome([], False, 0.0, 0.0, f"{type(err).__name__}: {err}")
            outcome.finished = time.monotonic()
            outcome.duration = outcome.finished - start
            slot.last = outcome
            return outcome

    def collect(self) -> Iterator[Metric]:
        asked_at = time.monotonic()
        success = GaugeMetricFamily(
            f"{NAMESPACE}_collector_success",
            "1 when the collector's last run succeeded, 0 when it failed.",
            labels=["collector"])
        duration = GaugeMetricFamily(
            f"{NAMESPACE}_collector_duration_seconds",
            "How long the collector's run for this scrape took.",
            labels=["collector"])
        for slot in self.slots:
            outcome = self._run(slot, asked_at)
            yield from outcome.metrics
            success.add_metric([slot.collector.name], 1.0 if outcome.success else 0.0)
            duration.add_metric([slot.collector.name], outcome.duration)
        yield success
        yield duration

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot.collector.close()
            except Exception:  # noqa: BLE001
                log.exception("closing collector %s failed", slot.collector.name)


def build_collectors(ctx: Context) -> list[Collector]:
    """Instantiate every enabled collector, in name order.

    A collector whose constructor fails is replaced by one that reports it
    down on every scrape, so the failure stays visible in the metrics.
    """
    out: list[Collector] = []
    for name, cls in sorted(load_collectors().items()):
        if not ctx.settings.collector_enabled(name):
            continue
        try:
            out.append(cls(ctx))
        except Exception as err:  # noqa: BLE001
            log.error("collector %s could not start: %s", name, err)
            out.append(_broken(name, f"could not start: {err}")(ctx))
    return out


def _broken(collector_name: str, reason: str) -> type[Collector]:
    class Broken(Collector):
        name = collector_name

        def collect(self) -> Iterable[Metric]:
            raise CollectorError(reason)

    return Broken
