"""Shared pieces of the Kubernetes source tests: the stand-in, a client, a recording handler."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import pytest

from exporter.dataplane import VirtualServer
from exporter.kube.desired import virtual_servers_for_service
from exporter.kube.client import ApiClient
from tests.apiserver import FakeApiServer


@pytest.fixture
def apiserver():
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(apiserver, tmp_path):
    path = apiserver.write_kubeconfig(str(tmp_path / f"kubeconfig-kube-{os.getpid()}"))
    client = ApiClient.from_settings(path)
    try:
        yield client
    finally:
        client.close()


class Recorder:
    """A reflector Handler that keeps what it was given and counts calls."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    def replace(self, resource: str, items: dict[str, Any]) -> None:
        with self.lock:
            self.items[resource] = dict(items)
            self.calls.append(("replace", resource, None))

    def upsert(self, resource: str, key: str, item: Any) -> None:
        with self.lock:
            self.items.setdefault(resource, {})[key] = item
            self.calls.append(("upsert", resource, key))

    def delete(self, resource: str, key: str) -> None:
        with self.lock:
            self.items.setdefault(resource, {}).pop(key, None)
            self.calls.append(("delete", resource, key))

    def keys(self, resource: str) -> set[str]:
        with self.lock:
            return set(self.items.get(resource, {}))


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class CountingModel:
    """The real desired-state model, counting calls per Service (and failing on demand)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.fail_for: set[str] = set()

    def __call__(self, service, slices, node, proxy, **kwargs) -> list[VirtualServer]:
        self.calls[service.key] = self.calls.get(service.key, 0) + 1
        if service.key in self.fail_for:
            raise ValueError("model cannot handle this service")
        return virtual_servers_for_service(service, slices, node, proxy, **kwargs)

    def total(self) -> int:
        return sum(self.calls.values())
