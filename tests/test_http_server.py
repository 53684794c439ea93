"""The HTTP server over real sockets: the name[] filter, Prometheus 3's Accept header, and a
server that holds up (listen backlog, silent and slow clients, connection bound, HEAD,
malformed request lines)."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.parse

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from exporter.collector import Collector, CollectorError, Runner
from exporter.http import MetricsServer, make_app
from tests.helpers import get, samples


class _Families(Collector):
    """A collector of fixed families, without settings (the Runner needs only name and collect)."""

    def __init__(self, name: str, families, error: str = "") -> None:  # noqa: D107 - no ctx needed
        self.name, self.families, self.error = name, families, error

    def collect(self):
        yield from self.families
        if self.error:
            raise CollectorError(self.error)


def _runner() -> Runner:
    entries = GaugeMetricFamily("kubenode_ipset_entries", "Entries.", labels=["set", "type"])
    entries.add_metric(["KUBE-CLUSTER-IP", "hash:ip,port"], 12)
    sets = GaugeMetricFamily("kubenode_ipset_sets", "Sets.", value=3)
    sync = HistogramMetricFamily("kubenode_proxy_sync_duration_seconds", "Sync.", labels=["proxy"])
    sync.add_metric(["kube-proxy"], [("0.1", 2), ("+Inf", 3)], 0.5)
    cpu = CounterMetricFamily("kubenode_process_cpu_seconds", "CPU.", labels=["component"])
    cpu.add_metric(["kubelet"], 7.5)
    return Runner([_Families("ipset", [entries, sets]), _Families("proxy", [sync]),
                   _Families("process", [cpu], error="no kubelet")])


@pytest.fixture
def server():
    servers = []

    def start(app=None, **kwargs) -> MetricsServer:
        srv = MetricsServer(app or make_app(_runner()), "127.0.0.1:0", **kwargs)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def _names(body: bytes) -> set[str]:
    return {name for name, _ in samples(body.decode())}


# -- item 5: name[] ---------------------------------------------------------------------

def _filtered(srv: MetricsServer, *names: str, headers: dict | None = None) -> bytes:
    query = urllib.parse.urlencode([("name[]", n) for n in names])
    status, _, body = get(f"http://127.0.0.1:{srv.port}/metrics?{query}", headers)
    assert status == 200
    return body


def test_name_filter_returns_the_named_families(server):
    srv = server()
    assert _names(_filtered(srv, "kubenode_ipset_entries")) == {"kubenode_ipset_entries"}
    # The runner's own families are filterable too, and keep every collector's series.
    body = _filtered(srv, "kubenode_collector_success", "kubenode_ipset_sets")
    assert _names(body) == {"kubenode_collector_success", "kubenode_ipset_sets"}
    s = samples(body.decode())
    assert s[("kubenode_collector_success", (("collector", "process"),))] == 0.0
    assert s[("kubenode_collector_success", (("collector", "ipset"),))] == 1.0
    # A histogram or a counter asked by its family name comes whole ...
    body = _filtered(srv, "kubenode_proxy_sync_duration_seconds", "kubenode_process_cpu_seconds")
    assert _names(body) == {"kubenode_proxy_sync_duration_seconds_bucket",
                            "kubenode_proxy_sync_duration_seconds_sum",
                            "kubenode_proxy_sync_duration_seconds_count",
                            "kubenode_process_cpu_seconds_total"}
    assert b"# TYPE kubenode_proxy_sync_duration_seconds histogram" in body
    # ... and asked by a sample name (client_python's reading), just those samples.
    assert _names(_filtered(srv, "kubenode_proxy_sync_duration_seconds_count")) == {
        "kubenode_proxy_sync_duration_seconds_count"}
    # In OpenMetrics too; a name nothing has gives an empty but valid page.
    body = _filtered(srv, "kubenode_ipset_sets", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert body.endswith(b"# EOF\n") and _names(body.replace(b"# EOF\n", b"")) == {"kubenode_ipset_sets"}
    assert _filtered(srv, "no_such_metric") == b""
    # Without the filter, everything.
    # Unfiltered: every family, the exporter's own (process_*, python_*, build info) besides.
    own = {n for n in _names(get(f"http://127.0.0.1:{srv.port}/metrics")[2])
           if n.startswith(("process_", "python_", "kubenode_exporter_build_info"))}
    assert "process_resident_memory_bytes" in own and "kubenode_exporter_build_info" in own
    assert _names(get(f"http://127.0.0.1:{srv.port}/metrics")[2]) - own == {
        "kubenode_ipset_entries", "kubenode_ipset_sets", "kubenode_process_cpu_seconds_total",
        "kubenode_proxy_sync_duration_seconds_bucket", "kubenode_proxy_sync_duration_seconds_sum",
        "kubenode_proxy_sync_duration_seconds_count", "kubenode_collector_success",
        "kubenode_collector_duration_seconds"}


# -- item 12: a server that holds up -------------------------------------------------------

def _exchange(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send ``raw``, read until the server closes; what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(raw)
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
        return out


def _closed_by_server(conn: socket.socket, within: float) -> bool:
    """Whether the server ends this connection (EOF or reset) within ``within`` seconds."""
    conn.settimeout(within)
    try:
        while conn.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _threads_reach(condition, within: float = 5) -> bool:
    """Whether this process's thread count meets ``condition`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition(threading.active_count()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_listen_backlog_holds_a_burst_of_scrapers(server):
    # Connections the kernel completes while the server accepts none: the listen backlog.
    srv = MetricsServer(make_app(_runner()), "127.0.0.1:0")
    burst = 100
    clients = []
    try:
        for _ in range(burst):
            conn = socket.socket()
            conn.setblocking(False)
            conn.connect_ex(("127.0.0.1", srv.port))
            clients.append(conn)
        deadline = time.monotonic() + 3
        connected = set()
        while time.monotonic() < deadline and len(connected) < burst:
            for n, conn in enumerate(clients):
                if n not in connected and conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:
                        conn.getpeername()
                        connected.add(n)
                    except OSError:
                        pass
            time.sleep(0.05)
        # With socketserver's backlog of 5 the kernel drops the SYNs past the sixth.
        assert len(connected) == burst, f"{len(connected)} of {burst} connections completed"
        # Once the server runs, every one of them is answered.
        srv.start()
        for conn in clients:
            conn.setblocking(True)
            conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        for conn in clients:
            conn.settimeout(10)
            assert conn.recv(65536).startswith(b"HTTP/1.0 200 OK")
    finally:
        for conn in clients:
            conn.close()
        if srv.thread.is_alive():
            srv.stop()
        else:
            srv.httpd.server_close()


def test_silent_and_dripping_clients_are_let_go_after_the_header_timeout(server):
    srv = server(header_timeout=1.0)
    threads_before = threading.active_count()
    silent = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(30)]
    # One that drips its request line a byte every 0.2 s: each read is quick, the whole is not.
    dripper = socket.create_connection(("127.0.0.1", srv.port))
    stop = threading.Event()

    def drip():
        for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 100:
            if stop.is_set():
                return
            try:
                dripper.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    dripping = threading.Thread(target=drip, daemon=True)
    dripping.start()
    try:
        assert _threads_reach(lambda n: n >= threads_before + 30)  # each silent socket holds a thread
        # A real scrape meanwhile is answered.
        assert get(f"http://127.0.0.1:{srv.port}/healthz")[0] == 200
        # Wide bounds: a hang check, not a timing test.
        assert all(_closed_by_server(conn, within=15) for conn in silent)
        assert _closed_by_server(dripper, within=15)
        assert _threads_reach(lambda n: n <= threads_before + 1, within=10)  # + the dripping thread
    finally:
        stop.set()
        for conn in silent + [dripper]:
            conn.close()


def test_connections_past_the_bound_get_503_not_a_thread(server):
    srv = server(max_connections=4, header_timeout=30)
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        time.sleep(0.3)
        answer = _exchange(srv.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 503 Service Unavailable\r\n"), answer
        assert b"Connection: close" in answer and answer.endswith(b"\n")
    finally:
        for conn in held:
            conn.close()
    # Once they are gone, scrapes are served again.
    deadline = time.monotonic() + 10
    while True:
        status = get(f"http://127.0.0.1:{srv.port}/metrics")[0]
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200


def test_head_answers_the_get_headers_without_a_body(server):
    srv = server(make_app(Runner([])))  # no collector: only the exporter's own metrics
    for path in ("/metrics", "/healthz", "/", "/nope"):
        for _ in range(5):
            # The exporter's own process_* figures move between two scrapes, and with them
            # the gzipped page's length now and then by a byte: the pair is taken again.
            got = _exchange(srv.port, f"GET {path} HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n".encode())
            head = _exchange(srv.port, f"HEAD {path} HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n".encode())
            got_head, _, got_body = got.partition(b"\r\n\r\n")
            head_head, _, head_body = head.partition(b"\r\n\r\n")
            if f"Content-Length: {len(got_body)}".encode() in head_head:
                break
        assert head_body == b"", path
        assert head_head.split(b"\r\n")[0] == got_head.split(b"\r\n")[0], path
        assert f"Content-Length: {len(got_body)}".encode() in head_head, (path, head_head)
        ours = dict(line.split(b": ", 1) for line in head_head.split(b"\r\n")[1:])
        theirs = dict(line.split(b": ", 1) for line in got_head.split(b"\r\n")[1:])
        ours.pop(b"Date"), theirs.pop(b"Date")
        assert ours == theirs, path
        if path == "/metrics":
            assert ours[b"Content-Encoding"] == b"gzip" and gzip.decompress(got_body).startswith(b"# HELP")


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /metrics FOO/1.0\r\n\r\n",
    b"GET /metrics HTTP/1.x\r\n\r\n",
    b"GET / HTTP/1.0 extra\r\n\r\n",
    b"GET /\r\n\r\n",  # HTTP/0.9: no version, no headers
    b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS spoken to plain HTTP
])
def test_a_malformed_request_line_gets_a_proper_400(server, raw):
    srv = server()
    answer = _exchange(srv.port, raw)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.0 400 Bad Request", answer[:200]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers and b"Content-Type: text/plain; charset=utf-8" in headers
    assert body.startswith(b"400 Bad Request: ")


def test_an_unsupported_http_version_gets_a_proper_505(server):
    srv = server()
    assert _exchange(srv.port, b"GET /metrics HTTP/9.9\r\n\r\n").startswith(
        b"HTTP/1.0 505 HTTP Version Not Supported\r\n")


def test_a_client_that_never_reads_the_answer_is_let_go(server):
    big = b"x" * (64 << 20)  # far more than the socket buffers hold

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big]

    srv = server(app, response_timeout=1.0)
    threads_before = threading.active_count()
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert _threads_reach(lambda n: n == threads_before + 1)  # its thread, stuck in the send
        time.sleep(0.3)
        assert threading.active_count() == threads_before + 1
        assert _threads_reach(lambda n: n == threads_before, within=15)  # wide: a hang check
