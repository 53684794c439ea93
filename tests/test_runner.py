"""The collector runner: per-collector success/duration, failure isolation, shared work."""

import threading
import time

from prometheus_client.core import GaugeMetricFamily

from exporter.collector import Collector, CollectorError, Runner, Unavailable
from tests.helpers import collector_threads, samples, scrape_within, value


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


# --- a stuck collector never stalls the scrape --------------------------------------------

class Stuck(Collector):
    """A collector whose read never returns until the test lets it go."""

    name = "stuck"

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def collect(self):
        self.calls += 1
        self.release.wait(timeout=60)
        yield GaugeMetricFamily("kubenode_test_stuck", "read at last", value=self.calls)

    def while_running(self):
        yield GaugeMetricFamily("kubenode_test_stuck_in_flight", "what is known meanwhile", value=1)


def test_a_stuck_collector_is_served_as_failed_within_the_deadline(caplog):
    caplog.set_level("INFO")
    stuck = Stuck()
    runner = Runner([stuck, Fixed(5.0)])
    runner.timeout = 0.5
    try:
        s = scrape_within(runner, 5)
        assert value(s, "kubenode_test_value") == 5.0, "the other collector's data is served"
        assert value(s, "kubenode_collector_success", collector="fixed") == 1.0
        assert value(s, "kubenode_collector_success", collector="stuck") == 0.0
        assert value(s, "kubenode_collector_duration_seconds", collector="stuck") >= 0.5
        assert value(s, "kubenode_test_stuck_in_flight") == 1.0, "while_running() is served"
        assert "still running after" in dict(runner.state())["stuck"].error
        # Later scrapes: the run still in flight is not started again (one thread, one read),
        # its elapsed time grows, and the scrape does not wait for it a second time.
        for _ in range(3):
            s2 = scrape_within(runner, 5)
        assert stuck.calls == 1
        assert len(collector_threads("stuck")) == 1
        assert value(s2, "kubenode_collector_success", collector="stuck") == 0.0
        assert (value(s2, "kubenode_collector_duration_seconds", collector="stuck")
                > value(s, "kubenode_collector_duration_seconds", collector="stuck"))
        overdue = [r for r in caplog.records if "still running" in r.getMessage()]
        assert len(overdue) == 1 and overdue[0].levelname == "WARNING", "said once"
    finally:
        stuck.release.set()
    # Once it returns, the next scrape starts a fresh run and it is healthy again.
    assert runner.slots[0].run.done.wait(timeout=5), "the released run returns"
    s = scrape_within(runner, 5)
    assert value(s, "kubenode_collector_success", collector="stuck") == 1.0
    assert stuck.calls == 2
    assert any("collector stuck recovered" in r.getMessage() for r in caplog.records)


class Meeting(Collector):
    """Succeeds only if its partner runs at the same time (both reach the barrier)."""

    def __init__(self, name, barrier):
        self.name = name
        self.barrier = barrier

    def collect(self):
        try:
            self.barrier.wait(timeout=2)
        except threading.BrokenBarrierError:
            raise CollectorError("ran alone: collectors run one after another") from None
        yield GaugeMetricFamily(f"kubenode_test_{self.name}", "met", value=1)


def test_collectors_run_side_by_side():
    barrier = threading.Barrier(2)
    runner = Runner([Meeting("a", barrier), Meeting("b", barrier)])
    s = scrape_within(runner, 10)
    assert value(s, "kubenode_collector_success", collector="a") == 1.0
    assert value(s, "kubenode_collector_success", collector="b") == 1.0


# --- said once -------------------------------------------------------------------------------

class Scripted(Collector):
    """Fails with the next exception of ``script`` (None: succeeds) on each run."""

    name = "scripted"

    def __init__(self, script):
        self.script = list(script)

    def collect(self):
        exc = self.script.pop(0)
        if exc is not None:
            raise exc
        yield GaugeMetricFamily("kubenode_test_ok", "ok", value=1)


def runner_logs(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "exporter.collector"]


def test_a_missing_feature_is_said_once_at_info(caplog):
    caplog.set_level("DEBUG")
    absent = Unavailable("no /proc/net/ip_vs: ip_vs module not loaded")
    runner = Runner([Scripted([absent] * 9)])
    for _ in range(9):
        s = samples(runner)
        assert value(s, "kubenode_collector_success", collector="scripted") == 0.0
    logs = runner_logs(caplog)
    assert len(logs) == 1, logs
    assert logs[0][0] == "INFO" and "ip_vs module not loaded" in logs[0][1]


def test_a_failure_is_said_when_its_reason_changes_and_when_it_recovers(caplog):
    caplog.set_level("INFO")
    a, b = CollectorError("reason a"), CollectorError("reason b")
    runner = Runner([Scripted([a, a, a, b, b, None, None, a])])
    for _ in range(8):
        samples(runner)
    assert runner_logs(caplog) == [
        ("ERROR", "collector scripted failed: reason a"),
        ("ERROR", "collector scripted failed: reason b"),
        ("INFO", "collector scripted recovered (its run took "
                 + runner_logs(caplog)[2][1].split("took ")[1]),
        ("ERROR", "collector scripted failed: reason a"),
    ]


def test_closing_the_context_closes_the_dataplanes_sockets():
    """A shared dataplane reader has close(), not stop(): its netlink sockets (the
    iptables-nft source's requests and its change feed) are released at shutdown."""
    from exporter.readers.dataplanes import shared_iptables
    from tests.helpers import make_runner
    from tests.ipt_rulesets import IptNS, bench_services, ruleset

    with IptNS() as ns:
        ns.restore(ruleset(bench_services(3, 2), 4))
        _, ctx = make_runner([])
        dataplane = shared_iptables(ctx)
        live = ns.run(lambda: dataplane.read_rules(0))
        assert live.backend == "nft" and live.read.table
        sockets = [sock for sock in (dataplane.nft._feed, dataplane.nft._nl) if sock is not None]
        assert len(sockets) == 2
        ctx.close()
        assert all(getattr(sock, "sock", sock).fileno() == -1 for sock in sockets)
