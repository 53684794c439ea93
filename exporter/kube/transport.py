"""GETs to the Kubernetes API over the standard library's http.client.

``ApiTransport`` turns an ``ApiConfig`` into connections: TLS from the config (its CA or
the system's, a client certificate, ``tls-server-name``, or no verification when the
kubeconfig says so), a connect timeout (the server name's look-up included: exporter.lookup),
and a read timeout on every request. No proxy
from the environment is used (the API is reached directly, as before). A 401 makes the
credential be fetched again (token file, exec plugin) and the request sent once more.

``get`` reads a whole body (LIST pages) over a kept-alive connection; ``stream`` opens
a connection of its own for one WATCH and reads it line by line (http.client decodes
the chunked encoding), a line bounded by ``MAX_LINE``.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import tempfile
import threading
from typing import Any
from urllib.parse import urlencode, urlsplit

from exporter import lookup
from exporter.kube.kubeconfig import ApiConfig, Credential, CredentialError, Credentials, KubeConfigError

# A watch event is one object as JSON; etcd keeps objects under 1.5 MiB by default. A line
# past this is a broken stream, not an object.
MAX_LINE = 16 * 2**20
IDLE_CONNECTIONS = 4  # kept-alive connections for LIST pages (one per reflector thread at most)


class TransportError(Exception):
    """The request got no HTTP answer: connection, TLS, timeout, or no credential."""


def describe(err: BaseException) -> str:
    """One line for a failed request; a read that timed out says so by name."""
    if isinstance(err, TimeoutError):
        return "ReadTimeout: no answer within the read timeout"
    return f"{type(err).__name__}: {err}"


def _load_chain(context: ssl.SSLContext, cert: tuple[str | None, bytes | None],
                key: tuple[str | None, bytes | None]) -> None:
    """A client certificate from files or from PEM bytes (ssl takes only files: a private temp folder)."""
    cert_file, cert_data = cert
    key_file, key_data = key
    if cert_data is None and key_data is None:
        context.load_cert_chain(cert_file, key_file)
        return
    with tempfile.TemporaryDirectory(prefix=f"kubenode-client-cert-{os.getpid()}-") as folder:
        if cert_data is not None:
            cert_file = os.path.join(folder, "client.crt")
            with open(os.open(cert_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
                fh.write(cert_data)
        if key_data is not None:
            key_file = os.path.join(folder, "client.key")
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
                fh.write(key_data)
        context.load_cert_chain(cert_file, key_file)


def ssl_context(config: ApiConfig, client_cert: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    """The TLS context of ``config``; ``client_cert`` (PEM pair) from an exec plugin wins over the config's."""
    if config.ca_data:
        context = ssl.create_default_context(cadata=config.ca_data.decode("ascii", errors="replace"))
    elif config.ca_file:
        context = ssl.create_default_context(cafile=config.ca_file)
    else:
        context = ssl.create_default_context()
    if config.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        _load_chain(context, (None, client_cert[0]), (None, client_cert[1]))
    elif config.client_cert_file or config.client_cert_data:
        if not (config.client_key_file or config.client_key_data):
            raise KubeConfigError("a client certificate without a client key")
        _load_chain(context, (config.client_cert_file, config.client_cert_data),
                    (config.client_key_file, config.client_key_data))
    return context


class _HTTPConnection(http.client.HTTPConnection):
    """HTTPConnection whose connect timeout covers the server name's look-up too."""

    def __init__(self, host: str, port: int | None, *, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._create_connection = lookup.create_connection


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPSConnection whose SNI and verified name may differ from the host (tls-server-name),
    and whose connect timeout covers the server name's look-up too."""

    def __init__(self, host: str, port: int | None, *, timeout: float, context: ssl.SSLContext,
                 server_name: str | None) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._create_connection = lookup.create_connection

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name or self.host)


class Stream:
    """One open streaming response: ``status``, ``body()`` for an error's text, ``lines()``."""

    def __init__(self, connection: http.client.HTTPConnection, sock: socket.socket,
                 response: http.client.HTTPResponse) -> None:
        self._connection = connection
        self._sock = sock  # taken before getresponse(): a response that closes the connection unsets it
        self.response = response
        self.status = response.status

    def body(self) -> bytes:
        return self.response.read()

    def readline(self) -> bytes:
        """The next line (with its newline); b"" at the end; TransportError past MAX_LINE."""
        line = self.response.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise TransportError(f"a line longer than {MAX_LINE} bytes")
        return line

    def abort(self) -> None:
        """Wake a reader blocked on this stream, from any thread."""
        try:
            # socket.socket's shutdown, not SSLSocket's: wake the reader, leave TLS state alone.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.response.close()
        finally:
            self._connection.close()


class ApiTransport:
    """Requests to one API server; safe to share between threads."""

    def __init__(self, config: ApiConfig, credentials: Credentials | None = None,
                 connect_timeout: float = 10.0) -> None:
        url = urlsplit(config.server)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise KubeConfigError(f"server {config.server!r} is not an http(s) URL")
        self.config = config
        self.credentials = credentials or Credentials(config)
        self.connect_timeout = connect_timeout
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname, url.port
        self._prefix = url.path.rstrip("/")
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        # Built now, so a bad CA or certificate is a start-up error; rebuilt only for an
        # exec plugin's certificate.
        self._context = ssl_context(config) if self._https else None
        self._context_cert: tuple[bytes, bytes] | None = None

    # connections

    def _tls_context(self, credential: Credential) -> ssl.SSLContext | None:
        if not self._https or credential.client_cert is None:
            return self._context
        stale: list[http.client.HTTPConnection] = []
        with self._lock:
            if credential.client_cert != self._context_cert:
                try:
                    self._context = ssl_context(self.config, credential.client_cert)
                except (ssl.SSLError, OSError, ValueError) as err:
                    raise TransportError(f"the exec plugin's client certificate: {err}") from None
                self._context_cert = credential.client_cert
                stale, self._idle = self._idle, []  # connections made with the certificate before
            context = self._context
        for conn in stale:
            conn.close()
        return context

    def _connect(self, credential: Credential, read_timeout: float) -> http.client.HTTPConnection:
        context = self._tls_context(credential)
        if context is not None:
            conn: http.client.HTTPConnection = _TLSConnection(
                self._host, self._port, timeout=self.connect_timeout, context=context,
                server_name=self.config.tls_server_name)
        else:
            conn = _HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(read_timeout)
        except lookup.LookupTimedOut as err:
            conn.close()
            raise TransportError(f"ConnectTimeout: {err}") from None
        except TimeoutError:
            conn.close()
            raise TransportError(f"ConnectTimeout: no connection within {self.connect_timeout:g}s") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _take_idle(self, read_timeout: float) -> http.client.HTTPConnection | None:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(read_timeout)
            return conn
        return None

    def _give_back(self, conn: http.client.HTTPConnection, context: ssl.SSLContext | None) -> None:
        with self._lock:
            if len(self._idle) < IDLE_CONNECTIONS and context is self._context:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # requests

    def _target(self, path: str, params: dict[str, Any]) -> str:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        return f"{self._prefix}{path}" + (f"?{query}" if query else "")

    def _headers(self, credential: Credential) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "kubenode-exporter"}
        if credential.authorization:
            headers["Authorization"] = credential.authorization
        return headers

    def _credential(self) -> Credential:
        try:
            return self.credentials.current()
        except CredentialError as err:
            raise TransportError(str(err)) from None

    def get(self, path: str, params: dict[str, Any], timeout: float) -> tuple[int, bytes]:
        """Status and whole body of one GET; TransportError when there is no answer."""
        target = self._target(path, params)
        status, body = self._get_once(target, self._credential(), timeout)
        if status == 401 and self.credentials.invalidate():
            # Refused: the token file may have rotated, an exec credential been revoked. Once more.
            status, body = self._get_once(target, self._credential(), timeout)
        return status, body

    def _get_once(self, target: str, credential: Credential, timeout: float) -> tuple[int, bytes]:
        reused = self._take_idle(timeout)
        conn = reused
        try:
            if conn is None:
                conn = self._connect(credential, timeout)
            context = self._tls_context(credential)
            try:
                conn.request("GET", target, headers=self._headers(credential))
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                if reused is None:
                    raise
                # The server closed a kept-alive connection while it sat idle: once more, fresh.
                conn.close()
                conn = self._connect(credential, timeout)
                conn.request("GET", target, headers=self._headers(credential))
                response = conn.getresponse()
            body = response.read()
            if response.will_close:
                conn.close()
            else:
                self._give_back(conn, context)
            return response.status, body
        except (OSError, http.client.HTTPException) as err:
            if conn is not None:
                conn.close()
            raise TransportError(describe(err)) from None

    def stream(self, path: str, params: dict[str, Any], read_timeout: float) -> Stream:
        """An open streaming GET on a connection of its own; TransportError when there is no answer."""
        target = self._target(path, params)
        stream = self._stream_once(target, self._credential(), read_timeout)
        if stream.status == 401 and self.credentials.invalidate():
            stream.close()
            stream = self._stream_once(target, self._credential(), read_timeout)
        return stream

    def _stream_once(self, target: str, credential: Credential, read_timeout: float) -> Stream:
        conn = None
        try:
            conn = self._connect(credential, read_timeout)
            conn.request("GET", target, headers=self._headers(credential))
            return Stream(conn, conn.sock, conn.getresponse())
        except (OSError, http.client.HTTPException) as err:
            if conn is not None:
                conn.close()
            raise TransportError(describe(err)) from None
