"""HTTP serving: /metrics (Prometheus text or OpenMetrics), /healthz and a landing page."""

from __future__ import annotations

import functools
import gzip
import html
import io
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Callable, Iterable, NamedTuple
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, generate_latest, gzip_accepted
from prometheus_client.openmetrics import exposition as openmetrics

from exporter import __version__
from exporter.collector import Runner
from exporter.exposition import ESCAPINGS, Unsupported, openmetrics_page, text_page
from exporter.own_metrics import register_own_metrics

log = logging.getLogger("exporter.http")


def parse_listen_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[v6]:PORT`` -> (host, port); empty host means all."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {address!r} is not HOST:PORT")
    host = host.strip("[]")
    return host, int(port)


@dataclass(frozen=True)
class ServerLimits:
    """What bounds the server, as Go's net/http with exporter-toolkit is bounded.

    Each connection holds a thread; these keep clients from holding them at will.
    One request per connection (wsgiref answers HTTP/1.0 and closes), so no
    connection idles between requests: idle keep-alive is bounded at zero.
    """

    # For the request line and headers, from the connection's start (and as long
    # again for a TLS handshake before them, which Python's ssl bounds as a whole):
    # a silent or dripping client is let go after this (Go: ReadHeaderTimeout).
    header_timeout: float = 10.0
    # The whole answer's send to a client that reads it slowly (Go: WriteTimeout);
    # a Prometheus scrape times out well before.
    response_timeout: float = 60.0
    # Connections served at once; one more is answered 503 by the accepting thread.
    max_connections: int = 64
    # The listen backlog: socketserver's 5 overflowed under 50 concurrent scrapers.
    # The kernel caps it at net.core.somaxconn, as it does Go's listener.
    backlog: int = socket.SOMAXCONN


class _DeadlineReader(io.RawIOBase):
    """A connection's bytes, every read bounded by what is left of one deadline.

    A socket timeout bounds each read alone: a client dripping a byte at a time
    would hold the connection for ever. With ``deadline`` None, reads take the
    socket's own timeout.
    """

    def __init__(self, sock: socket.socket, deadline: float | None) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request did not come in time")
            self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _ServerHandler(ServerHandler):
    """wsgiref's, answering HEAD with GET's status and headers and no body, and logging
    through our logger (a client gone mid-answer is no traceback on stderr)."""

    def __init__(self, *args, head: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head = head

    def write(self, data: bytes) -> None:
        if not self.head:
            return super().write(data)
        if not self.headers_sent:
            self.bytes_sent = len(data)  # Content-Length stays the GET body's
            self.send_headers()
        return None

    def log_exception(self, exc_info) -> None:
        if isinstance(exc_info[1], OSError):
            log.debug("answering %s failed: %s", self.environ.get("REMOTE_ADDR"), exc_info[1])
        else:
            log.error("answering %s %s failed", self.environ.get("REQUEST_METHOD"), self.environ.get("PATH_INFO"),
                      exc_info=exc_info)


class _Handler(WSGIRequestHandler):
    # Before a request line is read its version is unknown and http.server answers
    # errors as HTTP/0.9: a bare body, no status line. Answer them as HTTP/1.0.
    default_request_version = "HTTP/1.0"
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s: %(explain)s\n"

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The status line keeps its standard reason ("400 Bad Request"); the detail goes in the body.
        super().send_error(code, None, explain or message)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # ours reads with the header deadline instead
        limits: ServerLimits = self.server.limits
        self.reader = _DeadlineReader(self.connection, time.monotonic() + limits.header_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def parse_request(self) -> bool:
        words = self.raw_requestline.split()
        if self.raw_requestline and len(words) != 3:
            # Method, target and version, or nothing: not HTTP/0.9 ("GET /"), not garbage.
            self.command, self.request_version = None, self.default_request_version
            self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
            self.close_connection = True
            self.send_error(400, "malformed request line")
            return False
        return super().parse_request()

    def handle(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", self.default_request_version, ""
                self.send_error(414)
                return
            if not self.parse_request():
                return
        except OSError as err:  # the header deadline, or a client gone
            log.debug("%s sent no request: %s", self.client_address[0], err)
            return
        self.reader.deadline = None
        self.connection.settimeout(self.server.limits.response_timeout)
        environ = self.get_environ()
        head = environ["REQUEST_METHOD"] == "HEAD"
        if head:
            environ["REQUEST_METHOD"] = "GET"  # the same answer, its body left unsent
        handler = _ServerHandler(self.rfile, self.wfile, self.get_stderr(), environ, multithread=False, head=head)
        handler.request_handler = self  # wsgiref logs the request through it
        handler.run(self.server.get_app())

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from stdlib
        log.debug("%s %s", self.address_string(), format % args)


REFUSAL_WARNING_INTERVAL = 60.0

_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Connection: close\r\nContent-Length: 21\r\n\r\ntoo many connections\n")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    limits = ServerLimits()

    def server_activate(self) -> None:
        self.request_queue_size = self.limits.backlog
        self.slots = threading.BoundedSemaphore(self.limits.max_connections)
        self.refused_since_warning = 0
        self.warned_at = float("-inf")
        super().server_activate()

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused_since_warning += 1
            now = time.monotonic()
            if now - self.warned_at >= REFUSAL_WARNING_INTERVAL:  # said at most once a minute
                log.warning("%d connections open, the most served at once: %d answered 503",
                            self.limits.max_connections, self.refused_since_warning)
                self.warned_at, self.refused_since_warning = now, 0
            self.refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def refuse(self, request: socket.socket) -> None:
        """503 from the accepting thread, which must not wait: the request, if
        already in, is drained first (closing on unread bytes would reset the
        connection and lose the answer), then the answer goes in one send."""
        try:
            request.setblocking(False)
            try:
                for _ in range(4):  # a request, not whatever a client keeps sending
                    if not request.recv(65536):
                        break
            except BlockingIOError:
                pass
            request.send(_BUSY)
        except OSError:
            pass


def _server_class(host: str, limits: ServerLimits) -> type[_Server]:
    family = socket.AF_INET
    if ":" in host or host == "":
        # An empty host serves on every address, v4 and v6, like node_exporter.
        family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET

    class Server(_Server):
        address_family = family

        def server_bind(self) -> None:
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    Server.limits = limits
    return Server


# Paths served without basic auth: a liveness answer that says nothing but "ok",
# so kubelet probes need no credentials in the pod spec. (exporter-toolkit protects
# every path; this is the one deliberate difference, see docs/security.md.)
UNAUTHENTICATED_PATHS = frozenset({"/healthz"})


def _tls_server_class(base: type[_Server], ssl_context, allowed_sans: tuple[str, ...]) -> type[_Server]:
    from exporter.webconfig import peer_matches_sans

    class TLSServer(base):
        def refuse(self, request) -> None:
            pass  # a plain-text 503 would be garbage to a TLS client: closing says it

        def finish_request(self, request, client_address) -> None:
            request.settimeout(self.limits.header_timeout)
            try:
                tls = ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as err:
                log.debug("TLS handshake with %s failed: %s", client_address[0], err)
                return
            try:  # the TLS socket now owns the connection: close it here, not the raw one
                if not peer_matches_sans(tls.getpeercert(), allowed_sans):
                    log.debug("client certificate of %s names none of client_allowed_sans", client_address[0])
                    return
                super().finish_request(tls, client_address)
            finally:
                self.shutdown_request(tls)

    return TLSServer


def make_app(runner: Runner, telemetry_path: str = "/metrics", *,
             auth: Callable[[str | None], bool] | None = None,
             headers: Iterable[tuple[str, str]] = ()) -> Callable:
    """The WSGI app. ``auth(Authorization header) -> bool`` guards every path but
    UNAUTHENTICATED_PATHS; ``headers`` are added to every response."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(runner)
    register_own_metrics(registry)  # process_*, python_*, build info: always on
    metrics_app = make_metrics_app(registry)
    extra_headers = list(headers)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if extra_headers:
            start_response = _with_headers(start_response, extra_headers)
        path = environ.get("PATH_INFO", "/")
        if auth is not None and path not in UNAUTHENTICATED_PATHS and not auth(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                ("WWW-Authenticate", 'Basic realm="kubenode-exporter"')])
            return [b"Unauthorized\n"]
        if path == telemetry_path:
            return metrics_app(environ, start_response)
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        if path == "/":
            body = _landing_page(runner, telemetry_path).encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]

    return app


def _with_headers(start_response: Callable, extra: list[tuple[str, str]]) -> Callable:
    def wrapped(status: str, response_headers: list, exc_info=None):
        return start_response(status, list(response_headers) + extra, exc_info)

    return wrapped


# gzip level 1: the ipset page of 2,000 sets (367 KB) takes 0.7 ms and 23.1 KB,
# against prometheus_client's level 9 at 4.5 ms and 22.2 KB.
GZIP_LEVEL = 1


class _Collected:
    """Families already collected, in the shape prometheus_client's writers take."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


def by_preference(accept: str | None) -> str:
    """The Accept header's media ranges, the client's most preferred first.

    client_python takes the first range it can serve, whatever its q-value;
    sorted by q (a stable sort: ties keep the client's order), that first one
    is the one the client prefers. A range at q=0 (or an unreadable q) is one
    the client does not want, and is left out.
    """
    ranked = []
    for position, media_range in enumerate((accept or "").split(",")):
        q = 1.0
        for param in media_range.split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if q > 0 and media_range.strip():
            ranked.append((-q, position, media_range.strip()))
    return ",".join(media_range for _, _, media_range in sorted(ranked))


class Negotiated(NamedTuple):
    writer: Callable  # client_python's writer of the format chosen
    lean: Callable | None  # ours, when it writes the same bytes
    content_type: str


def negotiate(accept: str | None) -> Negotiated:
    """The format of a /metrics answer: client_python's choice, in the client's order of preference."""
    writer, content_type = choose_encoder(by_preference(accept))
    return Negotiated(writer, _lean_writer(writer), content_type)


def _lean_writer(writer: Callable) -> Callable | None:
    """Our writer for what prometheus_client's choose_encoder chose, when we write the same bytes."""
    if writer is generate_latest:
        return text_page
    if not isinstance(writer, functools.partial) or writer.keywords.get("escaping") not in ESCAPINGS:
        return None
    escaping = writer.keywords["escaping"]
    if writer.func is generate_latest and writer.keywords.keys() == {"escaping"}:
        return functools.partial(text_page, escaping=escaping)  # text 1.0.0: the 0.0.4 lines
    if (writer.func is openmetrics.generate_latest and writer.keywords.keys() == {"escaping", "version"}
            and writer.keywords["version"] == "1.0.0"):
        return functools.partial(openmetrics_page, escaping=escaping)
    return None


def select_families(families: Iterable[Metric], names: set[str]) -> list[Metric]:
    """What ``?name[]=`` asks for: a family named whole, else the samples named.

    Filtered here, on what was collected, not through the registry's
    restricted_registry: that finds collectors by the names they describe, and
    the Runner (one collector for every family, its set known only by running
    it) describes none, so it found nothing. The families may be shared with an
    overlapping scrape (the Runner reuses a fresh result), so none is changed.
    """
    selected = []
    for family in families:
        if family.name in names:
            selected.append(family)
            continue
        kept = [s for s in family.samples if s.name in names]
        if kept:
            part = Metric(family.name, family.documentation, family.type, family.unit)
            part.samples = kept
            selected.append(part)
    return selected


def metrics_page(registry: CollectorRegistry, accept: str | None, query: str = "") -> tuple[bytes, str]:
    """The /metrics body and its Content-Type, negotiated as ``negotiate`` says."""
    chosen = negotiate(accept)
    families = list(registry.collect())
    names = parse_qs(query).get("name[]")
    if names:
        families = select_families(families, set(names))
    if chosen.lean is not None:
        try:
            return chosen.lean(families), chosen.content_type
        except Unsupported:
            pass
    return chosen.writer(_Collected(families)), chosen.content_type


def make_metrics_app(registry: CollectorRegistry) -> Callable:
    """/metrics as prometheus_client's make_wsgi_app serves it, with the lean writers."""

    def metrics_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method == "OPTIONS":
            start_response("200 OK", [("Allow", "OPTIONS,GET")])
            return [b""]
        if method != "GET":
            start_response("405 Method Not Allowed", [("Allow", "OPTIONS,GET")])
            return [f"# HTTP 405 Method Not Allowed: {method}; use OPTIONS or GET\n".encode()]
        body, content_type = metrics_page(registry, environ.get("HTTP_ACCEPT"), environ.get("QUERY_STRING", ""))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return metrics_app


def _landing_page(runner: Runner, telemetry_path: str) -> str:
    rows = []
    for name, outcome in runner.state():
        if outcome is None:
            state, detail = "not yet run", ""
        elif outcome.success:
            state, detail = "ok", f"{outcome.duration:.3f}s"
        else:
            state, detail = "failing", outcome.error
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{state}</td><td>{html.escape(detail)}</td></tr>")
    return (
        "<!doctype html><html><head><title>kubenode-exporter</title></head><body>"
        f"<h1>kubenode-exporter {__version__}</h1>"
        f'<p><a href="{html.escape(telemetry_path)}">Metrics</a> &middot; <a href="/healthz">Health</a></p>'
        "<h2>Collectors</h2><table><tr><th>collector</th><th>last scrape</th><th>detail</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


class MetricsServer:
    """The HTTP server on its own thread; ``stop()`` ends it.

    With ``ssl_context`` the one listening socket speaks only TLS. The handshake
    runs in the connection's own thread (not in accept), so a client that
    connects and stays silent cannot stall the server; ``allowed_sans`` (from
    client_allowed_sans) closes connections whose verified certificate names
    none of them.
    """

    def __init__(self, app: Callable, address: str, ssl_context=None,
                 allowed_sans: tuple[str, ...] = (), **limits) -> None:
        host, port = parse_listen_address(address)
        server_class = _server_class(host, ServerLimits(**limits))
        if ssl_context is not None:
            server_class = _tls_server_class(server_class, ssl_context, tuple(allowed_sans))
        self.httpd = make_server(host, port, app, server_class=server_class, handler_class=_Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
