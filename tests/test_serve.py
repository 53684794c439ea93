"""The real command, started as a process: /metrics, /healthz, the landing page, exit codes."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import get, samples, value
from tests.logfmt import parse_lines
from tests.memcg_fixtures import StuckFifo, v1_tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def exporter(tmp_path):
    procs = []

    def start(*args):
        port = free_port()
        cmd = [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig")})
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exporter exited {proc.returncode}: {proc.stderr.read()}")
            try:
                if get(base + "/healthz", timeout=1)[0] == 200:
                    return base, proc
            except OSError:
                time.sleep(0.1)
        raise AssertionError("exporter did not come up in 15 s")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_serves_metrics_health_and_landing_page(exporter):
    base, proc = exporter()
    status, headers, body = get(base + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    s = samples(body.decode())
    names = {name for name, _ in s}
    assert "kubenode_collector_success" in names or not any(n.startswith("kubenode_") for n in names)
    status, _, body = get(base + "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, _, body = get(base + "/")
    assert status == 200 and b"kubenode-exporter" in body and b"/metrics" in body
    assert get(base + "/nope")[0] == 404


def test_openmetrics_when_asked(exporter):
    base, _ = exporter()
    status, headers, body = get(base + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_sigterm_stops_cleanly(exporter):
    _, proc = exporter()
    proc.terminate()
    assert proc.wait(timeout=10) == 0


def test_bad_listen_address_exits_2():
    out = subprocess.run([sys.executable, "-m", "exporter", "--web.listen-address", "nowhere"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "not HOST:PORT" in out.stderr and "Traceback" not in out.stderr


def test_unknown_flag_exits_2():
    out = subprocess.run([sys.executable, "-m", "exporter", "--no-such-flag"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2


# --- a stuck read never stalls the scrape; what the node lacks is said once ------------------

def fifo_opens_waiting(pid: int) -> int:
    """Threads of ``pid`` blocked opening a FIFO that has no writer (the kernel's wchan)."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as fh:
                count += fh.read() == "wait_for_partner"
        except FileNotFoundError:
            pass  # that thread ended
    return count


def stop_and_read_log(proc) -> str:
    proc.terminate()
    proc.wait(timeout=10)
    return proc.stderr.read()


def test_a_memory_stat_that_never_returns_does_not_stall_the_scrape(exporter, tmp_path):
    # The root memory.stat is a FIFO nobody writes: its read never returns.
    sysfs, procfs = v1_tree(tmp_path, ["kubepods"], 2)
    fifo = StuckFifo(sysfs / "fs/cgroup/memory/memory.stat")
    # Wide enough that a later scrape on a loaded 2-core CI machine stays under it, unless it
    # waits for the stuck read again (then it takes the whole deadline).
    deadline = 3.0
    base, proc = exporter("--path.sysfs", str(sysfs), "--scrape.timeout", str(deadline))
    try:
        elapsed, reads, reads_waiting = [], [], []
        for _ in range(4):
            start = time.monotonic()
            status, _, body = get(base + "/metrics", timeout=20)
            elapsed.append(time.monotonic() - start)
            assert status == 200
            s = samples(body.decode())
            assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
            assert value(s, "kubenode_memcg_stat_read_in_flight", cgroup="/") == 1.0
            reads.append(value(s, "kubenode_memcg_stat_read_seconds", cgroup="/"))
            # every other collector's data is there
            assert value(s, "kubenode_collector_success", collector="process") == 1.0
            assert value(s, "kubenode_process_up", component="kubelet") is not None
            reads_waiting.append(fifo_opens_waiting(proc.pid))
        # Each answer within the deadline (wide bounds: a hang check, not a cost test);
        # later scrapes do not wait for the stuck run again.
        assert elapsed[0] < deadline + 3, elapsed
        assert max(elapsed[1:]) < deadline, elapsed
        assert reads == sorted(reads) and reads[0] >= deadline - 0.5, "the read's elapsed time, growing"
        assert reads_waiting == [1, 1, 1, 1], f"one stuck read, never a second: {reads_waiting}"
    finally:
        fifo.release()
    log = stop_and_read_log(proc)
    records = parse_lines(log, "logfmt")
    overdue = [r for r in records if "still running" in r["msg"]]
    assert len(overdue) == 1 and overdue[0]["level"] == "WARN" and overdue[0]["collector"] == "memcg"


def test_missing_ip_vs_and_api_are_said_once(exporter):
    # This host has no ip_vs module and the exporter no Kubernetes API.
    base, proc = exporter("--log.format", "json", "--proxy-mode", "ipvs")
    for _ in range(9):
        s = samples(get(base + "/metrics")[2].decode())
        assert value(s, "kubenode_collector_success", collector="ipvs") == 0.0
        assert value(s, "kubenode_collector_success", collector="drift") == 0.0
    records = parse_lines(stop_and_read_log(proc), "json")
    about = {name: [r for r in records if r.get("collector") == name] for name in ("ipvs", "drift")}
    assert len(about["ipvs"]) == 1 and about["ipvs"][0]["level"] == "INFO", about["ipvs"]
    assert "ip_vs module not loaded" in about["ipvs"][0]["msg"]
    assert len(about["drift"]) == 1, about["drift"]
    assert not [r for r in records if r["level"] == "ERROR" and "module not loaded" in r["msg"]]
