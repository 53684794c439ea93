"""A throwaway network namespace for ipset tests and the ipset benchmark.

ipsets are per network namespace, so each test makes its own
(`kn-ipset-<pid>-<n>`) and never sees or touches the host's sets.

Python code runs "inside" it from a dedicated thread that joins the namespace
with setns(2): a network namespace is per thread on Linux, and a socket stays
in the namespace it was opened in. So the real reader, collector and Runner run
in-process (no subprocess, no JSON round trip, exceptions and objects as they
are), and the test's main thread never leaves the host namespace. Python 3.11
has no os.setns, hence ctypes.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(f"missing tool(s) for the ipset tests: {', '.join(missing)} "
                           "(scripts/setup.sh --test installs them)")


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetNS:
    """`ip netns add` on enter, `ip netns del` on exit (which also frees its ipsets)."""

    def __init__(self, tag: str = "") -> None:
        require_tools("ip", "ipset")
        self.name = f"kn-ipset-{os.getpid()}-{next(_counter)}{tag}"
        self.path = f"/run/netns/{self.name}"

    def __enter__(self) -> "NetNS":
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        return self

    def __exit__(self, *exc) -> None:
        # Sets referenced by list:set sets cannot be destroyed one by one, but a
        # namespace's sets all go with it.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def ipset(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """`ipset ARGS` in this namespace (nsenter changes only the network namespace)."""
        return subprocess.run(["nsenter", f"--net={self.path}", "ipset", *args], input=input,
                              capture_output=True, text=True, check=check)

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a fresh thread that has joined this namespace; its result or exception."""
        result: list = []

        def target() -> None:
            try:
                setns(self.path)
                result.append((True, fn()))
            except BaseException as err:  # noqa: BLE001 - handed back to the caller
                result.append((False, err))

        thread = threading.Thread(target=target, name=f"in-{self.name}")
        thread.start()
        thread.join()
        ok, value = result[0]
        if not ok:
            raise value
        return value


def parse_list_terse(text: str) -> dict[str, dict[str, str]]:
    """`ipset list -t` -> {set name: {"Type": ..., "Header": ..., "Number of entries": ...}}."""
    sets: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        key, _, val = line.partition(":")
        val = val.strip()
        if key == "Name":
            current = sets.setdefault(val, {})
        elif current is not None:
            current[key] = val
    return sets


def header_fields(header: str) -> dict[str, str]:
    """'family inet hashsize 1024 maxelem 100 counters' -> {'family': 'inet', ..., 'counters': ''}."""
    words = header.split()
    out: dict[str, str] = {}
    valued = {"family", "hashsize", "maxelem", "bucketsize", "initval", "range", "netmask",
              "size", "timeout", "markmask", "bitmask"}
    i = 0
    while i < len(words):
        if words[i] in valued and i + 1 < len(words):
            out[words[i]] = words[i + 1]
            i += 2
        else:
            out[words[i]] = ""
            i += 1
    return out
