"""Kubernetes API access: a list/watch reflector per resource.

Where the API is and how to authenticate is ``exporter.kube.kubeconfig``; the
requests go over the standard library (``exporter.kube.transport``). Lists and
watches are done here, so every object becomes a compact tuple
(``exporter.kube.objects``) as soon as it is read: a list page is parsed,
converted and dropped; a watch is read line by line.

A ``Reflector`` follows one resource the way client-go's reflector does:

- LIST in pages (``limit``/``continue``), which gives a resourceVersion;
- WATCH from that resourceVersion with bookmarks and a server-side timeout,
  advancing the resourceVersion with every event and bookmark;
- a stream that ends, drops, times out or sends a bad line is re-opened from
  the last resourceVersion (no relist), after a backoff when it failed;
- 410 Gone (an HTTP status or an ERROR event with code 410) means the
  resourceVersion was compacted away: LIST again and replace the state;
- 5xx, connection errors and timeouts back off exponentially (capped, jittered).

A malformed object is logged (rate-limited) and skipped; it never stops the
reflector. Handlers receive only compact objects (see ``Handler``).
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Protocol

from exporter.kube import objects
from exporter.kube.kubeconfig import (SERVICE_ACCOUNT_DIR, ApiConfig, KubeConfigError,  # noqa: F401 - re-exported
                                      KubeNotConfigured, load_config)
from exporter.kube.transport import ApiTransport, Stream, TransportError, describe

log = logging.getLogger("exporter.kube.client")


class ApiError(Exception):
    """A request the API answered with an error status (or not at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Gone(ApiError):
    """410: the resourceVersion (or continue token) is older than the API keeps."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 410)


class StreamBroken(ApiError):
    """A watch stream that cannot be read on: a bad line, an ERROR event, a drop."""


class ApiClient:
    """Raw GETs to the API (TLS and auth included) over one ``ApiTransport``."""

    def __init__(self, http: ApiTransport) -> None:
        self.http = http

    @classmethod
    def from_config(cls, config: ApiConfig, connect_timeout: float = 10.0) -> "ApiClient":
        try:
            return cls(ApiTransport(config, connect_timeout=connect_timeout))
        except KubeConfigError as err:
            raise KubeConfigError(f"cannot build an API client: {err}") from None
        except Exception as err:  # noqa: BLE001 - bad certificates, missing files
            raise KubeConfigError(f"cannot build an API client: {type(err).__name__}: {err}") from None

    @classmethod
    def from_settings(cls, kubeconfig: str | None = None) -> "ApiClient":
        return cls.from_config(load_config(kubeconfig))

    def close(self) -> None:
        self.http.close()

    def list_page(self, path: str, params: dict[str, Any], timeout: float = 60.0) -> dict:
        """One LIST page as parsed JSON; ApiError/Gone on failure."""
        try:
            status, content = self.http.get(path, params, timeout)
        except TransportError as err:
            raise ApiError(f"LIST {path}: {err}") from None
        if status != 200:
            raise _status_error(f"LIST {path}", status, content)
        try:
            body = json.loads(content)
        except ValueError:
            raise ApiError(f"LIST {path}: the response is not JSON", status) from None
        if not isinstance(body, dict):
            raise ApiError(f"LIST {path}: the response is not an object", status)
        return body

    def watch_stream(self, path: str, params: dict[str, Any], read_timeout: float) -> "WatchStream":
        return WatchStream(self.http, path, params, read_timeout)


def _status_error(what: str, status: int, content: bytes) -> ApiError:
    message = ""
    try:
        body = json.loads(content)
        if isinstance(body, dict):
            message = str(body.get("message") or "")
    except ValueError:
        pass
    text = f"{what}: HTTP {status}" + (f": {message[:200]}" if message else "")
    if status == 410:
        return Gone(text)
    return ApiError(text, status)


class WatchStream:
    """One open WATCH response, read as JSON lines; ``abort()`` from any thread."""

    def __init__(self, http: ApiTransport, path: str, params: dict[str, Any], read_timeout: float) -> None:
        self.path = path
        self._aborted = False
        try:
            self._stream: Stream = http.stream(path, params, read_timeout)
        except TransportError as err:
            raise ApiError(f"WATCH {path}: {err}") from None
        if self._stream.status != 200:
            try:
                content = self._stream.body()
            except (OSError, ValueError, TransportError):
                content = b""
            self.close()
            raise _status_error(f"WATCH {path}", self._stream.status, content)

    def events(self) -> Iterator[dict]:
        """Each event as a dict; StreamBroken on a bad line, ApiError on a drop."""
        try:
            while True:
                line = self._stream.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise StreamBroken(f"WATCH {self.path}: a line is not JSON: {line[:80]!r}") from None
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    raise StreamBroken(f"WATCH {self.path}: a line is not a watch event: {line[:80]!r}")
                yield event
        except TransportError as err:
            raise StreamBroken(f"WATCH {self.path}: {err}") from None
        except Exception as err:  # noqa: BLE001 - http.client's errors, and the socket shut down by abort()
            if self._aborted:
                return
            if isinstance(err, ApiError):
                raise
            raise ApiError(f"WATCH {self.path}: {describe(err)}") from None

    def abort(self) -> None:
        """Wake a reader blocked on this stream (used by stop())."""
        self._aborted = True
        self._stream.abort()

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass


# --- resources ---------------------------------------------------------------


class Resource(NamedTuple):
    """What one reflector follows."""

    name: str  # the ``resource`` label of kubenode_kube_watch_up
    path: str
    parse: Callable[[dict], Any]
    key: Callable[[dict], str | None]  # key of a raw object, for deletes of objects we cannot parse
    field_selector: str | None = None


def _namespaced_key(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


def _cluster_key(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    return meta["name"]


def services_resource(intern: objects.Intern | None = None) -> Resource:
    """``intern``: the owner's (the store's) sharing of equal port specs across objects."""
    return Resource("services", "/api/v1/services", functools.partial(objects.parse_service, intern=intern),
                    _namespaced_key)


def endpointslices_resource(intern: objects.Intern | None = None) -> Resource:
    """``intern``: the owner's sharing of equal ports and endpoint states across slices."""
    return Resource("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices",
                    functools.partial(objects.parse_endpoint_slice, intern=intern), _namespaced_key)


def node_resource(node_name: str) -> Resource:
    return Resource("nodes", "/api/v1/nodes", objects.parse_node, _cluster_key,
                    field_selector=f"metadata.name={node_name}")


def _resource_version(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


# --- the reflector -----------------------------------------------------------


class Handler(Protocol):
    """Where a reflector delivers compact objects (the store)."""

    def replace(self, resource: str, items: dict[str, Any]) -> None:
        """A full LIST: ``items`` by key is now the whole state of ``resource``."""

    def upsert(self, resource: str, key: str, item: Any) -> None:
        """An object was added or modified."""

    def delete(self, resource: str, key: str) -> None:
        """An object was deleted (or became unusable: a malformed update)."""


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: base * 2^n, capped, times [0.5, 1)."""

    base: float = 0.5
    cap: float = 30.0
    failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.failures, 30)))
        self.failures += 1
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.failures = 0


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds; the rest are counted and summarised."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.period:
                if self._suppressed:
                    self.logger.warning("%d more similar messages suppressed", self._suppressed)
                self._window_start, self._count, self._suppressed = now, 0, 0
            if self._count >= self.burst:
                self._suppressed += 1
                return
            self._count += 1
        self.logger.warning(message, *args)


class WatchStatus(NamedTuple):
    """What a reflector reports about itself (for kubenode_kube_watch_up)."""

    resource: str
    up: bool  # synced state, and the watch connected or reconnecting within the grace
    synced: bool  # a LIST has succeeded and its state is current (no pending relist)
    connected: bool  # a watch stream is open now
    resource_version: str | None
    lists: int  # LISTs completed
    watches: int  # watch streams opened
    malformed: int  # objects skipped as malformed
    last_error: str | None


class Reflector:
    """List and watch one resource on its own thread; deliver compact objects to a handler.

    ``up`` follows kubenode_kube_watch_up's meaning: 1 when the last LIST
    succeeded and the watch is connected, or has been down for less than
    ``down_after`` seconds (reconnecting within backoff); 0 when there is no
    synced state, or the watch has been failing for longer than that.
    """

    def __init__(self, api: ApiClient, resource: Resource, handler: Handler, *,
                 page_size: int = 500, watch_timeout: int = 300,
                 backoff: Backoff | None = None, down_after: float = 60.0,
                 malformed_log: RateLimitedLog | None = None, list_timeout: float = 60.0,
                 read_slack: float = 30.0) -> None:
        self.api = api
        self.resource = resource
        self.handler = handler
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.list_timeout = list_timeout  # per LIST page
        # A watch silent for timeoutSeconds + this is dead (the server should have ended it).
        self.read_slack = read_slack
        self.backoff = backoff or Backoff()
        self.down_after = down_after
        self.malformed_log = malformed_log or RateLimitedLog(log)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: WatchStream | None = None
        self._lock = threading.Lock()
        self._synced_event = threading.Event()
        # state, read by status() from other threads (each field written atomically)
        self.resource_version: str | None = None
        self._synced = False
        self._connected = False
        self._disconnected_since: float | None = None
        self._lists = 0
        self._watches = 0
        self._malformed = 0
        self._last_error: str | None = None

    # lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.resource.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.abort()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced_event.wait(timeout)

    def status(self) -> WatchStatus:
        synced, connected = self._synced, self._connected
        since = self._disconnected_since
        up = synced and (connected or since is None or time.monotonic() - since < self.down_after)
        return WatchStatus(self.resource.name, up, synced, connected, self.resource_version,
                           self._lists, self._watches, self._malformed, self._last_error)

    # the loop

    def _run(self) -> None:
        self._disconnected_since = time.monotonic()
        while not self._stop.is_set():
            listing = False
            try:
                if self.resource_version is None:
                    listing = True
                    self._list()
                    listing = False
                    if self._stop.is_set():
                        return
                if self._watch():
                    # The server ended the stream (timeoutSeconds): a normal end, resume at once.
                    self.backoff.reset()
                elif not self._stop.is_set():
                    self._failed(StreamBroken(f"WATCH {self.resource.path}: ended early with no events"))
            except Gone as err:
                self._last_error = str(err)
                self._invalidate()
                if listing:
                    # A continue token expired mid-list: start over, but not in a tight loop.
                    self._failed(err)
                else:
                    log.info("%s: %s; listing again", self.resource.name, err)
            except ApiError as err:
                self._failed(err)
            except Exception as err:  # noqa: BLE001 - a bug here must not end the watch for good
                log.exception("%s: reflector error", self.resource.name)
                self._failed(err)

    def _failed(self, err: Exception) -> None:
        self._last_error = str(err)
        delay = self.backoff.next_delay()
        log.warning("%s: %s; retrying in %.1fs", self.resource.name, err, delay)
        self._stop.wait(delay)

    def _invalidate(self) -> None:
        # The kept state may miss deletions from the compacted gap: not synced until relisted.
        self.resource_version = None
        self._synced = False

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.resource.field_selector:
            params["fieldSelector"] = self.resource.field_selector
        return params

    def _list(self) -> None:
        items: dict[str, Any] = {}
        token: str | None = None
        rv: str | None = None
        while True:
            params = self._params()
            params["limit"] = self.page_size
            if token:
                params["continue"] = token
            page = self.api.list_page(self.resource.path, params, timeout=self.list_timeout)
            if self._stop.is_set():
                return
            meta = page.get("metadata") if isinstance(page.get("metadata"), dict) else {}
            raw_items = page.get("items") or []
            if not isinstance(raw_items, list):
                raise ApiError(f"LIST {self.resource.path}: items is not a list")
            for raw in raw_items:
                parsed = self._parse(raw)
                if parsed is not None:
                    items[parsed[0]] = parsed[1]
            del raw_items, page  # drop the page's raw objects before fetching the next
            rv = meta.get("resourceVersion") or rv
            token = meta.get("continue") or None
            if not token:
                break
        if not rv:
            raise ApiError(f"LIST {self.resource.path}: no resourceVersion in the response")
        self.handler.replace(self.resource.name, items)
        self.resource_version = str(rv)
        self._lists += 1
        self._synced = True
        self._synced_event.set()
        log.info("%s: listed %d objects at resourceVersion %s", self.resource.name, len(items), rv)

    def _parse(self, raw: Any) -> tuple[str, Any] | None:
        try:
            item = self.resource.parse(raw)
        except objects.MalformedObject as err:
            reason = str(err)
        except Exception as err:  # noqa: BLE001 - input the parser did not foresee is still just bad input
            reason = f"{type(err).__name__}: {err}"
        else:
            return (getattr(item, "key", None) or item.name), item
        self._malformed += 1
        self.malformed_log.warning("%s: skipping a malformed object: %s", self.resource.name, reason)
        return None

    def _watch(self) -> bool:
        """One watch stream, to its end. True when it ended normally and was worth having
        (delivered an event, or lasted about timeoutSeconds); ApiError when it broke."""
        params = self._params()
        params.update(watch="true", resourceVersion=self.resource_version,
                      allowWatchBookmarks="true", timeoutSeconds=self.watch_timeout)
        opened = time.monotonic()
        stream = self.api.watch_stream(self.resource.path, params,
                                       read_timeout=self.watch_timeout + self.read_slack)
        with self._lock:
            if self._stop.is_set():
                stream.close()
                return True
            self._stream = stream
        self._connected = True
        self._disconnected_since = None
        self._watches += 1
        healthy = False
        try:
            for event in stream.events():
                if self._stop.is_set():
                    return True
                self._apply(event)
                if not healthy:
                    # An event made it through: this connection works, forget old failures.
                    healthy = True
                    self.backoff.reset()
            return healthy or time.monotonic() - opened >= self.watch_timeout / 2
        finally:
            with self._lock:
                self._stream = None
            stream.close()
            self._connected = False
            self._disconnected_since = time.monotonic()

    def _apply(self, event: dict) -> None:
        kind, obj = event["type"], event.get("object")
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = obj.get("message") if isinstance(obj, dict) else None
            if code == 410:
                raise Gone(f"WATCH {self.resource.path}: {message or 'resourceVersion too old'}")
            raise StreamBroken(f"WATCH {self.resource.path}: error event {code}: {message}", code)
        rv = _resource_version(obj)
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise StreamBroken(f"WATCH {self.resource.path}: unknown event type {kind!r}")
        if kind == "DELETED":
            key = self.resource.key(obj)
            if key is not None:
                self.handler.delete(self.resource.name, key)
        else:
            parsed = self._parse(obj)
            if parsed is not None:
                self.handler.upsert(self.resource.name, *parsed)
            else:
                # What we kept of this object is no longer what the API has: drop it.
                key = self.resource.key(obj)
                if key is not None:
                    self.handler.delete(self.resource.name, key)
        if rv:
            self.resource_version = rv
