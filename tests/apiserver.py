"""A local stand-in for kube-apiserver's list/watch, for the production client to talk to.

It keeps the API's semantics that a reflector depends on:

- one global, monotonically increasing resourceVersion shared by all resources;
- LIST with ``limit``/``continue`` over a consistent snapshot, ``metadata.resourceVersion``
  of the list, and 410 Gone for a continue token older than the compaction point;
- WATCH (``?watch=true``) from a resourceVersion: every ADDED/MODIFIED/DELETED after it,
  as JSON lines in a chunked response, BOOKMARKs when ``allowWatchBookmarks=true``,
  ending after ``timeoutSeconds``; a resourceVersion older than the compaction point
  gets 410 Gone (as an ERROR event, as the watch cache sends it, or as an HTTP status);
- ``fieldSelector=metadata.name=X``; bearer-token auth (401 without it); with
  ``client_ca``, TLS that requires a client certificate signed by that CA, which then
  stands in for the token (``make_client_certificate`` makes both).

Test knobs: ``fail(...)`` (HTTP 500s), ``drop_watch_after(...)`` (cut a stream mid-way),
``inject_line(...)`` (a malformed JSON line), ``delay`` (slow responses), objects
stored as given (so malformed objects reach the client), ``compact()``.
Every request is recorded in ``requests`` (kind, resource, params).
"""

from __future__ import annotations

import base64
import bisect
import copy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

PATHS = {
    "/api/v1/services": ("services", "Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
    "/api/v1/nodes": ("nodes", "Node", "v1"),
}
KINDS = {resource: (kind, api_version) for resource, kind, api_version in PATHS.values()}


@dataclass
class Event:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED, or RAW (an injected line, sent once)
    obj: Any
    sent: bool = False


@dataclass
class Request:
    kind: str  # "list" or "watch"
    resource: str
    params: dict[str, str]
    status: int = 200


@dataclass
class _Failure:
    resource: str | None
    kind: str | None  # "list", "watch" or None (either)
    remaining: int
    status: int


@dataclass
class _Drop:
    resource: str
    after_events: int
    remaining: int


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


class FakeApiServer:
    def __init__(self, token: str = "kubenode-test-token", tls_dir: str | None = None,
                 client_ca: str | None = None) -> None:
        """``tls_dir``: serve HTTPS with a fresh self-signed certificate for 127.0.0.1 made there.
        ``client_ca`` (a PEM file, with ``tls_dir``): require a client certificate it signed."""
        self.token = token
        self.ca_pem: bytes | None = None
        self.lock = threading.Condition()
        self.rv = 100  # global resourceVersion
        self.compacted_rv = 0  # watches/continues from before this get 410
        self.objects: dict[str, dict[tuple[str, str], dict]] = {r: {} for r in KINDS}
        self.events: list[Event] = []
        self._event_rvs: list[int] = []
        self._compacted_events = 0  # events dropped from the front; watchers keep absolute positions
        self._snapshots: dict[str, tuple[int, list[dict]]] = {}
        self.requests: list[Request] = []
        self.failures: list[_Failure] = []
        self.drops: list[_Drop] = []
        self.delay = 0.0  # seconds before each response
        self.gone_as_status = False  # 410 on WATCH as an HTTP status instead of an ERROR event
        self.bookmark_interval: float | None = None  # periodic bookmarks on open watches
        self.hang_watches = False  # watches ignore timeoutSeconds and go silent (a stuck server)
        self.open_watches = 0
        self._watch_epoch = 0  # end_watches() bumps it; older streams end cleanly
        self._closing = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        if tls_dir is not None:
            self.ca_pem = self._enable_tls(tls_dir, client_ca)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-apiserver", daemon=True)

    # --- lifecycle --------------------------------------------------------------

    def _enable_tls(self, directory: str, client_ca: str | None = None) -> bytes:
        import os
        import shutil
        import ssl
        import subprocess

        if shutil.which("openssl") is None:
            raise RuntimeError("the openssl tool is needed to make the stand-in's TLS certificate")
        cert, key = os.path.join(directory, "apiserver.crt"), os.path.join(directory, "apiserver.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", cert, "-days", "1", "-subj", "/CN=kubenode-test-apiserver",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:kubenode-test-apiserver"], check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        with open(cert, "rb") as fh:
            return fh.read()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{'https' if self.ca_pem else 'http'}://{host}:{port}"

    def start(self) -> "FakeApiServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._closing = True
            self.lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def write_kubeconfig(self, path: str, token: str | None = None, ca_pem: bytes | None = None) -> str:
        cluster: dict[str, Any] = {"server": self.url}
        ca = ca_pem or self.ca_pem
        if ca:
            cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh)
        return path

    # --- objects ----------------------------------------------------------------

    def _record(self, resource: str, type_: str, obj: dict) -> dict:
        # Caller holds the lock. The stored object is never mutated afterwards, so
        # snapshots and event history may share it.
        self.rv += 1
        obj = copy.deepcopy(obj)
        kind, api_version = KINDS[resource]
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", api_version)
        if isinstance(obj.get("metadata"), dict):
            obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append(Event(self.rv, resource, type_, obj))
        self._event_rvs.append(self.rv)
        self.lock.notify_all()
        return obj

    def create(self, resource: str, obj: dict) -> dict:
        with self.lock:
            key = _key(obj)
            type_ = "MODIFIED" if key in self.objects[resource] else "ADDED"
            stored = self._record(resource, type_, obj)
            self.objects[resource][key] = stored
            return stored

    update = create

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.lock:
            old = self.objects[resource].pop((namespace, name))
            self._record(resource, "DELETED", old)

    def inject_line(self, resource: str, text: str) -> None:
        """Send ``text`` as one line to the next watch of ``resource`` (once)."""
        with self.lock:
            self.events.append(Event(self.rv, resource, "RAW", text))
            self._event_rvs.append(self.rv)
            self.lock.notify_all()

    def bookmark(self, resource: str) -> int:
        """Send a BOOKMARK at the current resourceVersion to open watches of ``resource``."""
        with self.lock:
            self.events.append(Event(self.rv, resource, "BOOKMARK", None))
            self._event_rvs.append(self.rv)
            self.lock.notify_all()
            return self.rv

    def end_watches(self) -> None:
        """End every open watch stream cleanly, as the server does at timeoutSeconds."""
        with self.lock:
            self._watch_epoch += 1
            self.lock.notify_all()

    def compact(self, rv: int | None = None) -> int:
        """Forget history up to ``rv`` (default: now); older watches and continues get 410."""
        with self.lock:
            self.compacted_rv = self.rv if rv is None else rv
            cut = bisect.bisect_right(self._event_rvs, self.compacted_rv)
            del self.events[:cut]
            del self._event_rvs[:cut]
            self._compacted_events += cut
            return self.compacted_rv

    # --- knobs ------------------------------------------------------------------

    def fail(self, count: int, resource: str | None = None, kind: str | None = None, status: int = 500) -> None:
        with self.lock:
            self.failures.append(_Failure(resource, kind, count, status))

    def drop_watch_after(self, resource: str, events: int, times: int = 1) -> None:
        """Cut the next ``times`` watch streams of ``resource`` after ``events`` events."""
        with self.lock:
            self.drops.append(_Drop(resource, events, times))

    def watches(self, resource: str) -> list[Request]:
        return [r for r in list(self.requests) if r.kind == "watch" and r.resource == resource]

    def lists(self, resource: str) -> list[Request]:
        return [r for r in list(self.requests) if r.kind == "list" and r.resource == resource]

    # --- serving ------------------------------------------------------------------

    def _take_failure(self, resource: str, kind: str) -> int | None:
        with self.lock:
            for f in self.failures:
                if f.remaining > 0 and f.resource in (None, resource) and f.kind in (None, kind):
                    f.remaining -= 1
                    return f.status
        return None

    def _take_drop(self, resource: str) -> int | None:
        with self.lock:
            for d in self.drops:
                if d.remaining > 0 and d.resource == resource:
                    d.remaining -= 1
                    return d.after_events
        return None

    def _list(self, resource: str, params: dict[str, str]) -> tuple[int, dict]:
        limit = int(params.get("limit") or 0)
        selector = _name_selector(params.get("fieldSelector"))
        with self.lock:
            token = params.get("continue")
            if token:
                try:
                    snap_id, offset = json.loads(base64.urlsafe_b64decode(token.encode()))
                    snap_rv, items = self._snapshots[snap_id]
                except (ValueError, KeyError, TypeError):
                    return 400, _status(400, "BadRequest", "invalid continue token")
                if snap_rv < self.compacted_rv:
                    return 410, _status(410, "Expired", "The provided continue parameter is too old")
            else:
                items = [o for k, o in sorted(self.objects[resource].items())
                         if selector is None or k[1] == selector]
                snap_rv, offset = self.rv, 0
                snap_id = f"{resource}-{snap_rv}-{len(self._snapshots)}"
                self._snapshots[snap_id] = (snap_rv, items)
                while len(self._snapshots) > 50:  # continue tokens of old lists expire
                    del self._snapshots[next(iter(self._snapshots))]
        end = offset + limit if limit else len(items)
        meta: dict[str, Any] = {"resourceVersion": str(snap_rv)}
        if end < len(items):
            meta["continue"] = base64.urlsafe_b64encode(json.dumps([snap_id, end]).encode()).decode()
            meta["remainingItemCount"] = len(items) - end
        kind, api_version = KINDS[resource]
        return 200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta,
                     "items": items[offset:end]}

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                params = {k: v[-1] for k, v in parse_qs(url.query).items()}
                target = PATHS.get(url.path)
                is_watch = params.get("watch") in ("true", "1")
                kind = "watch" if is_watch else "list"
                record = Request(kind, target[0] if target else url.path, params)
                server.requests.append(record)
                if server.delay:
                    time.sleep(server.delay)
                has_cert = bool(getattr(self.connection, "getpeercert", lambda: None)())
                if not has_cert and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._json(record, 401, _status(401, "Unauthorized", "Unauthorized"))
                if target is None:
                    return self._json(record, 404, _status(404, "NotFound", "the server could not find the resource"))
                resource = target[0]
                failure = server._take_failure(resource, kind)
                if failure:
                    return self._json(record, failure, _status(failure, "InternalError", "injected failure"))
                if is_watch:
                    return self._watch(record, resource, params)
                status, body = server._list(resource, params)
                return self._json(record, status, body)

            def _json(self, record: Request, status: int, body: dict) -> None:
                record.status = status
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _watch(self, record: Request, resource: str, params: dict[str, str]) -> None:
                try:
                    since = int(params.get("resourceVersion") or 0)
                except ValueError:
                    return self._json(record, 400, _status(400, "BadRequest", "bad resourceVersion"))
                timeout = 1e9 if server.hang_watches else float(params.get("timeoutSeconds") or 1800)
                bookmarks = params.get("allowWatchBookmarks") == "true"
                selector = _name_selector(params.get("fieldSelector"))
                drop_after = server._take_drop(resource)
                gone = since < server.compacted_rv
                if gone and server.gone_as_status:
                    return self._json(record, 410, _status(410, "Expired", f"too old resource version: {since}"))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if gone:
                    record.status = 410
                    error = {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {since} ({server.compacted_rv})")}
                    self._chunk(json.dumps(error).encode() + b"\n")
                    self._chunk(b"")
                    return
                deadline = time.monotonic() + timeout
                sent = 0
                next_bookmark = time.monotonic() + (server.bookmark_interval or 1e9)
                position = None
                epoch = server._watch_epoch
                server.open_watches += 1
                try:
                    while True:
                        with server.lock:
                            if position is None:
                                position = (bisect.bisect_right(server._event_rvs, since)
                                            + server._compacted_events)
                            pending = []
                            while not pending:
                                # Positions count from the first event ever, so compaction does not move them.
                                while position - server._compacted_events < len(server.events):
                                    ev = server.events[max(0, position - server._compacted_events)]
                                    position += 1
                                    if ev.resource == resource:
                                        pending.append(ev)
                                now = time.monotonic()
                                if pending or server._closing or now >= deadline or epoch != server._watch_epoch:
                                    break
                                if bookmarks and now >= next_bookmark:
                                    pending.append(Event(server.rv, resource, "BOOKMARK", None))
                                    next_bookmark = now + server.bookmark_interval
                                    break
                                server.lock.wait(min(deadline, next_bookmark) - now)
                            closing = server._closing or epoch != server._watch_epoch
                        for ev in pending:
                            line = self._line(ev, resource, bookmarks, selector)
                            if line is None:
                                continue
                            if drop_after is not None and sent >= drop_after:
                                self.close_connection = True
                                self.connection.shutdown(2)  # abrupt: no final chunk
                                return
                            self._chunk(line)
                            sent += 1
                        if closing or time.monotonic() >= deadline:
                            self._chunk(b"")
                            return
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True
                finally:
                    server.open_watches -= 1

            def _line(self, ev: Event, resource: str, bookmarks: bool, selector: str | None) -> bytes | None:
                if ev.type == "RAW":
                    if ev.sent:
                        return None
                    ev.sent = True
                    return ev.obj.encode() + b"\n"
                if ev.type == "BOOKMARK":
                    if not bookmarks:
                        return None
                    kind, api_version = KINDS[resource]
                    obj = {"kind": kind, "apiVersion": api_version,
                           "metadata": {"resourceVersion": str(ev.rv)}}
                    return json.dumps({"type": "BOOKMARK", "object": obj}).encode() + b"\n"
                if selector is not None and _key(ev.obj)[1] != selector:
                    return None
                return json.dumps({"type": ev.type, "object": ev.obj}).encode() + b"\n"

        return Handler


def make_client_certificate(directory: str, name: str = "kubenode-test-client") -> tuple[str, str, str]:
    """A CA and a client certificate it signed, made with openssl in ``directory``:
    (ca.crt, client.crt, client.key) paths."""
    import os
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl tool is needed to make a client certificate")
    ca_crt, ca_key = os.path.join(directory, "client-ca.crt"), os.path.join(directory, "client-ca.key")
    crt, key, csr = (os.path.join(directory, f"client.{ext}") for ext in ("crt", "key", "csr"))
    for args in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt,
                  "-days", "1", "-subj", "/CN=kubenode-test-client-ca"],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}"],
                 ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
                  "-out", crt, "-days", "1"]):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    return ca_crt, crt, key


def _name_selector(selector: str | None) -> str | None:
    if not selector:
        return None
    name, _, value = selector.partition("=")
    if name != "metadata.name":
        raise ValueError(f"the stand-in supports only metadata.name selectors, not {selector!r}")
    return value


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


# --- object builders for tests ---------------------------------------------------


def service(namespace: str, name: str, cluster_ip: str, ports=((("http", "TCP", 80)),), **spec: Any) -> dict:
    body = {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP",
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports]}
    body.update(spec)
    return {"metadata": {"namespace": namespace, "name": name}, "spec": body}


def endpoint_slice(namespace: str, name: str, service_name: str, addresses: list[str],
                   ports=((("http", "TCP", 8080)),), trigger_time: str | None = None,
                   node_name: str | None = None, address_type: str = "IPv4") -> dict:
    meta: dict[str, Any] = {"namespace": namespace, "name": name,
                            "labels": {"kubernetes.io/service-name": service_name}}
    if trigger_time:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger_time}
    return {"metadata": meta, "addressType": address_type,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True},
                           **({"nodeName": node_name} if node_name else {})} for a in addresses]}


def node(name: str, zone: str | None = None, addresses: tuple[str, ...] = ()) -> dict:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {"metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}
