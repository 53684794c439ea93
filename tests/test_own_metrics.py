"""The exporter's own metrics (process_*, python_*, kubenode_exporter_build_info): served by the
real command, always on, read from the exporter's own /proc whatever --path.procfs says, and
checked against /proc/<its pid> read by the test itself."""

import os
import platform
import resource

import pytest
from prometheus_client import REGISTRY, generate_latest

from exporter import __version__
from exporter.collector import Runner
from exporter.http import make_app
from tests.helpers import get, samples, value
from tests.test_process import BTIME, TICKS, fake_procfs, stat_text
from tests.test_serve import exporter  # noqa: F401 - the fixture: the real command on a free port

PAGE = resource.getpagesize()


def kernel_view(pid: int) -> dict[str, float]:
    """What the kernel says of ``pid``: CPU seconds, start time, RSS, open and max fds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as fh:
        btime = next(float(line.split()[1]) for line in fh if line.startswith("btime "))
    with open(f"/proc/{pid}/limits") as fh:
        max_fds = next(float(line.split()[3]) for line in fh if line.startswith("Max open files"))
    # fields[0] is field 3 of proc(5): utime 14, stime 15, starttime 22, rss 24
    return {"cpu": (int(fields[11]) + int(fields[12])) / TICKS,
            "start": btime + int(fields[19]) / TICKS,
            "rss": int(fields[21]) * PAGE,
            "open_fds": len(os.listdir(f"/proc/{pid}/fd")),
            "max_fds": max_fds}


def own_samples(base: str, pid: int):
    before = kernel_view(pid)
    status, _, body = get(base + "/metrics")
    after = kernel_view(pid)
    assert status == 200
    return samples(body.decode()), before, after


def test_the_command_serves_its_own_cost_and_build(exporter):  # noqa: F811
    base, proc = exporter()
    s, before, after = own_samples(base, proc.pid)
    assert before["cpu"] - 1e-9 <= value(s, "process_cpu_seconds_total") <= after["cpu"] + 1e-9
    assert value(s, "process_start_time_seconds") == pytest.approx(before["start"], abs=0.02)
    # RSS moves a little while a scrape is served; tens of MB is the whole interpreter.
    assert abs(value(s, "process_resident_memory_bytes") - after["rss"]) < 4 << 20
    assert value(s, "process_resident_memory_bytes") > 10 << 20
    assert value(s, "process_max_fds") == after["max_fds"]
    # The scrape's own socket is open while the page is built, closed when the test reads fds.
    assert after["open_fds"] <= value(s, "process_open_fds") <= after["open_fds"] + 2
    assert value(s, "process_virtual_memory_bytes") > value(s, "process_resident_memory_bytes")
    assert value(s, "kubenode_exporter_build_info", version=__version__,
                 python_version=platform.python_version(),
                 python_implementation=platform.python_implementation()) == 1.0
    assert value(s, "python_info", implementation=platform.python_implementation(),
                 major=platform.python_version_tuple()[0], minor=platform.python_version_tuple()[1],
                 patchlevel=platform.python_version_tuple()[2], version=platform.python_version()) == 1.0
    assert value(s, "python_gc_collections_total", generation="0") is not None


def test_own_metrics_are_always_on(exporter):  # noqa: F811
    """Not a collector: with every collector switched off they are still there."""
    from exporter.collector import load_collectors

    off = [f"--no-collector.{name}" for name in sorted(load_collectors())]
    base, proc = exporter(*off)
    s, before, after = own_samples(base, proc.pid)
    assert not any(name.startswith("kubenode_collector_") for name, _ in s)
    assert before["cpu"] - 1e-9 <= value(s, "process_cpu_seconds_total") <= after["cpu"] + 1e-9
    assert value(s, "kubenode_exporter_build_info", version=__version__,
                 python_version=platform.python_version(),
                 python_implementation=platform.python_implementation()) == 1.0


def test_own_process_is_read_from_its_own_proc_not_path_procfs(exporter, tmp_path):  # noqa: F811
    """--path.procfs is the node's /proc; the exporter's own figures must not come from it.
    The fixture tree has a process with the exporter's very PID (as the host's /proc has, in a
    container, for some other process) and a `self`: neither may be read."""
    # `self` in the tree points at a stranger; the exporter's own PID is added once it runs.
    stranger = stat_text(1, "stranger", 123_456, 0, starttime=42)
    procfs = fake_procfs(tmp_path / "proc", {1: ("stranger", stranger)})
    os.symlink("1", procfs / "self")
    base, proc = exporter("--path.procfs", str(procfs))
    (procfs / str(proc.pid)).mkdir()
    (procfs / str(proc.pid) / "stat").write_text(stat_text(proc.pid, "stranger", 123_456, 0, starttime=42))
    (procfs / str(proc.pid) / "statm").write_text("5000 1000 0 0 0 0 0\n")
    s, before, after = own_samples(base, proc.pid)
    assert before["cpu"] - 1e-9 <= value(s, "process_cpu_seconds_total") <= after["cpu"] + 1e-9
    assert value(s, "process_start_time_seconds") == pytest.approx(before["start"], abs=0.02)
    assert value(s, "process_start_time_seconds") != pytest.approx(BTIME + 42 / TICKS)


def test_own_metrics_stay_off_the_global_registry():
    before = generate_latest(REGISTRY)
    apps = [make_app(Runner([])) for _ in range(2)]  # two apps in one process: no clash
    assert apps and generate_latest(REGISTRY).count(b"kubenode_exporter_build_info") == 0
    assert b"kubenode_exporter_build_info" not in before
