"""memcg collector on fixture /sys and /proc trees: v1 and v2 layouts, both kubelet cgroup
drivers, slow reads measured for real, one read per path even under overlapping scrapes,
and every failure a clear error for this collector only."""

import os
import threading
import time

import pytest

from exporter.readers import cgroups
from tests.helpers import collector_threads, make_runner, samples, scrape_within, value
from tests.memcg_fixtures import MEMORY_STAT, SlowFifo, StuckFifo, memcg_runner, v1_tree, v2_tree


def scrape(sysfs, procfs, *extra):
    return samples(memcg_runner("--path.sysfs", str(sysfs), "--path.procfs", str(procfs), *extra))


def read_labels(s):
    return sorted(dict(k[1])["cgroup"] for k in s if k[0] == "kubenode_memcg_stat_read_seconds")


@pytest.mark.parametrize("pods", ["kubepods", "kubepods.slice"])
def test_v1_finds_pods_cgroup_and_counts_dying(tmp_path, pods):
    kids = [pods, f"{pods}/burstable", f"{pods}/burstable/pod1", "system.slice"]
    sysfs, procfs = v1_tree(tmp_path, kids, num_cgroups=40)
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 1.0
    assert read_labels(s) == sorted(["/", f"/{pods}"])
    assert value(s, "kubenode_memcg_stat_read_bytes", cgroup=f"/{pods}") == len(MEMORY_STAT)
    assert value(s, "kubenode_memcg_stat_read_seconds", cgroup="/") > 0
    # live: the root and 4 directories; dying: what the kernel counts beyond them
    assert value(s, "kubenode_memcg_cgroups", state="live") == 5
    assert value(s, "kubenode_memcg_cgroups", state="dying") == 35
    assert value(s, "kubenode_memcg_hierarchy_info", version="1", pods_cgroup=f"/{pods}") == 1


@pytest.mark.parametrize("pods", ["kubepods.slice", "kubepods"])
def test_v2_finds_pods_cgroup_and_reads_cgroup_stat(tmp_path, pods):
    kids = [pods, f"{pods}/besteffort", "init.scope"]
    sysfs, procfs = v2_tree(tmp_path, kids, nr_descendants=57, nr_dying=1234)
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 1.0
    assert read_labels(s) == sorted(["/", f"/{pods}"])
    # v2 counts come from the kernel's cgroup.stat, not from the directories
    assert value(s, "kubenode_memcg_cgroups", state="live") == 58
    assert value(s, "kubenode_memcg_cgroups", state="dying") == 1234
    assert value(s, "kubenode_memcg_hierarchy_info", version="2", pods_cgroup=f"/{pods}") == 1


def test_pods_cgroup_under_a_custom_cgroup_root(tmp_path):
    sysfs, procfs = v2_tree(tmp_path, ["k3s", "k3s/kubepods", "a", "b"], 4, 0)
    s = scrape(sysfs, procfs)
    assert read_labels(s) == ["/", "/k3s/kubepods"]


def test_no_pods_cgroup_is_not_an_error(tmp_path, caplog):
    sysfs, procfs = v1_tree(tmp_path, ["system.slice", "user.slice"], num_cgroups=3)
    caplog.set_level("DEBUG", logger="exporter.collectors.memcg")
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 1.0
    assert read_labels(s) == ["/"]
    assert value(s, "kubenode_memcg_hierarchy_info", version="1", pods_cgroup="") == 1
    assert "no kubepods or kubepods.slice cgroup" in caplog.text


def test_configured_paths_are_read_once_each(tmp_path, monkeypatch):
    sysfs, procfs = v1_tree(tmp_path, ["kubepods", "system.slice", "system.slice/containerd.service"], 4)
    calls = []
    real = cgroups.time_stat_read
    monkeypatch.setattr(cgroups, "time_stat_read", lambda p: calls.append(p) or real(p))
    s = scrape(sysfs, procfs, "--memcg.paths", "system.slice/containerd.service",
               "--memcg.paths", "/kubepods", "--memcg.paths", "/")
    assert read_labels(s) == ["/", "/kubepods", "/system.slice/containerd.service"]
    assert len(calls) == len(set(calls)) == 3


def test_dying_is_clamped_at_zero(tmp_path):
    # A cgroup made between reading /proc/cgroups and walking must not give a negative count.
    sysfs, procfs = v1_tree(tmp_path, ["a", "b"], num_cgroups=2)
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_memcg_cgroups", state="live") == 3
    assert value(s, "kubenode_memcg_cgroups", state="dying") == 0


# --- the read time is the real duration ------------------------------------------------

def test_read_time_is_the_real_duration_of_a_slow_memory_stat(tmp_path):
    sysfs, procfs = v1_tree(tmp_path, ["kubepods"], 2)
    content = MEMORY_STAT.encode() * 50
    fifo = SlowFifo(sysfs / "fs/cgroup/memory/kubepods/memory.stat", content, delay=0.6)
    try:
        s = scrape(sysfs, procfs)
    finally:
        fifo.close()
    assert value(s, "kubenode_collector_success", collector="memcg") == 1.0
    slow = value(s, "kubenode_memcg_stat_read_seconds", cgroup="/kubepods")
    assert 0.6 <= slow < 1.5, slow
    assert value(s, "kubenode_memcg_stat_read_bytes", cgroup="/kubepods") == len(content)
    assert value(s, "kubenode_memcg_stat_read_seconds", cgroup="/") < 0.1
    assert fifo.opens == 1


def test_overlapping_scrapes_share_one_slow_read(tmp_path, monkeypatch):
    sysfs, procfs = v1_tree(tmp_path, ["kubepods.slice"], 2)
    fifo = SlowFifo(sysfs / "fs/cgroup/memory/kubepods.slice/memory.stat", b"cache 1\n", delay=0.5)
    active, most, reads = [0], [0], []
    lock = threading.Lock()
    real = cgroups.time_stat_read

    def counting(path):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            reads.append(path)
        try:
            return real(path)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(cgroups, "time_stat_read", counting)
    runner = memcg_runner("--path.sysfs", str(sysfs), "--path.procfs", str(procfs))
    results = []
    threads = [threading.Thread(target=lambda: results.append(samples(runner))) for _ in range(4)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(timeout=10)
    finally:
        fifo.close()
    assert len(results) == 4
    assert most[0] == 1, "two reads of memory.stat ran at once"
    # the scrapes that came while the slow read ran reused it: each path read once
    assert sorted(reads) == sorted({*reads}) and len(reads) == 2
    assert fifo.opens == 1
    for s in results:
        assert value(s, "kubenode_memcg_stat_read_seconds", cgroup="/kubepods.slice") >= 0.5


# --- failures: clear, for this collector only -------------------------------------------

def test_missing_proc_cgroups_keeps_read_times(tmp_path, caplog):
    sysfs, procfs = v1_tree(tmp_path, ["kubepods"], 2)
    os.unlink(procfs / "cgroups")
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
    assert read_labels(s) == ["/", "/kubepods"]
    assert value(s, "kubenode_memcg_cgroups", state="dying") is None
    assert f"cannot read {procfs}/cgroups: No such file or directory" in caplog.text


@pytest.mark.parametrize("text, reason", [
    ("#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t1\t1\n", "has no memory line"),
    ("memory\t4\tlots\t1\n", "malformed memory line"),
    ("memory\t0\t1\t0\n", "memory controller is disabled"),
])
def test_bad_proc_cgroups(tmp_path, caplog, text, reason):
    sysfs, procfs = v1_tree(tmp_path, [], 1)
    (procfs / "cgroups").write_text(text)
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
    assert reason in caplog.text


def test_unreadable_memory_stat_names_the_path_and_keeps_the_others(tmp_path, caplog):
    sysfs, procfs = v1_tree(tmp_path, ["kubepods"], 9)
    bad = sysfs / "fs/cgroup/memory/kubepods/memory.stat"
    bad.unlink()
    bad.mkdir()  # root reads through permissions; a directory cannot be read as a file
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
    assert read_labels(s) == ["/"]
    assert value(s, "kubenode_memcg_cgroups", state="dying") == 9 - 3  # root, kubepods, the bad dir
    assert f"cannot read {bad}: Is a directory" in caplog.text


def test_missing_configured_cgroup_is_an_error(tmp_path, caplog):
    sysfs, procfs = v2_tree(tmp_path, ["kubepods.slice"], 1, 0)
    s = scrape(sysfs, procfs, "--memcg.paths", "system.slice/nope", "--memcg.paths", "../../etc")
    assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
    assert read_labels(s) == ["/", "/kubepods.slice"]
    assert "configured memory cgroup" in caplog.text and "system.slice/nope does not exist" in caplog.text
    assert "'../../etc' leaves the memory hierarchy" in caplog.text


def test_v2_without_memory_controller_or_cgroup_stat(tmp_path, caplog):
    sysfs, procfs = v2_tree(tmp_path, [], 0, 0)
    (sysfs / "fs/cgroup/cgroup.stat").write_text("nr_descendants 3\n")
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
    assert "cgroup.stat has no nr_dying_descendants" in caplog.text
    (sysfs / "fs/cgroup/cgroup.controllers").write_text("cpu io pids\n")
    s = scrape(sysfs, procfs)
    assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
    assert "has no memory controller" in caplog.text


def test_no_memory_hierarchy_fails_only_memcg(tmp_path, caplog):
    (tmp_path / "sys").mkdir()
    runner, _ = make_runner(["--path.sysfs", str(tmp_path / "sys")])
    s = samples(runner)
    assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
    assert "no memory cgroup hierarchy" in caplog.text
    # Another collector of this build, reading /proc, still serves.
    assert value(s, "kubenode_collector_success", collector="process") == 1.0
    assert value(s, "kubenode_process_up", component="kubelet") is not None


# --- a read that never returns, and reads spaced by their cost --------------------------


def test_a_stuck_memory_stat_read_is_served_with_its_elapsed_time(tmp_path):
    sysfs, procfs = v1_tree(tmp_path, ["kubepods"], 2)
    fifo = StuckFifo(sysfs / "fs/cgroup/memory/memory.stat")
    runner = memcg_runner("--path.sysfs", str(sysfs), "--path.procfs", str(procfs), "--scrape.timeout", "0.5")
    try:
        s = scrape_within(runner, 5)
        assert value(s, "kubenode_collector_success", collector="memcg") == 0.0
        assert value(s, "kubenode_memcg_stat_read_in_flight", cgroup="/") == 1.0
        first = value(s, "kubenode_memcg_stat_read_seconds", cgroup="/")
        assert first >= 0.4  # the read began just after the run did
        time.sleep(0.2)
        s = scrape_within(runner, 5)
        assert value(s, "kubenode_memcg_stat_read_seconds", cgroup="/") >= first + 0.2, "the read's time so far"
        assert value(s, "kubenode_memcg_stat_read_in_flight", cgroup="/") == 1.0
        assert len(collector_threads("memcg")) == 1, "no second read while the first hangs"
    finally:
        fifo.release()
    assert runner.slots[0].run.done.wait(timeout=5), "the released read returns"
    s = scrape_within(runner, 5)
    assert value(s, "kubenode_collector_success", collector="memcg") == 1.0
    assert value(s, "kubenode_memcg_stat_read_in_flight", cgroup="/") == 0.0
    assert value(s, "kubenode_memcg_stat_read_in_flight", cgroup="/kubepods") == 0.0


def test_a_slow_memory_stat_is_read_less_often(tmp_path):
    sysfs, procfs = v1_tree(tmp_path, ["kubepods"], 2)
    fifo = SlowFifo(sysfs / "fs/cgroup/memory/kubepods/memory.stat", b"cache 1\n", delay=0.2)
    runner = memcg_runner("--path.sysfs", str(sysfs), "--path.procfs", str(procfs))
    try:
        first = samples(runner)
        again = samples(runner)  # well within 10 x 0.2 s: not read again
        assert fifo.opens == 1
        assert (value(again, "kubenode_memcg_stat_read_seconds", cgroup="/kubepods")
                == value(first, "kubenode_memcg_stat_read_seconds", cgroup="/kubepods") >= 0.2)
        assert value(again, "kubenode_collector_success", collector="memcg") == 1.0
    finally:
        fifo.close()


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stat_reads_space_each_path_by_its_read_time(tmp_path, monkeypatch):
    clock = FakeClock()
    reads = cgroups.StatReads(spacing=10.0, clock=clock)
    took = {"a": 2.0, "b": 0.001}
    calls = []

    def fake_read(path):
        calls.append(path)
        if path == "gone":
            raise cgroups.CgroupError("cannot read gone: No such file or directory")
        clock.now += took[path]
        return cgroups.StatRead(took[path], 10)

    monkeypatch.setattr(cgroups, "time_stat_read", fake_read)
    assert reads.read("a").seconds == 2.0 and reads.read("b").seconds == 0.001
    clock.now += 19.0  # "a" took 2 s: due 20 s after it ended; "b" long due
    reads.read("a"), reads.read("b")
    assert calls == ["a", "b", "b"]
    clock.now += 2.0
    reads.read("a")
    assert calls == ["a", "b", "b", "a"]
    with pytest.raises(cgroups.CgroupError):
        reads.read("gone")
    with pytest.raises(cgroups.CgroupError):
        reads.read("gone")  # a failure is tried again, never served from a cache
    reads.keep_only(["b"])
    assert set(reads.last()) == {"b"}
