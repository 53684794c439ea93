"""Find the node's components (kubelet, kube-proxy, kube-router, ...) in /proc and read
their CPU and memory with psutil.

A full scan of /proc reads two or three files per process, so it is not done
every scrape: the processes found are kept (psutil checks a PID is still the
same process by its start time), and /proc is scanned again only when a kept
process has gone, when a component has had no process for a while, or at a slow
interval to pick up extra matching processes.

A matching process whose stat or statm does not parse (empty, cut short, not the
kernel's text) is skipped and reported apart, so one odd process never takes the
others' figures down; it is said once when it turns odd and once when it recovers.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import psutil

log = logging.getLogger("exporter.readers.processes")
T = TypeVar("T")

# A component with no process is looked for again after this long (it may start
# later); a kept process that exits triggers a scan at once instead.
MISSING_RESCAN_SECONDS = 30.0
# Everything is looked for again after this long (a second matching process).
FULL_RESCAN_SECONDS = 300.0


# What psutil raises when it parses a stat or statm that is not the kernel's text (it
# indexes and converts fields without checking): IndexError when cut short or empty,
# ValueError when a field is no number.
MALFORMED = (IndexError, ValueError, OverflowError)


class ProcfsError(Exception):
    """The procfs root cannot be read; the message names it."""


class MalformedProcessFile(Exception):
    """One process's stat or statm could not be parsed; the message names the file."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _parsed(path: str, read: Callable[[], T]) -> T:
    """``read()``, with a parse failure of ``path`` turned into one line naming it."""
    try:
        return read()
    except MALFORMED as err:
        raise MalformedProcessFile(path, f"{path} does not parse ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class Component:
    name: str
    match: re.Pattern[str]  # tried on the process name, then on its command line

    @classmethod
    def parse(cls, name: str, pattern: str) -> "Component":
        return cls(name, re.compile(pattern))


@dataclass(frozen=True)
class Usage:
    """One process's figures, as the kernel accounts them in /proc/<pid>/stat and statm."""

    pid: int
    cpu_seconds: float  # utime + stime
    children_cpu_seconds: float  # cutime + cstime: exited children it waited for
    rss_bytes: int


@dataclass
class Sample:
    """One read of every component."""

    usages: dict[str, list[Usage]]  # component -> figures of each process read
    unreadable: dict[str, dict[int, MalformedProcessFile]]  # component -> {pid: why} of matching processes skipped


@dataclass
class ScanStats:
    scans: int = 0
    last_seconds: float = 0.0
    last_processes: int = 0


def check_procfs(procfs: str) -> None:
    stat = os.path.join(procfs, "stat")
    try:
        if not os.path.isdir(procfs):
            raise ProcfsError(f"cannot read {procfs}: no such directory (check --path.procfs)")
        os.stat(stat)
    except FileNotFoundError:
        raise ProcfsError(f"{procfs} is not a procfs: {stat} does not exist (check --path.procfs)") from None
    except OSError as err:
        raise ProcfsError(f"cannot read {stat}: {err.strerror}") from None


def read_cmdline(procfs: str, pid: str) -> str:
    """The command line, arguments joined by spaces ("" for kernel threads or a gone process)."""
    try:
        with open(os.path.join(procfs, pid, "cmdline"), "rb") as fh:
            raw = fh.read()
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def read_name(procfs: str, pid: str, cmdline: Callable[[], str]) -> str | None:
    """The process name as psutil gives it: comm, extended from the command line when
    the kernel truncated it to 15 characters. None when the process has gone."""
    try:
        with open(os.path.join(procfs, pid, "comm"), "rb") as fh:
            name = fh.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None
    if len(name) >= 15:
        first = cmdline().split(" ", 1)[0]
        extended = os.path.basename(first)
        if extended.startswith(name):
            name = extended
    return name


def _matches(component: Component, name: str, cmdline: Callable[[], str]) -> bool:
    return bool(component.match.search(name)) or bool(component.match.search(cmdline()))


class ProcessTracker:
    """The processes of each component, found by a scan of /proc and kept between samples."""

    def __init__(self, procfs: str, components: list[Component], clock: Callable[[], float] = time.monotonic,
                 missing_rescan: float = MISSING_RESCAN_SECONDS, full_rescan: float = FULL_RESCAN_SECONDS) -> None:
        self.procfs = procfs
        self.components = components
        self.clock = clock
        self.missing_rescan = missing_rescan
        self.full_rescan = full_rescan
        self.stats = ScanStats()
        self._kept: dict[str, list[psutil.Process]] = {}
        # Matching processes the scan could not open (their stat does not parse): retried
        # each sample, and a scan is due as soon as one parses or goes.
        self._odd_found: dict[str, dict[int, MalformedProcessFile]] = {}
        self._last_scan: float | None = None
        # pid -> (component, file) of the processes said to be skipped, to say each change
        # once (the file, not the message: a garbled file's text may differ every read).
        self._said_odd: dict[int, tuple[str, str]] = {}

    def kept_pids(self) -> dict[str, list[int]]:
        return {name: [p.pid for p in procs] for name, procs in self._kept.items()}

    def _use_procfs(self) -> None:
        # psutil reads every file under this module-wide root.
        psutil.PROCFS_PATH = self.procfs

    def _stat_path(self, pid: int | str) -> str:
        return os.path.join(self.procfs, str(pid), "stat")

    def _open(self, pid: int) -> psutil.Process:
        """psutil.Process(pid); it parses /proc/<pid>/stat for the start time."""
        return _parsed(self._stat_path(pid), lambda: psutil.Process(pid))

    def scan(self) -> None:
        """Look at every process once; keep those whose name or command line matches.

        Names and command lines are read directly (two small reads per process,
        about 5x cheaper than building a psutil.Process for each); only the
        matches become psutil.Process objects.
        """
        self._use_procfs()
        check_procfs(self.procfs)
        start = time.perf_counter()
        try:
            entries = [e for e in os.listdir(self.procfs) if e.isdigit()]
        except OSError as err:
            raise ProcfsError(f"cannot list {self.procfs}: {err.strerror}") from None
        found: dict[str, list[psutil.Process]] = {c.name: [] for c in self.components}
        odd: dict[str, dict[int, MalformedProcessFile]] = {c.name: {} for c in self.components}
        for entry in entries:
            # read only if the name alone matches no component
            cmdline = functools.cache(functools.partial(read_cmdline, self.procfs, entry))
            name = read_name(self.procfs, entry, cmdline)
            if name is None:
                continue  # exited while we looked
            for component in self.components:
                if _matches(component, name, cmdline):
                    try:
                        found[component.name].append(self._open(int(entry)))
                    except psutil.Error:
                        pass
                    except MalformedProcessFile as err:
                        odd[component.name][int(entry)] = err
        self._kept = found
        self._odd_found = odd
        self._last_scan = self.clock()
        self.stats.scans += 1
        self.stats.last_processes = len(entries)
        self.stats.last_seconds = time.perf_counter() - start
        log.debug("scanned %d processes in %.4f s: %s", len(entries), self.stats.last_seconds,
                  self.kept_pids())

    def _scan_due(self) -> bool:
        if self._last_scan is None:
            return True
        age = self.clock() - self._last_scan
        if age >= self.full_rescan:
            return True
        return age >= self.missing_rescan and any(not procs for procs in self._kept.values())

    def _read(self, proc: psutil.Process) -> Usage | None:
        """One kept process's figures; None when it is no longer running. Raises
        psutil.Error when it has gone, MalformedProcessFile when a file does not parse."""
        stat = self._stat_path(proc.pid)
        # is_running compares the start time, so a reused PID is not taken for the
        # process we kept.
        if not _parsed(stat, proc.is_running):
            return None
        with proc.oneshot():  # one read of /proc/<pid>/stat for all three
            if _parsed(stat, proc.status) == psutil.STATUS_ZOMBIE:
                return None  # exited, not yet reaped: no longer running
            cpu = _parsed(stat, proc.cpu_times)
            rss = _parsed(os.path.join(self.procfs, str(proc.pid), "statm"), proc.memory_info).rss
        return Usage(proc.pid, cpu.user + cpu.system, cpu.children_user + cpu.children_system, rss)

    def read_kept(self) -> tuple[Sample, bool]:
        """Figures of every kept process; the second value is True when one has gone
        (or an odd one found by the scan has gone or parses now): a scan is due."""
        self._use_procfs()
        sample = Sample({}, {})
        changed = False
        for name, procs in self._kept.items():
            usages: list[Usage] = []
            odd: dict[int, MalformedProcessFile] = {}
            for proc in procs:
                try:
                    usage = self._read(proc)
                except psutil.Error:
                    usage = None
                except MalformedProcessFile as err:
                    odd[proc.pid] = err
                    continue
                if usage is None:
                    changed = True
                    continue
                usages.append(usage)
            for pid in self._odd_found.get(name, {}):
                try:
                    self._open(pid)
                except MalformedProcessFile as err:
                    odd[pid] = err
                    continue
                except psutil.Error:
                    pass
                changed = True  # gone, or parses now: the scan decides whether it matches
            sample.usages[name] = usages
            sample.unreadable[name] = odd
        return sample, changed

    def _say_changes(self, sample: Sample) -> None:
        """Log each process that turned odd (or odd for another reason) and each that
        recovered, once: not every scrape."""
        now = {pid: (name, err.path, str(err)) for name, odd in sample.unreadable.items()
               for pid, err in odd.items()}
        for pid, (name, path, why) in now.items():
            if self._said_odd.get(pid) != (name, path):
                log.warning("skipping process %d of component %s: %s", pid, name, why)
        for pid, (name, _) in self._said_odd.items():
            if pid not in now:
                log.info("process %d of component %s is readable again or has exited", pid, name)
        self._said_odd = {pid: (name, path) for pid, (name, path, _) in now.items()}

    def sample(self) -> Sample:
        """Every component's figures (an empty list: none running) and the processes skipped."""
        if self._scan_due():
            self.scan()
        sample, changed = self.read_kept()
        if changed:
            # A kept process exited (a restart, a crash): find its successor now.
            self.scan()
            sample, _ = self.read_kept()
        self._say_changes(sample)
        return sample
