"""The collector runner: per-collector success/duration, failure isolation, shared work."""

import threading
import time

from prometheus_client.core import GaugeMetricFamily

from exporter.collector import Collector, CollectorError, Runner
from tests.helpers import samples, value


class Fixed(Collector):
    name = "fixed"

    def __init__(self, value=1.0):
        self.value = value
        self.calls = 0

    def collect(self):
        self.calls += 1
        yield GaugeMetricFamily("kubenode_test_value", "a test value", value=self.value)


class Failing(Collector):
    name = "failing"

    def __init__(self, exc):
        self.exc = exc

    def collect(self):
        yield GaugeMetricFamily("kubenode_test_partial", "emitted before the failure", value=1)
        raise self.exc


def test_success_and_duration_per_collector():
    runner = Runner([Fixed(7.0)])
    s = samples(runner)
    assert value(s, "kubenode_test_value") == 7.0
    assert value(s, "kubenode_collector_success", collector="fixed") == 1.0
    assert value(s, "kubenode_collector_duration_seconds", collector="fixed") >= 0.0


def test_one_failing_collector_does_not_hide_others(caplog):
    runner = Runner([Failing(CollectorError("no /proc/net/ip_vs: ip_vs module not loaded")),
                     Failing(KeyError("boom")), Fixed(3.0)])
    runner.slots[1].collector.name = "buggy"
    s = samples(runner)
    assert value(s, "kubenode_collector_success", collector="failing") == 0.0
    assert value(s, "kubenode_collector_success", collector="buggy") == 0.0
    assert value(s, "kubenode_collector_success", collector="fixed") == 1.0
    assert value(s, "kubenode_test_value") == 3.0
    # An expected failure keeps what was yielded before it; a bug drops it.
    assert value(s, "kubenode_test_partial") == 1.0
    buggy_only = samples(Runner([Failing(KeyError("boom"))]))
    assert value(buggy_only, "kubenode_test_partial") is None
    assert "ip_vs module not loaded" in caplog.text
    assert "collector buggy failed unexpectedly" in caplog.text


class Slow(Collector):
    name = "slow"

    def __init__(self):
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def collect(self):
        with self.lock:
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        time.sleep(0.3)
        with self.lock:
            self.running -= 1
        yield GaugeMetricFamily("kubenode_test_slow", "slow", value=self.calls)


def test_overlapping_scrapes_share_one_run():
    slow = Slow()
    runner = Runner([slow])
    results = []
    threads = [threading.Thread(target=lambda: results.append(samples(runner))) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert slow.max_running == 1, "two scrapes ran the same collector at once"
    # The ones that arrived while it ran waited for that run and reused its result
    # (it finished after they asked, so it is fresh for them).
    assert slow.calls == 1
    assert len(results) == 4
    # A scrape that starts after a run finished never reuses it.
    before = slow.calls
    samples(runner)
    assert slow.calls == before + 1
