"""exporter.allocator: glibc's malloc tuned where it is glibc, left alone (one debug line) elsewhere."""

import ctypes
import logging
import subprocess
import sys

from exporter import allocator


def test_tune_and_trim_take_on_this_glibc():
    # A fresh process, as serve calls it: before any thread, no MALLOC_* in the environment.
    code = ("from exporter import allocator; "
            "print(allocator.tune(), allocator.trim() in (True, False))")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_a_libc_without_the_symbols_is_left_alone_with_one_debug_line(monkeypatch, caplog):
    class NotGlibc:  # musl: no gnu_get_libc_version
        def __getattr__(self, name):
            raise AttributeError(f"undefined symbol: {name}")

    monkeypatch.setattr(ctypes, "CDLL", lambda *_: NotGlibc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with caplog.at_level(logging.DEBUG, logger="exporter.allocator"):
        assert allocator.tune() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "gnu_get_libc_version" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="exporter.allocator"):
        assert allocator.trim() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_no_c_library_at_all_is_left_alone(monkeypatch, caplog):
    def no_libc(*_):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    with caplog.at_level(logging.DEBUG, logger="exporter.allocator"):
        assert allocator.tune() is False and allocator.trim() is False
    assert all(r.levelno == logging.DEBUG for r in caplog.records) and len(caplog.records) == 2


def test_the_environment_wins(monkeypatch):
    calls = []

    class FakeGlibc:
        def __init__(self):
            self.gnu_get_libc_version = lambda: b"2.36"
            self.mallopt = lambda param, value: calls.append((param, value)) or 1
            self.malloc_trim = lambda pad: 1

    monkeypatch.setattr(ctypes, "CDLL", lambda *_: FakeGlibc())
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.tune() is True
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD)]
