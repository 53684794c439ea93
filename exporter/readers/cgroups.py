"""Memory cgroups: which hierarchy, where the kubelet's pods are, how slow memory.stat is,
and how many memory cgroups are live or dying.

Plain data only; ``exporter/collectors/memcg.py`` shapes it into metrics.

Counting, and why:
- cgroup v1: the kernel's own count is the ``memory`` line of ``/proc/cgroups``
  (``num_cgroups``), which includes cgroups that were removed but whose memory
  (page cache still charged to them) keeps them alive: the "dying" ones.
  ``live`` is the number of directories of the memory hierarchy, the root
  included (the kernel counts the root too); ``dying = num_cgroups - live``,
  clamped at 0 because a cgroup made between the two reads can make it negative.
- cgroup v2: the root ``cgroup.stat`` counts both: ``nr_descendants`` (live,
  excluding the root) and ``nr_dying_descendants``. ``live`` is
  ``nr_descendants + 1`` so it counts the root as v1 does. In v2 these count
  every cgroup, whichever controllers it has enabled.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from exporter.paths import Paths

# Where the kubelet puts pods under the memory root: ``kubepods`` with the
# cgroupfs driver, ``kubepods.slice`` with the systemd driver (v1 and v2 alike).
POD_CGROUP_NAMES = ("kubepods.slice", "kubepods")
# How deep below the root to look when the pods cgroup is not a direct child
# (a custom --cgroup-root such as /k3s/kubepods); bounded so a search is cheap.
POD_SEARCH_DEPTH = 2
READ_CHUNK = 1 << 16
# A memory.stat read that took t seconds is not repeated for READ_SPACING x t: the
# exporter's own reads then cost at most 1/(1 + READ_SPACING) of a core, however slow
# the kernel gets (a 9 s read is repeated after 90 s), while a read of a few
# milliseconds is still fresh on every scrape.
READ_SPACING = 10.0


class CgroupError(Exception):
    """A cgroup file is missing or unreadable; the message names the path."""


@dataclass(frozen=True)
class MemoryHierarchy:
    version: int  # 1 or 2
    root: str  # the memory hierarchy's root directory


@dataclass(frozen=True)
class StatRead:
    seconds: float
    size: int  # bytes read


@dataclass(frozen=True)
class CgroupCounts:
    live: int
    dying: int


def _describe(err: OSError) -> str:
    return err.strerror or errno.errorcode.get(err.errno or 0, str(err))


def detect_memory_hierarchy(paths: Paths) -> MemoryHierarchy:
    """v2 when ``<sysfs>/fs/cgroup`` is a unified hierarchy offering the memory
    controller; else v1 when ``<sysfs>/fs/cgroup/memory`` holds the memory
    controller. A hybrid host (v1 memory plus an empty ``unified`` mount) is v1."""
    unified = paths.sys("fs", "cgroup")
    controllers_file = os.path.join(unified, "cgroup.controllers")
    try:
        with open(controllers_file, encoding="ascii") as fh:
            controllers = fh.read().split()
    except FileNotFoundError:
        controllers = None
    except OSError as err:
        raise CgroupError(f"cannot read {controllers_file}: {_describe(err)}") from None
    if controllers is not None:
        if "memory" in controllers:
            return MemoryHierarchy(2, unified)
        raise CgroupError(f"cgroup v2 at {unified} has no memory controller ({controllers_file})")
    v1_root = os.path.join(unified, "memory")
    if os.path.exists(os.path.join(v1_root, "memory.stat")):
        return MemoryHierarchy(1, v1_root)
    raise CgroupError(f"no memory cgroup hierarchy: neither {controllers_file} "
                      f"nor {v1_root}/memory.stat exists")


def find_pods_cgroup(root: str) -> str | None:
    """The kubelet's pods cgroup below ``root`` (absolute path), or None.

    A direct child named kubepods.slice or kubepods first; then one level
    deeper, in name order (a custom cgroup root). The shallowest match wins.
    """
    for name in POD_CGROUP_NAMES:
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    level = [root]
    for _ in range(POD_SEARCH_DEPTH - 1):
        children = []
        for parent in level:
            children.extend(sorted(_subdirs(parent)))
        for child in children:
            for name in POD_CGROUP_NAMES:
                candidate = os.path.join(child, name)
                if os.path.isdir(candidate):
                    return candidate
        level = children
    return None


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def time_stat_read(path: str) -> StatRead:
    """Read ``path`` to its end in one open, and time it.

    The kernel builds memory.stat while it is read (v1 walks every descendant,
    dying ones included), so the open and every read are inside the timing.
    """
    size = 0
    start = time.perf_counter()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
        finally:
            os.close(fd)
    except OSError as err:
        raise CgroupError(f"cannot read {path}: {_describe(err)}") from None
    return StatRead(time.perf_counter() - start, size)


class StatReads:
    """The timed memory.stat reads of one collector: the last result of each path, the
    reads still running, and when each path may be read again (READ_SPACING).

    ``read()`` runs in the collector's thread and may block for as long as the kernel
    (or a FIFO) makes it; ``in_flight()`` and ``last()`` answer at once from any other
    thread, so a scrape can show a read that has not returned.
    """

    def __init__(self, spacing: float = READ_SPACING, clock: Callable[[], float] = time.monotonic) -> None:
        self.spacing = spacing
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, StatRead] = {}
        self._due: dict[str, float] = {}  # path -> clock time a new read may start
        self._started: dict[str, float] = {}  # path -> clock time of the read in flight

    def read(self, path: str) -> StatRead:
        """The last read of ``path`` if a new one is not due yet, else a new timed read.

        A failed read forgets the last result (never served as if read) and is tried
        again on the next call.
        """
        with self._lock:
            now = self.clock()
            last = self._last.get(path)
            if last is not None and now < self._due[path]:
                return last
            self._started[path] = now
        try:
            result = time_stat_read(path)
        except CgroupError:
            with self._lock:
                self._last.pop(path, None)
                self._due.pop(path, None)
            raise
        finally:
            with self._lock:
                self._started.pop(path, None)
        with self._lock:
            self._last[path] = result
            self._due[path] = self.clock() + self.spacing * result.seconds
        return result

    def in_flight(self) -> dict[str, float]:
        """path -> seconds a read still running has taken so far."""
        with self._lock:
            now = self.clock()
            return {path: now - started for path, started in self._started.items()}

    def last(self) -> dict[str, StatRead]:
        with self._lock:
            return dict(self._last)

    def keep_only(self, paths: Iterable[str]) -> None:
        """Forget paths no longer read (a pods cgroup removed): the state stays bounded."""
        keep = set(paths)
        with self._lock:
            for gone in set(self._last) - keep:
                del self._last[gone]
                self._due.pop(gone, None)


def count_live_dirs(root: str) -> int:
    """Directories of the hierarchy at ``root``, the root included."""
    count = 0
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                count += 1
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except FileNotFoundError:
            # removed while we walked: it is no longer live
            if path == root:
                raise CgroupError(f"cannot read {root}: it vanished") from None
        except OSError as err:
            raise CgroupError(f"cannot walk {path}: {_describe(err)}") from None
    return count


def read_proc_cgroups_memory(paths: Paths) -> int:
    """``num_cgroups`` of the memory line of ``<procfs>/cgroups`` (v1's kernel count)."""
    path = paths.proc("cgroups")
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read()
    except OSError as err:
        raise CgroupError(f"cannot read {path}: {_describe(err)}") from None
    return parse_proc_cgroups_memory(text, path)


def parse_proc_cgroups_memory(text: str, path: str = "/proc/cgroups") -> int:
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "memory":
            # subsys_name hierarchy num_cgroups enabled
            if len(fields) < 4 or not fields[2].isdigit():
                raise CgroupError(f"{path}: malformed memory line {line.strip()!r}")
            if fields[3] != "1":
                raise CgroupError(f"{path}: the memory controller is disabled")
            return int(fields[2])
    raise CgroupError(f"{path} has no memory line (no memory controller in this kernel)")


def read_cgroup_stat(cgroup_dir: str) -> dict[str, int]:
    path = os.path.join(cgroup_dir, "cgroup.stat")
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read()
    except OSError as err:
        raise CgroupError(f"cannot read {path}: {_describe(err)}") from None
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            out[fields[0]] = int(fields[1])
    return out


def count_memory_cgroups(paths: Paths, hierarchy: MemoryHierarchy) -> CgroupCounts:
    if hierarchy.version == 2:
        stat = read_cgroup_stat(hierarchy.root)
        try:
            return CgroupCounts(live=stat["nr_descendants"] + 1, dying=stat["nr_dying_descendants"])
        except KeyError as err:
            raise CgroupError(f"{hierarchy.root}/cgroup.stat has no {err.args[0]}") from None
    # Kernel count first, then the walk: a cgroup removed in between then shows
    # as dying (which it briefly is), never as a negative number.
    kernel_count = read_proc_cgroups_memory(paths)
    live = count_live_dirs(hierarchy.root)
    return CgroupCounts(live=live, dying=max(0, kernel_count - live))
