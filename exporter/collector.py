"""The collector interface and the runner that wraps every enabled collector.

A collector is one small class per data source (``exporter/collectors/<name>.py``)
that registers itself with ``@register``. Its ``collect()`` yields fresh metric
families each call (client_python's custom-collector pattern; no global
registry). The ``Runner`` is the one object handed to the HTTP layer: it runs
each enabled collector, side by side under a deadline (``--scrape.timeout``), and
for each emits ``kubenode_collector_success`` and
``kubenode_collector_duration_seconds``, so a failing or stuck collector never
fails the scrape or hides the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.config import DEFAULT_SCRAPE_TIMEOUT, Option, Settings
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


class Unavailable(CollectorError):
    """What the collector reads does not exist on this node (ip_vs not loaded, no
    Kubernetes API configured): not a fault of the exporter or the node.

    Reported as ``kubenode_collector_success 0`` like any failure, but logged at
    INFO, as node_exporter treats an absent kernel feature, not as an ERROR.
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
        """Stop every shared service: ``stop()`` (the watches, their threads) or else
        ``close()`` (the dataplane readers' netlink sockets)."""
        for svc in self.services.values():
            end = getattr(svc, "stop", None)
            if not callable(end):
                end = getattr(svc, "close", None)
            if callable(end):
                try:
                    end()
                except Exception:  # noqa: BLE001 - shutting down; nothing to do but log
                    log.exception("stopping %r failed", svc)


class Collector:
    """Base class. Subclasses set ``name`` and implement ``collect``."""

    name: ClassVar[str]
    default_enabled: ClassVar[bool] = True
    help: ClassVar[str] = ""
    # Options of this collector, declared beside it (flags and config keys like any other).
    options: ClassVar[tuple[Option, ...]] = ()
    # Earlier names whose --collector.<old> flag still enables or disables it.
    old_names: ClassVar[tuple[str, ...]] = ()
    # The proxy modes whose dataplane it reads (empty: any node). On a node running
    # another mode it is off: not run, no series at all, so nothing to alert on.
    proxy_modes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def active(self) -> bool:
        """Whether this node runs a dataplane this collector reads (asked every scrape)."""
        if not self.proxy_modes:
            return True
        from exporter.proxymode import shared_proxy_mode

        return shared_proxy_mode(self.ctx).current() in self.proxy_modes

    def collect(self) -> Iterable[Metric]:
        raise NotImplementedError

    def while_running(self) -> Iterable[Metric]:
        """What a scrape can serve while ``collect()`` is past the deadline in its own
        thread (memcg: how long the memory.stat read in flight has taken so far).

        Called from another thread than ``collect()``: it must not block nor read
        anything slow; it only reports state the collector keeps. Default: nothing.
        """
        return ()

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
    finished: float  # monotonic time the collection ended (for a run still going: when it was looked at)
    error: str = ""


# The runner says a collector's state once per change (node_exporter style): a missing
# feature at INFO, a run past the deadline at WARNING, a failure at ERROR. This is the
# state "past the deadline" (the others are a failure's reason, or None when healthy).
_OVERDUE = "overdue"


class _Run:
    """One run of one collector, done by that collector's worker thread, so a read that
    never returns holds that thread only: the scrape waits for it until the deadline."""

    def __init__(self, collector: Collector, on_done: Callable[["_Run"], None]) -> None:
        self.collector = collector
        self.started = time.monotonic()
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self.level = logging.INFO  # of the failure, for the log
        self.trace: Exception | None = None  # the exception of a bug, for its traceback
        self._on_done = on_done

    def execute(self) -> None:
        metrics: list[Metric] = []
        trace = None
        try:
            metrics.extend(self.collector.collect())
            outcome = Outcome(metrics, True, 0.0, 0.0)
        except Unavailable as err:
            outcome = Outcome(metrics, False, 0.0, 0.0, str(err))
        except CollectorError as err:
            # An expected failure: what the collector yielded before raising is
            # kept (e.g. kubenode_proxy_up 0 before "garbage metrics page").
            self.level = logging.ERROR
            outcome = Outcome(metrics, False, 0.0, 0.0, str(err))
        except Exception as err:  # noqa: BLE001 - one collector must never fail the scrape
            # A bug: partial families may be half-built, so none are served.
            self.level = logging.ERROR
            trace = err
            outcome = Outcome([], False, 0.0, 0.0, f"{type(err).__name__}: {err}")
        outcome.finished = time.monotonic()
        outcome.duration = outcome.finished - self.started
        self.trace = trace
        self.outcome = outcome
        try:
            self._on_done(self)
        finally:
            self._on_done = None
            self.done.set()


def _work(runs: queue.SimpleQueue) -> None:
    while True:
        run = runs.get()
        if run is None:
            return
        run.execute()
        del run  # holds the slot (through its on_done): let a dropped Runner's slot go


class _Slot:
    """One collector, its worker thread, its run in flight or last finished, and what
    the log last said of it.

    The worker lives as long as the slot (started on the first run): handing it a run
    costs a queue put, where starting a thread per run cost a thread start per
    collector per scrape. One worker is enough: no run is handed to it while one is
    in flight.
    """

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.lock = threading.Lock()
        self.run: _Run | None = None
        self.last: Outcome | None = None  # what the last scrape served
        self.said: tuple[str, str] | None = None  # (kind, reason) last logged; None: healthy
        self._runs: queue.SimpleQueue | None = None

    def start(self, run: _Run) -> None:
        """Hand ``run`` to the worker (under ``lock``, with no run in flight)."""
        if self._runs is None:
            self._runs = queue.SimpleQueue()
            threading.Thread(target=_work, args=(self._runs,), name=f"collector-{self.collector.name}",
                             daemon=True).start()
            # The worker holds the queue, not the slot: when the slot goes, it ends too.
            weakref.finalize(self, self._runs.put, None)
        self.run = run
        self._runs.put(run)


class Runner:
    """The single custom collector registered with the HTTP layer's registry.

    Each scrape runs every collector side by side, each in its own worker thread,
    and waits for each at most ``timeout`` seconds from the start of its run: a scrape
    takes as long as the slowest collector, and never longer than the deadline.
    A collector past the deadline is served as failed (success 0, the reason, and
    whatever its ``while_running()`` can say) and keeps running on its own; no
    second run of it starts until it returns, so a read that hangs holds one
    thread, not one per scrape.

    Scrapes that overlap share work: a scrape that finds a collector running
    joins that run, and reuses a run that finished after this scrape began. So
    an expensive read (a slow memory.stat) is done at most once at a time, never
    doubled by two Prometheus servers scraping together.

    The log says a collector's failure once, when its reason changes, and once
    when it recovers; not on every scrape.
    """

    def __init__(self, collectors: Iterable[Collector], timeout: float = DEFAULT_SCRAPE_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError(f"collector deadline must be positive, not {timeout!r}")
        self.slots = [_Slot(c) for c in collectors]
        self.timeout = timeout

    @property
    def collectors(self) -> list[Collector]:
        return [s.collector for s in self.slots]

    def state(self) -> list[tuple[str, Outcome | None]]:
        return [(s.collector.name, s.last) for s in self.slots]

    def _start_or_join(self, slot: _Slot, asked_at: float) -> _Run:
        with slot.lock:
            run = slot.run
            if run is not None and (not run.done.is_set() or run.outcome.finished >= asked_at):
                return run  # still running (never a second run), or finished after this scrape asked
            slot.start(_Run(slot.collector, lambda finished: self._said(slot, finished)))
            return slot.run

    def _said(self, slot: _Slot, run: _Run) -> None:
        """Log the end of a run if it changes what the log last said of this collector."""
        outcome = run.outcome
        name = slot.collector.name
        with slot.lock:
            before = slot.said
            slot.said = None if outcome.success else ("failed", outcome.error)
        if outcome.success:
            if before is not None:
                log.info("collector %s recovered (its run took %.3fs)", name, outcome.duration,
                         extra={"collector": name})
            return
        if before == slot.said:
            return
        if run.level == logging.INFO:
            log.info("collector %s unavailable on this node: %s (kubenode_collector_success 0; "
                     "said again only if that changes)", name, outcome.error, extra={"collector": name})
        elif run.trace is not None:
            log.error("collector %s failed unexpectedly: %s", name, outcome.error, extra={"collector": name},
                      exc_info=(type(run.trace), run.trace, run.trace.__traceback__))
        else:
            log.error("collector %s failed: %s", name, outcome.error, extra={"collector": name})

    def _overdue(self, slot: _Slot, run: _Run) -> Outcome:
        """A run past its deadline, as this scrape serves it."""
        if run.outcome is not None:
            return run.outcome  # it ended just now, after all
        now = time.monotonic()
        elapsed = now - run.started
        name = slot.collector.name
        reason = (f"still running after {elapsed:.1f}s, past the {self.timeout:g}s deadline "
                  f"(scrape.timeout); no new run until it returns")
        try:
            metrics = list(slot.collector.while_running())
        except Exception:  # noqa: BLE001 - a bug there must not fail the scrape
            log.exception("collector %s: while_running failed", name)
            metrics = []
        with slot.lock:
            first = slot.said is None or slot.said[0] != _OVERDUE
            if first:
                slot.said = (_OVERDUE, "")
        if first:
            log.warning("collector %s still running after %.1fs, past the %gs deadline (scrape.timeout): "
                        "served as failed until it returns", name, elapsed, self.timeout,
                        extra={"collector": name})
        return Outcome(metrics, False, elapsed, now, reason)

    def collect(self) -> Iterator[Metric]:
        asked_at = time.monotonic()
        success = GaugeMetricFamily(
            f"{NAMESPACE}_collector_success",
            "1 when the collector's last run succeeded, 0 when it failed or is past the deadline.",
            labels=["collector"])
        duration = GaugeMetricFamily(
            f"{NAMESPACE}_collector_duration_seconds",
            "How long the collector's run for this scrape took (so far, for a run past the deadline).",
            labels=["collector"])
        # Every run is started before any is waited for: side by side, not one after another.
        # A collector of another proxy mode than this node's is off: not run, no series.
        runs = [(slot, self._start_or_join(slot, asked_at)) for slot in self.slots if slot.collector.active()]
        for slot, run in runs:
            finished = run.done.wait(max(0.0, run.started + self.timeout - time.monotonic()))
            outcome = run.outcome if finished else self._overdue(slot, run)
            slot.last = outcome
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
