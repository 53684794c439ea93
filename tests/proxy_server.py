"""A real HTTP server on 127.0.0.1 (random port) standing in for a proxy's metrics page.

Each path answers as its ``Answer`` says: a page (chunked, as Go's net/http sends
a large body, or with a Content-Length), an HTTP error, a stall before or in the
middle of the body, a slow drip (of the body, of the status line and headers, or
of the chunk-size line that ends a chunked body), or a connection cut short.
Tests change the answers between scrapes.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain; version=0.0.4; charset=utf-8"
    chunked: bool = True
    stall_before_headers: float = 0.0
    stall_after_bytes: int | None = None  # send this much of the body, then stall
    drip_seconds: float | None = None  # send one byte per this many seconds, forever
    cut_after_bytes: int | None = None  # send this much of the body (framed), then close
    stall_seconds: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)
    # the status line and headers, one byte per this many seconds
    drip_head_seconds: float | None = None
    # the whole body in time, then the chunk-size line that ends it ("0", padded with
    # this many leading zeros, as HTTP allows) one byte per drip_end_chunk_seconds
    drip_end_chunk_seconds: float | None = None
    end_chunk_padding: int = 100


class FakeProxy:
    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[dict] = []
        self.bytes_sent = 0
        self.release = threading.Event()  # ends any stall at teardown
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                owner.requests.append({"path": self.path, "headers": dict(self.headers)})
                answer = owner.answers.get(self.path.split("?")[0], Answer(b"not found\n", 404))
                try:
                    owner._serve(self, answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str = "/metrics") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> "FakeProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _stall(self, seconds: float) -> None:
        self.release.wait(seconds)

    def _send(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        handler.wfile.write(data)
        handler.wfile.flush()
        self.bytes_sent += len(data)

    def _drip(self, handler: BaseHTTPRequestHandler, data: bytes, seconds: float) -> None:
        for i in range(len(data)):
            if self.release.is_set():
                return
            self._send(handler, data[i:i + 1])
            self.release.wait(seconds)

    @staticmethod
    def _head(answer: Answer) -> bytes:
        """Status line and headers, written here (not by send_response) so they can be dripped."""
        try:
            reason = HTTPStatus(answer.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {answer.status} {reason}", f"Content-Type: {answer.content_type}"]
        lines += [f"{key}: {val}" for key, val in answer.headers.items()]
        if answer.chunked:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {len(answer.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _serve(self, handler: BaseHTTPRequestHandler, answer: Answer) -> None:
        if answer.stall_before_headers:
            self._stall(answer.stall_before_headers)
        head = self._head(answer)
        if answer.drip_head_seconds is not None:
            self._drip(handler, head, answer.drip_head_seconds)
        else:
            self._send(handler, head)
        body = answer.body
        if answer.drip_seconds is not None:
            for i in range(len(body)):
                if self.release.is_set():
                    return
                self._send(handler, self._frame(body[i:i + 1], answer))
                self.release.wait(answer.drip_seconds)
            return
        if answer.cut_after_bytes is not None:
            self._send(handler, self._frame(body[:answer.cut_after_bytes], answer))
            handler.connection.shutdown(socket.SHUT_WR)
            handler.close_connection = True
            return
        sent = 0
        piece = 32 * 1024
        while sent < len(body):
            if answer.stall_after_bytes is not None and sent >= answer.stall_after_bytes:
                self._stall(answer.stall_seconds)
                return
            chunk = body[sent:sent + piece]
            self._send(handler, self._frame(chunk, answer))
            sent += len(chunk)
        if answer.chunked:
            end = b"0" * (answer.end_chunk_padding + 1) + b"\r\n\r\n"
            if answer.drip_end_chunk_seconds is not None:
                self._drip(handler, end, answer.drip_end_chunk_seconds)
            else:
                self._send(handler, b"0\r\n\r\n")

    @staticmethod
    def _frame(data: bytes, answer: Answer) -> bytes:
        if not answer.chunked:
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
