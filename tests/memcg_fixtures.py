"""Fixture /sys and /proc trees for the memcg collector (v1 and v2 layouts), and a runner for it."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from exporter.cli import settings_from_args
from exporter.collector import Context, Runner
from exporter.collectors.memcg import MemcgCollector
from exporter.paths import Paths

MEMORY_STAT = "cache 4096\nrss 8192\nrss_huge 0\nshmem 0\nmapped_file 0\n"


def memcg_runner(*argv: str) -> Runner:
    """A Runner with only the memcg collector, settings parsed as `serve` parses them."""
    settings = settings_from_args(list(argv))
    ctx = Context(settings=settings, paths=Paths(settings["path.procfs"], settings["path.sysfs"]))
    return Runner([MemcgCollector(ctx)], timeout=settings["scrape.timeout"])


def v1_tree(base: Path, cgroups: list[str], num_cgroups: int, stat: str = MEMORY_STAT) -> tuple[Path, Path]:
    """A v1 layout: <sys>/fs/cgroup/memory/<each cgroup>/memory.stat, <proc>/cgroups."""
    sysfs, procfs = base / "sys", base / "proc"
    root = sysfs / "fs" / "cgroup" / "memory"
    for rel in ["", *cgroups]:
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.stat").write_text(stat)
    # an empty cgroup2 mount beside it, as on a hybrid host
    (sysfs / "fs" / "cgroup" / "unified").mkdir()
    procfs.mkdir()
    (procfs / "cgroups").write_text(
        "#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
        "cpuset\t3\t1\t1\n"
        f"memory\t4\t{num_cgroups}\t1\n"
        "pids\t8\t1\t1\n")
    return sysfs, procfs


def v2_tree(base: Path, cgroups: list[str], nr_descendants: int, nr_dying: int,
            stat: str = MEMORY_STAT) -> tuple[Path, Path]:
    """A v2 layout: <sys>/fs/cgroup/{cgroup.controllers,cgroup.stat,memory.stat,<each cgroup>}."""
    sysfs, procfs = base / "sys", base / "proc"
    root = sysfs / "fs" / "cgroup"
    for rel in ["", *cgroups]:
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.stat").write_text(stat)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.stat").write_text(
        f"nr_descendants {nr_descendants}\nnr_dying_descendants {nr_dying}\n")
    procfs.mkdir()
    return sysfs, procfs


class SlowFifo:
    """Replace a file with a FIFO whose writer waits ``delay`` seconds before it
    writes ``content`` and closes: a memory.stat that is slow to read, for real."""

    def __init__(self, path: Path, content: bytes, delay: float) -> None:
        self.path, self.content, self.delay = path, content, delay
        self.opens = 0
        self._stop = False
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            if self.opens:
                # Not before the first reader: a reader opening during the probe
                # would be let in by it and see EOF at once.
                self._wait_for_reader_gone()
            fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader opens
            if self._stop:
                os.close(fd)
                return
            self.opens += 1
            time.sleep(self.delay)
            try:
                os.write(fd, self.content)
            except BrokenPipeError:
                pass  # the reader gave up; nothing to serve
            os.close(fd)

    def _wait_for_reader_gone(self) -> None:
        # A writer's open succeeds at once while the last reader still holds the
        # FIFO, which would serve it the content twice: wait until it has closed
        # (a non-blocking write open fails with ENXIO when no reader is there).
        while not self._stop:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return
            os.close(fd)
            time.sleep(0.01)

    def close(self) -> None:
        self._stop = True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # wake the writer
            time.sleep(0.05)
            os.close(fd)
        except OSError:
            pass
        self._thread.join(timeout=5)


def make_dying_children(parent: str, files, count: int) -> None:
    """Make ``count`` real memory cgroups under ``parent``, charge each some page cache
    (a short process in it writes a file), then remove them: dying until the cache goes."""
    for i in range(count):
        child = os.path.join(parent, f"c{i}")
        os.mkdir(child)

        def join_cgroup(procs_file=os.path.join(child, "cgroup.procs")):
            with open(procs_file, "w") as fh:
                fh.write(str(os.getpid()))

        subprocess.run(["dd", "if=/dev/urandom", f"of={files}/f{i}", "bs=16k", "count=3", "status=none"],
                       preexec_fn=join_cgroup, check=True)
    for i in range(count):
        os.rmdir(os.path.join(parent, f"c{i}"))


def remove_cgroup_tree(parent: str) -> None:
    """Remove ``parent`` and its child cgroups (cgroupfs removes directories, not files)."""
    for child in sorted(os.listdir(parent)):
        full = os.path.join(parent, child)
        if os.path.isdir(full):
            os.rmdir(full)
    os.rmdir(parent)


class StuckFifo:
    """Replace a file with a FIFO nobody writes: opening it for reading blocks until
    ``release()`` (the seed's 9 s memory.stat read taken to the limit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        os.mkfifo(path)

    def release(self) -> None:
        """Let a reader blocked in open() through: it then reads an empty file."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no reader waits
        except OSError:
            return
        os.close(fd)
