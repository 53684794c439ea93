"""The real command, started as a process: /metrics, /healthz, the landing page, exit codes."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import get, samples


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
