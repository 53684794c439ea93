"""Small helpers shared by tests: run the exporter in-process and scrape it."""

from __future__ import annotations

import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import settings_from_args
from exporter.collector import Context, Runner, build_collectors
from exporter.paths import Paths


def make_runner(argv: list[str]) -> tuple[Runner, Context]:
    """A Runner built from command-line style arguments, as `serve` builds it."""
    settings = settings_from_args(argv)
    ctx = Context(settings=settings, paths=Paths(settings["path.procfs"], settings["path.sysfs"]))
    return Runner(build_collectors(ctx), timeout=settings["scrape.timeout"]), ctx


def samples(runner_or_text) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from a Runner or exposition text."""
    if isinstance(runner_or_text, str):
        families = text_string_to_metric_families(runner_or_text)
    else:
        families = runner_or_text.collect()
    out = {}
    for fam in families:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples_: dict, name: str, **labels) -> float | None:
    return samples_.get((name, tuple(sorted(labels.items()))))


def scrape_within(runner, seconds):
    """One scrape in a thread; the samples, or an assertion error if it hangs past ``seconds``."""
    out = []
    t = threading.Thread(target=lambda: out.append(samples(runner)), daemon=True)
    t.start()
    t.join(timeout=seconds)
    assert not t.is_alive() and out, f"the scrape did not answer within {seconds}s"
    return out[0]


def collector_threads(name: str) -> list[threading.Thread]:
    """The Runner's worker threads of collector ``name``."""
    return [t for t in threading.enumerate() if t.name == f"collector-{name}"]


def get(url: str, headers: dict | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def hang_lookups_of(monkeypatch, name: str) -> threading.Event:
    """socket.getaddrinfo, for ``name`` alone, as a dead DNS server makes it: no answer
    (the resolver's own timeouts, at length) until the returned event is set, then
    127.0.0.1. A literal-address check (AI_NUMERICHOST) says "not numeric" at once."""
    import socket

    released = threading.Event()
    real = socket.getaddrinfo

    def hung(host, *args, **kwargs):
        if host != name:
            return real(host, *args, **kwargs)
        if kwargs.get("flags"):  # AI_NUMERICHOST: not a literal address
            raise socket.gaierror(socket.EAI_NONAME, "not numeric")
        released.wait(30)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    return released
